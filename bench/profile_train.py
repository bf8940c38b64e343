"""Where a training step of the real recipe spends its time, before and after the speed levers.

    python bench/profile_train.py                 # 24 steps per path and round, 2 rounds, real data
    python bench/profile_train.py --steps 8 --rounds 1 --no-busy   # a quick look

The real recipe is `scripts/run_real.sh`'s `-S` settings over params.yaml; the data is the real train
split, made by the pipeline's own download -> convert -> split stages from `../shared/realdata` into
`--workspace` (once; reused when it is there). Each path trains its own copy of the recipe's model
in this process, and the paths take turns (round 1: before, after; round 2: before, after...), so a
noisy machine slows both alike. Every step is split into:

data (the loader's next batch), vision forward, decoder forward (all of the batch's pairs), loss,
backward, optimizer (clip, step, schedule, weight average); validation is timed once per path
over the whole val split. Photos are decoded and resized once before the clock starts, as epoch 1 does
for every later epoch. CPU use is process CPU seconds / wall seconds over the steps.

Seconds per epoch = mean step x steps per epoch + validation. `busy`: the after path again, beside
one single-threaded NumPy process (bench_busy.py's setting). Results: a markdown table on stdout
and `--out` JSON. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
PARTS = ("data", "vision", "decoder", "loss", "backward", "optimizer")
# the levers each path uses: `before` is the recipe as it was, `after` is the recipe with the kept levers
PATHS = {"before": {"sample_prompts": False}, "after": {"sample_prompts": True}}


def recipe_settings(script: Path = REPO / "scripts" / "run_real.sh") -> dict[str, str]:
    """`run_real.sh`'s `-S key=value` settings, as written there."""
    return dict(re.findall(r"^\s+-S '?([\w.]+)=([^'\s]*)'?\s*$", script.read_text(), flags=re.M))


def recipe_params(threads: int) -> dict[str, Any]:
    from ruamel.yaml import YAML

    from drywall_qa.params import load_params

    params = load_params(REPO / "params.yaml")
    for dotted, value in recipe_settings().items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node[key]
        node[last] = YAML(typ="safe").load(value.replace('"$threads"', str(threads)))
    return params


def prepare_real_split(workspace: Path, shared: Path) -> Path:
    """`workspace/data/manifest.csv` of the real exports, made by the pipeline's stages (once)."""
    manifest = workspace / "data" / "manifest.csv"
    if manifest.is_file():
        return manifest
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout.decode()
    for name in filter(None, listed.split("\0")):
        (workspace / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, workspace / name)
    from ruamel.yaml import YAML

    yaml = YAML()
    params = yaml.load((workspace / "params.yaml").read_text())
    params["data"]["source"] = "local"
    params["data"]["local"]["datasets"] = {
        "cracks": str(shared / "realdata" / "cracks-3ii36"),
        "taping": str(shared / "realdata" / "drywall-join-detect"),
    }
    with open(workspace / "params.yaml", "w") as handle:
        yaml.dump(params, handle)
    env = {
        **os.environ,
        "PYTHONPATH": str(workspace / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace}/mlflow.db",
    }
    for stage in ("download", "convert", "split"):
        subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=workspace, env=env, check=True)
    return manifest


class Trainer:
    """One path: the recipe's model, data, optimizer and weight average, as `train()` builds them."""

    def __init__(self, params: dict[str, Any], levers: dict[str, Any], manifest: Path, root: Path):
        from torch.utils.data import DataLoader

        from drywall_qa.contracts.manifest import prompt_order
        from drywall_qa.data import collate_pairs
        from drywall_qa.training.config import TrainConfig
        from drywall_qa.training.forward import PairForward, weight_average
        from drywall_qa.training.loop import build_datasets, initial_model, make_optimizer, read_splits

        self.config = TrainConfig.from_params(params).changed(train=levers)
        prompts, train_records, val_records = read_splits(self.config, manifest, root)
        self.model, processor = initial_model(self.config, None, train_records, prompt_order(prompts), lambda _: None)
        self.train_set, self.val_set = build_datasets(
            self.config, self.model, processor, prompts, train_records, val_records
        )
        self.steps_per_epoch = math.ceil(len(self.train_set) / self.config.train.batch_size)
        self.optimizer, self.scheduler = make_optimizer(self.model, self.config, self.steps_per_epoch, lambda _: None)
        self.average = weight_average(self.model, self.config.train.ema_decay)
        self.forward = PairForward(self.model, processor, self.train_set.prompt_list, self.model.device, None)
        self.val_forward = PairForward(
            self.average.module if self.average else self.model,
            processor,
            self.train_set.prompt_list,
            self.model.device,
            None,
        )
        self.epoch = 0
        import torch

        self.loader = lambda: iter(
            DataLoader(
                self.train_set,
                batch_size=self.config.train.batch_size,
                shuffle=True,
                collate_fn=collate_pairs,
                generator=torch.Generator().manual_seed(self.epoch),
            )
        )
        self.batches = self.loader()

    def next_batch(self):
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.train_set.set_epoch(self.epoch)
            self.batches = self.loader()
            return next(self.batches)

    def step(self) -> dict[str, float]:
        """One training step, the way `training.loop.train_epoch` takes it, with a clock between its parts."""
        import torch

        from drywall_qa.model import decode, encode_images, pair_activations, resize_logits
        from drywall_qa.training.losses import pair_loss

        times, clock = {}, time.perf_counter()

        def lap(part: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[part], clock = now - clock, now

        self.model.train()
        batch = self.next_batch()
        lap("data")
        activations = encode_images(self.model, batch["pixel_values"])
        lap("vision")
        conditional = self.forward.conditionals()[batch["prompt_index"]]
        logits = decode(self.model, pair_activations(activations, batch["image_index"]), conditional)
        logits = resize_logits(logits.float(), tuple(batch["masks"].shape[-2:]))
        lap("decoder")
        loss = pair_loss(logits, batch["masks"], batch["prompt_index"], self.train_set, self.config)
        lap("loss")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lap("backward")
        torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], self.config.train.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.average is not None:
            self.average.update_parameters(self.model)
        lap("optimizer")
        times["pairs"] = len(batch["masks"])
        return times

    def validation_seconds(self) -> tuple[float, dict[str, float]]:
        from drywall_qa.training.loop import validate

        started = time.perf_counter()
        scores = validate(self.val_forward, self.val_set, self.config, {"num_workers": 0})
        return time.perf_counter() - started, scores


