"""torch's kernels held to AVX2 before torch loads, recorded in a task's fingerprint, and left alone on request."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from autocomp import kernels

PROBE = ("import autocomp, os, torch; from autocomp import kernels; "
         "print(torch.backends.cpu.get_cpu_capability(), os.environ.get('MKL_CBWR'), kernels.in_use(), sep='|')")


def probe(**env: str) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if k not in kernels.PINNED and k != kernels.NATIVE}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout
    return out.strip().split("|")


@pytest.mark.skipif(not kernels.has_avx2(), reason="pinning applies to x86-64 CPUs with AVX2")
def test_importing_autocomp_holds_torch_to_avx2_kernels_unless_told_not_to():
    assert probe() == ["AVX2", "AVX2", "aten avx2, mkl AVX2"]
    native = probe(**{kernels.NATIVE: "1"})
    assert native[1] == "None" and native[2] == f"aten {native[0].lower()}, mkl native"
    assert probe(MKL_CBWR="COMPATIBLE")[1:] == ["COMPATIBLE", "aten avx2, mkl COMPATIBLE"]  # a user's own setting


def test_a_fingerprint_records_the_kernels_in_use(digits_task):
    assert digits_task.fingerprint()["kernels"] == kernels.in_use()
    if kernels.has_avx2():
        assert kernels.in_use() == "aten avx2, mkl AVX2"  # this test process, too, imported autocomp first


@pytest.mark.skipif(not kernels.has_avx2(), reason="pinning applies to x86-64 CPUs with AVX2")
def test_a_script_that_imports_torch_first_gets_the_same_kernels_or_one_line_naming_the_fix():
    clean = {k: v for k, v in os.environ.items() if k not in kernels.PINNED and k != kernels.NATIVE}

    def run(code: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)

    first = run("import torch; import autocomp; from autocomp import kernels; print(kernels.in_use())")
    assert first.stdout.strip() == "aten avx2, mkl AVX2" and first.stderr == ""  # the CLI's kernels, whatever the order
    native = run("import torch; print(torch.backends.cpu.get_cpu_capability())").stdout.strip()
    late = run("import torch; torch.ones(8).sum(); import autocomp; from autocomp import kernels; "
               "print(kernels.in_use())")
    if native == "AVX2":  # this CPU's own kernels are AVX2: computing first changes nothing
        assert late.stderr == ""
        return
    assert late.stdout.strip().startswith(f"aten {native.lower()}")
    assert late.stderr == (f"autocomp: warning: torch computed before autocomp was imported, so it runs this CPU's "
                           f"{native} kernels, not AVX2: its teachers, cache keys and recipes differ from the CLI's. "
                           "Import autocomp before computing with torch, or start Python with "
                           "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_CBWR=AVX2.\n")
