import autocomp  # noqa: F401  first, before torch loads: it holds torch's kernels to AVX2 (autocomp.kernels)
