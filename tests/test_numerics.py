"""Portable CPU numerics: the settings reach torch, and misuse fails loudly."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from drywall_qa.numerics import PORTABLE_ENVIRONMENT, NumericsError, configure_cpu_numerics

PROBE = """
import json, sys
from drywall_qa.numerics import configure_cpu_numerics, describe_cpu_numerics
configure_cpu_numerics(sys.argv[1])
import torch
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                  "mkldnn": torch.backends.mkldnn.enabled, "described": describe_cpu_numerics()}))
"""


def run_probe(mode: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in PORTABLE_ENVIRONMENT}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environment, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="ATen's AVX2 kernels exist on x86-64 only")
def test_portable_numerics_pin_aten_to_avx2_and_switch_off_onednn():
    probe = run_probe("portable")
    assert probe == {"capability": "AVX2", "mkldnn": False, "described": "portable"}


def test_native_numerics_change_nothing():
    probe = run_probe("native")
    assert probe["mkldnn"] is True
    assert probe["described"] == "native"


def test_portable_numerics_after_torch_import_is_refused():
    import torch  # noqa: F401  (pytest's process has it already; the point is that it is loaded)

    with pytest.raises(NumericsError, match="before torch is imported"):
        configure_cpu_numerics("portable")


def test_unknown_mode_is_refused():
    with pytest.raises(NumericsError, match="portable.*native"):
        configure_cpu_numerics("fast")


def test_stages_make_idle_openmp_threads_sleep_unless_the_user_chose():
    import subprocess
    import sys

    code = (
        "import os; from drywall_qa.numerics import configure_cpu_numerics; "
        "configure_cpu_numerics('{mode}'); print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    for mode in ("native", "portable"):
        out = subprocess.run([sys.executable, "-c", code.format(mode=mode)], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == "PASSIVE", out.stderr
    chosen = subprocess.run(
        [sys.executable, "-c", code.format(mode="native")],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
    )
    assert chosen.stdout.strip() == "ACTIVE"