def timed_steps(trainer: Trainer, steps: int) -> dict[str, Any]:
    import psutil

    process = psutil.Process()
    cpu_before, wall_before = sum(process.cpu_times()[:2]), time.perf_counter()
    rows = [trainer.step() for _ in range(steps)]
    wall = time.perf_counter() - wall_before
    cpu = sum(process.cpu_times()[:2]) - cpu_before
    return {"rows": rows, "wall": wall, "cpu_percent": 100 * cpu / wall}


def busy_process() -> subprocess.Popen:
    from bench_busy import BUSY_CODE

    return subprocess.Popen([sys.executable, "-c", BUSY_CODE])


def summarise(runs: list[dict[str, Any]], trainer: Trainer, validation: float) -> dict[str, Any]:
    rows = [row for run in runs for row in run["rows"]]
    step = sum(run["wall"] for run in runs) / len(rows)
    parts = {part: sum(row[part] for row in rows) / len(rows) for part in PARTS}
    return {
        "steps": len(rows),
        "seconds_per_step": round(step, 4),
        "pairs_per_step": round(sum(row["pairs"] for row in rows) / len(rows), 1),
        "share": {part: round(seconds / step, 3) for part, seconds in parts.items()},
        "cpu_percent": round(sum(run["cpu_percent"] * run["wall"] for run in runs) / sum(r["wall"] for r in runs), 1),
        "steps_per_epoch": trainer.steps_per_epoch,
        "validation_seconds": round(validation, 1),
        "seconds_per_epoch": round(step * trainer.steps_per_epoch + validation, 1),
        "validation_share_of_epoch": round(validation / (step * trainer.steps_per_epoch + validation), 3),
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    from drywall_qa.numerics import configure_cpu_numerics

    params = recipe_params(args.threads)
    configure_cpu_numerics(params["cpu_numerics"])  # before torch loads: its OpenMP reads the wait policy once
    import torch

    torch.set_num_threads(args.threads)
    manifest = prepare_real_split(args.workspace, args.shared)
    trainers = {name: Trainer(params, levers, manifest, args.workspace) for name, levers in PATHS.items()}
    first = next(iter(trainers.values()))
    for dataset in (first.train_set, first.val_set):  # what epoch 1 decodes once; later epochs reuse it
        for index in range(len(dataset)):
            dataset._load_resized(index)
    for trainer in trainers.values():
        trainer.train_set._resized, trainer.val_set._resized = first.train_set._resized, first.val_set._resized
        timed_steps(trainer, 2)  # warm-up: first-call allocations
    runs: dict[str, list] = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, trainer in trainers.items():
            runs[name].append(timed_steps(trainer, args.steps))
    results = {}
    for name, trainer in trainers.items():
        seconds, _ = trainer.validation_seconds()
        results[name] = summarise(runs[name], trainer, seconds) | {"levers": PATHS[name]}
    if args.busy:
        blocker = busy_process()
        try:
            busy = [timed_steps(trainers["after"], args.steps) for _ in range(args.rounds)]
        finally:
            blocker.kill()
        results["after_busy"] = summarise(busy, trainers["after"], results["after"]["validation_seconds"])
    return results


def table(results: dict[str, Any]) -> str:
    names = list(results)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for part in PARTS:
        lines.append(f"| {part} | " + " | ".join(f"{results[n]['share'][part]:.1%}" for n in names) + " |")
    for key in ("pairs_per_step", "seconds_per_step", "cpu_percent", "validation_seconds", "seconds_per_epoch"):
        lines.append(f"| {key} | " + " | ".join(str(results[n][key]) for n in names) + " |")
    before = results["before"]["seconds_per_epoch"]
    ratios = {n: round(results[n]["seconds_per_epoch"] / before, 3) for n in names}
    lines.append("| epoch time / before | " + " | ".join(str(ratios[n]) for n in names) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-busy", dest="busy", action="store_false")
    parser.add_argument("--workspace", type=Path, default=Path("/tmp/drywall-qa-profile-real"))
    parser.add_argument("--shared", type=Path, default=REPO.parent / "shared")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "profile_results.json")
    args = parser.parse_args()
    started = time.perf_counter()
    results = measure(args)
    document = {
        "settings": {key: str(value) for key, value in vars(args).items()},
        "recipe": recipe_settings(),
        "cpu": os.cpu_count(),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "results": results,
    }
    from drywall_qa.contracts.atomic import write_json_atomic

    write_json_atomic(args.out, document)
    print(table(results))


if __name__ == "__main__":
    main()
