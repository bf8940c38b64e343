"""CPU numerics that give the same bits on every x86-64 CPU with AVX2, or the CPU's fastest kernels.

Training from scratch amplifies the last-bit differences between CPU kernels: the default pipeline
trained on an AMD EPYC and on the machine that made the previous baseline differed by 6e-6 in val
mIoU after one epoch and by 0.15 in crack test mIoU after 36. A regression gate against a baseline
made on another machine is then noise. Three libraries pick their kernels by CPU:

- ATen's vectorised kernels (`ATEN_CPU_CAPABILITY`): pinned to the AVX2 build, which every x86-64
  CPU since 2013-2015 runs, so AVX-512 machines do not take another reduction order;
- oneMKL's GEMM (`MKL_CBWR`): `COMPATIBLE` is its documented code path with identical results on
  Intel and non-Intel CPUs (`AVX2` is honoured on Intel CPUs only);
- oneDNN's convolutions: switched off (JIT kernels blocked by ISA and cache size); convolutions then
  run through ATen and MKL.

The environment variables are read once, when the libraries initialise, so `configure_cpu_numerics`
must run before anything imports torch. On a GPU only the CPU side is affected. The cost is measured
in docs/numerics.md (1.8x the training time of the default model on 2 cores).
"""

from __future__ import annotations

import os
import sys

from drywall_qa.errors import DrywallQAError

CPU_NUMERICS = ("portable", "native")
# MKL_DYNAMIC=FALSE: MKL otherwise may use fewer threads than asked when the machine is busy, and a
# GEMM split over another thread count sums in another order: a busy CI runner would drift from the
# baseline an idle one made.
PORTABLE_ENVIRONMENT = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "MKL_DYNAMIC": "FALSE"}


class NumericsError(DrywallQAError, RuntimeError):
    """An unknown mode, or portable numerics asked for after torch was imported."""


def configure_cpu_numerics(mode: str) -> None:
    """`portable`: the settings above (call before torch is imported); `native`: the CPU's own kernels.

    Both make idle OpenMP threads sleep instead of spin (`OMP_WAIT_POLICY=PASSIVE`, unless set):
    with another busy process on a 2-core machine, spinning threads steal the core the working thread
    needs (an epoch was once seen taking 97-400 s instead of ~14 s). bench/bench_busy.py measures it
    (bench/busy_results.json). The wait policy changes no result, only who gets the core.
    """
    if mode not in CPU_NUMERICS:
        raise NumericsError(f"cpu_numerics must be one of {CPU_NUMERICS}, got {mode!r}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if mode == "native":
        return
    if "torch" in sys.modules:
        raise NumericsError("portable cpu_numerics must be configured before torch is imported")
    os.environ.update(PORTABLE_ENVIRONMENT)
    import torch

    torch.backends.mkldnn.enabled = False


def describe_cpu_numerics() -> str:
    """`portable` when the settings above are in force in this process, else `native`."""
    import torch

    portable = all(os.environ.get(key) == value for key, value in PORTABLE_ENVIRONMENT.items())
    return "portable" if portable and not torch.backends.mkldnn.enabled else "native"
