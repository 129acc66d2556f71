"""The CPU kernels torch trains with, held to one instruction set so CPU models of one vendor train the same bits.

torch picks its vectorised kernels by the CPU it runs on: ATen's (AVX-512 or AVX2), oneDNN's and MKL's code
paths. Each rounds float sums its own way, and training amplifies the last bits into other weights. Holding all
three to AVX2 (``PINNED``, set before torch first picks a kernel) makes CPUs of one vendor run the same code
paths, with or without AVX-512; which CPUs were tried and what they trained is in the README ("Training is
deterministic").

``AUTOCOMP_NATIVE_KERNELS=1`` keeps the CPU's own kernels (faster where it has AVX-512; teachers then reproduce
on one CPU model only). A variable already set in the environment is left as it is.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
NATIVE = "AUTOCOMP_NATIVE_KERNELS"


def cpu_info() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo (``vendor_id``, ``flags``, ...); empty where there is none."""
    try:
        block = Path("/proc/cpuinfo").read_text().split("\n\n", 1)[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in block.splitlines() if ":" in line)}


def has_avx2() -> bool:
    """Whether this is an x86-64 CPU with AVX2 (Linux: from /proc/cpuinfo; elsewhere not pinned)."""
    return "avx2" in cpu_info().get("flags", "").split()


def pin() -> None:
    """Hold torch's kernels to AVX2 on an x86-64 CPU that has it, unless ``AUTOCOMP_NATIVE_KERNELS=1``.

    torch reads these variables once, when it first picks a kernel, not when it is imported: a script that imports
    torch first (the usual order) and autocomp before computing anything is held too. One that computed with torch
    before importing autocomp keeps the CPU's own kernels; that is said in one warning line naming the fix."""
    if os.environ.get(NATIVE) == "1" or not has_avx2():
        return
    for name, value in PINNED.items():
        os.environ.setdefault(name, value)
    if "torch" in sys.modules:
        _check_held()


def _check_held() -> None:
    """Warn where torch picked its kernels before ``pin`` set the variables (``ATEN_CPU_CAPABILITY`` is not what
    torch runs)."""
    import torch

    wanted, running = os.environ["ATEN_CPU_CAPABILITY"].upper(), torch.backends.cpu.get_cpu_capability().upper()
    if running != wanted:
        print(f"autocomp: warning: torch computed before autocomp was imported, so it runs this CPU's {running} "
              f"kernels, not {wanted}: its teachers, cache keys and recipes differ from the CLI's. Import autocomp "
              "before computing with torch, or start Python with "
              + " ".join(f"{k}={v}" for k, v in PINNED.items()) + ".", file=sys.stderr)


def in_use() -> str:
    """The kernels this process computes with, as a fingerprint records them: ATen's capability and MKL's
    code-path setting (``native`` when none is set)."""
    import torch

    return f"aten {torch.backends.cpu.get_cpu_capability().lower()}, mkl {os.environ.get('MKL_CBWR', 'native')}"
