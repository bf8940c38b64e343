"""The default training's epoch time alone and beside a busy single-threaded process, per OpenMP
wait policy: what a shared 2-core machine (a CI runner, a laptop with a browser) does to `dvc repro`.

    python bench/bench_busy.py              # params.yaml's default training, 3 epochs per run
    python bench/bench_busy.py --epochs 2   # shorter

Each run is a fresh Python process that trains params.yaml's default model (preset, image size,
thread count, cpu_numerics) on the default synthetic data, built once as the pipeline builds it.
`busy` starts a process that keeps one core busy with single-threaded NumPy matrix products for the
whole run. OpenMP's ACTIVE policy spins idle threads waiting for work; PASSIVE (what the stages set,
`drywall_qa.numerics`) lets them sleep. Results: a markdown table on stdout and `--out` JSON.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

BUSY_CODE = """
import os
os.environ["OMP_NUM_THREADS"] = os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
import numpy as np
a = np.random.default_rng(0).random((400, 400))
while True:
    a = (a @ a) / 400.0
"""

TRAIN_CODE = """
import json, sys, time
from drywall_qa.numerics import configure_cpu_numerics
from drywall_qa.params import load_params
params = load_params(sys.argv[1])
configure_cpu_numerics(params["cpu_numerics"])
from drywall_qa.training.config import TrainConfig
from drywall_qa.training.loop import train
workdir = sys.argv[2]
params["train"]["epochs"] = int(sys.argv[3])
params["train"]["early_stopping_patience"] = 1000
config = TrainConfig.from_params(params)
out = workdir + "/run-" + str(time.time_ns())
train(config, workdir + "/data/manifest.csv", out + "/models", out + "/train.json", out + "/history.csv",
      root=workdir, progress=False, log=lambda _: None,
      on_epoch=lambda row: print(json.dumps({"epoch_seconds": row["seconds"]}), flush=True))
"""


def run(workdir: Path, epochs: int, wait_policy: str, busy: bool, timeout: float) -> tuple[list[float], bool]:
    """Epoch seconds of one training run, and whether it was stopped at `timeout` (then the epochs
    it finished, or none)."""
    env = {**os.environ, "OMP_WAIT_POLICY": wait_policy}
    blocker = subprocess.Popen([sys.executable, "-c", BUSY_CODE]) if busy else None
    try:
        if blocker is not None:
            time.sleep(1.0)  # let it reach its loop
        try:
            result = subprocess.run(
                [sys.executable, "-c", TRAIN_CODE, str(REPO / "params.yaml"), str(workdir), str(epochs)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
                timeout=timeout,
            )
            stdout, timed_out = result.stdout, False
        except subprocess.TimeoutExpired as expired:
            stdout, timed_out = (
                (expired.stdout or b"").decode() if isinstance(expired.stdout, bytes) else (expired.stdout or ""),
                True,
            )
    finally:
        if blocker is not None:
            blocker.kill()
            blocker.wait()
    seconds = [json.loads(line)["epoch_seconds"] for line in stdout.splitlines() if line.startswith("{")]
    return seconds, timed_out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "busy_results.json")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before a run is stopped")
    args = parser.parse_args()

    from bench_train import BenchSettings, prepare_data

    from drywall_qa.params import load_params

    params = load_params(REPO / "params.yaml")
    synthetic = params["data"]["synthetic"]
    settings = BenchSettings(
        mode="busy",
        preset=params["model"]["preset"],
        image_size=params["model"]["image_size"],
        epochs=args.epochs,
        naive_epochs=0,
        source_images={"cracks": synthetic["source_images"], "taping": synthetic["source_images"]},
        synthetic_image_size=synthetic["image_size"],
        inference_images=0,
        inference_repeats=0,
        threads=params["train"]["num_threads"],
        device="cpu",
    )
    results = {"epochs": args.epochs, "threads": params["train"]["num_threads"], "cpus": os.cpu_count(), "runs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-busy-") as work:
        workdir = Path(work)
        prepare_data(workdir, settings, params["prompts"], params["seed"])
        for policy in ("ACTIVE", "PASSIVE"):
            for busy in (False, True):
                seconds, timed_out = run(workdir, args.epochs, policy, busy, args.timeout)
                # epoch 1 also decodes the images into memory: the later epochs are the steady state;
                # a run stopped before any epoch ended counts its whole time as one epoch (a lower bound)
                steady = seconds[1:] or seconds or [args.timeout]
                results["runs"][f"{policy.lower()}_{'busy' if busy else 'alone'}"] = {
                    "epoch_seconds": [round(s, 2) for s in seconds],
                    "timed_out": timed_out,
                    "steady_epoch_seconds": round(sum(steady) / len(steady), 2),
                }
                print(
                    f"{policy} {'busy' if busy else 'alone'}: {seconds}{' (stopped at the timeout)' if timed_out else ''}",
                    file=sys.stderr,
                    flush=True,
                )
    runs = results["runs"]
    lines = [
        "| OpenMP wait policy | epoch alone (s) | epoch beside a busy process (s) | slow-down |",
        "|---|---|---|---|",
    ]
    for policy in ("active", "passive"):
        alone, busy = runs[f"{policy}_alone"]["steady_epoch_seconds"], runs[f"{policy}_busy"]["steady_epoch_seconds"]
        results[f"{policy}_slowdown"] = round(busy / alone, 2)
        bound = (
            ">= " if runs[f"{policy}_busy"]["timed_out"] and len(runs[f"{policy}_busy"]["epoch_seconds"]) < 2 else ""
        )
        lines.append(f"| {policy.upper()} | {alone:.1f} | {bound}{busy:.1f} | {bound}{busy / alone:.2f}x |")
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))
    print(
        f"\n{results['threads']} torch threads on {results['cpus']} CPUs, {args.epochs} epochs per run "
        f"(epoch 1 left out of the mean); written to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
