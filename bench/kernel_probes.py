"""CPU-side settings that could speed up a training step of the real recipe without changing the model.

    python bench/kernel_probes.py                 # 16 steps per setting and round, 2 rounds, real data
    python bench/kernel_probes.py --steps 4 --rounds 1   # a quick look

Each probe is a setting that leaves the trained model the same (or the same up to float rounding),
timed against the plain step in the same run, the two taking turns so that a noisy machine slows both:

- `flush_denormal`: `torch.set_flush_denormal(True)`. Subnormal floats are slow on x86; if the weights,
  gradients or optimizer state drifted into them over a long run, epochs would slow down over time.
  The probe also counts the subnormal values in them.
- `sdpa_math`: attention through PyTorch's plain (math) kernel instead of its CPU flash kernel.
- `malloc_no_trim` (a child process per setting): glibc's malloc told not to return freed memory to the
  kernel (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`), so large tensors stop being mapped and
  faulted in anew each step. User and system CPU shares are reported beside the step time.

It also summarises the seconds per epoch of the committed real runs (`metrics/*/train_history.csv`),
for how much the same recipe's epochs vary between runs and within one.

The model is the real recipe's (`scripts/run_real.sh`), trained with all its pairs, on the real train
split that `bench/profile_train.py` prepares. Results: a markdown table on stdout and `--out` JSON.
Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
MALLOC_NO_TRIM = {"MALLOC_MMAP_THRESHOLD_": str(2**25), "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def subnormal_counts(trainer: Any) -> dict[str, int]:
    """Non-zero values below float32's smallest normal number, in the weights, gradients and Adam state."""
    import torch

    tiny = torch.finfo(torch.float32).tiny

    def count(tensors) -> int:
        return sum(int(((t != 0) & (t.abs() < tiny)).sum()) for t in tensors if t is not None)

    parameters = list(trainer.model.parameters())
    state = [value for entry in trainer.optimizer.state.values() for value in entry.values() if value.dim() > 0]
    return {
        "weights": count(p.detach() for p in parameters),
        "gradients": count(p.grad for p in parameters),
        "optimizer_state": count(state),
        "values": sum(p.numel() for p in parameters),
    }


def timed(trainer: Any, steps: int) -> dict[str, float]:
    """Seconds per step, and user and system CPU as percentages of wall time."""
    import psutil

    process = psutil.Process()
    before, started = process.cpu_times(), time.perf_counter()
    for _ in range(steps):
        trainer.step()
    wall = time.perf_counter() - started
    after = process.cpu_times()
    return {
        "seconds_per_step": wall / steps,
        "user_percent": 100 * (after.user - before.user) / wall,
        "system_percent": 100 * (after.system - before.system) / wall,
    }


def mean_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.fmean(run[key] for run in runs), 4) for key in runs[0]}


def build_trainer(args: argparse.Namespace) -> Any:
    import profile_train

    from drywall_qa.numerics import configure_cpu_numerics

    params = profile_train.recipe_params(args.threads)
    configure_cpu_numerics(params["cpu_numerics"])
    import torch

    torch.set_num_threads(args.threads)
    manifest = profile_train.prepare_real_split(args.workspace, args.shared)
    trainer = profile_train.Trainer(params, {"sample_prompts": False}, manifest, args.workspace)
    for index in range(len(trainer.train_set)):  # decoded once, as epoch 1 does for every later epoch
        trainer.train_set._load_resized(index)
    timed(trainer, 2)  # first-call allocations
    return trainer


def in_process_probes(args: argparse.Namespace) -> dict[str, Any]:
    trainer = build_trainer(args)  # first: torch must load after the numerics' OpenMP wait policy is set
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    @contextlib.contextmanager
    def flushing():
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)

    settings = {
        "plain": contextlib.nullcontext,
        "flush_denormal": flushing,
        "sdpa_math": lambda: sdpa_kernel([SDPBackend.MATH]),
    }
    runs: dict[str, list] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, setting in settings.items():
            with setting():
                runs[name].append(timed(trainer, args.steps))
    return {"subnormal": subnormal_counts(trainer), "settings": {name: mean_runs(r) for name, r in runs.items()}}


def malloc_probe(args: argparse.Namespace) -> dict[str, Any]:
    """The plain step in child processes, with glibc's defaults and without trimming, taking turns."""
    runs: dict[str, list] = {"malloc_default": [], "malloc_no_trim": []}
    for _ in range(args.rounds):
        for name in runs:
            environment = {k: v for k, v in os.environ.items() if k not in MALLOC_NO_TRIM}
            if name == "malloc_no_trim":
                environment |= MALLOC_NO_TRIM
            command = [sys.executable, __file__, "--child", "--steps", str(args.steps), "--threads", str(args.threads)]
            command += ["--workspace", str(args.workspace), "--shared", str(args.shared)]
            output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
            runs[name].append(json.loads(output.strip().splitlines()[-1]))
    return {name: mean_runs(r) for name, r in runs.items()}


def epoch_seconds_of_runs(metrics: Path = REPO / "metrics") -> dict[str, dict[str, float]]:
    """Per committed run of the recipe's family: seconds per epoch, first epoch excluded (it decodes the photos)."""
    summary = {}
    for history in sorted(metrics.glob("real*/**/train_history.csv")):
        with open(history) as handle:
            seconds = [float(row["seconds"]) for row in csv.DictReader(handle)][1:]
        if len(seconds) >= 10:
            half = len(seconds) // 2
            summary[str(history.parent.relative_to(REPO))] = {
                "epochs": len(seconds) + 1,
                "min": round(min(seconds), 1),
                "median": round(statistics.median(seconds), 1),
                "max": round(max(seconds), 1),
                "median_first_half": round(statistics.median(seconds[:half]), 1),
                "median_second_half": round(statistics.median(seconds[half:]), 1),
            }
    return summary


def table(results: dict[str, Any]) -> str:
    rows = results["in_process"]["settings"] | results["malloc"]
    lines = ["| setting | s/step | user CPU % | system CPU % | step time / its baseline |", "|---|---|---|---|---|"]
    for name, row in rows.items():
        baseline = rows["malloc_default" if name.startswith("malloc") else "plain"]["seconds_per_step"]
        lines.append(
            f"| {name} | {row['seconds_per_step']:.3f} | {row['user_percent']:.0f} | {row['system_percent']:.0f} "
            f"| {row['seconds_per_step'] / baseline:.3f} |"
        )
    lines += ["", f"subnormal values after the probes: {results['in_process']['subnormal']}", ""]
    lines += [
        "| run | epochs | s/epoch min | median | max | median, first half | second half |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, row in results["epoch_seconds_of_runs"].items():
        lines.append(
            f"| {run} | {row['epochs']} | {row['min']} | {row['median']} | {row['max']} "
            f"| {row['median_first_half']} | {row['median_second_half']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/drywall-qa-profile-real"))
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "kernel_probes_results.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one malloc setting: the plain step, its numbers as the last line
        print(json.dumps(timed(build_trainer(args), args.steps)))
        return
    started = time.perf_counter()
    results = {
        "in_process": in_process_probes(args),
        "malloc": malloc_probe(args),
        "epoch_seconds_of_runs": epoch_seconds_of_runs(),
    }
    document = {
        "settings": {key: str(value) for key, value in vars(args).items() if key != "child"},
        "cpu": os.cpu_count(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    from drywall_qa.contracts.atomic import write_json_atomic

    write_json_atomic(args.out, document)
    print(table(results))


if __name__ == "__main__":
    main()
