"""Training checkpoints: `best/` and `last/` as `save_pretrained` folders written atomically, the
resume state they carry, recovery from a kill mid-write, and the training history file.

`last/` also holds the optimizer, scheduler and RNG state, so a killed run resumes where it stopped
when its config fingerprint (params and manifest) matches. Both live in a work folder; the pipeline's
model (what DVC hashes) is `publish_checkpoint`'s copy of `best/` without the run-specific state
(wall times, the MLflow run id), so the same training gives the same bytes and DVC hash.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from drywall_qa.contracts.atomic import write_text_atomic

HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr", "seconds"]
STATE_FILE = "training_state.json"
OPTIMIZER_FILE = "optimizer_state.pt"
RUN_SPECIFIC_STATE = ("run", "mlflow_run_id")  # differ between two runs of one config: not published


def _tmp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def recover_checkpoints(output_dir: Path, log: Callable[[str], None] = print) -> None:
    """Undo what a kill in the middle of `save_checkpoint` left: a half-swapped folder or temp dirs."""
    if not output_dir.is_dir():
        return
    for name in ("best", "last"):
        old = output_dir / f".{name}.old"
        if old.is_dir():
            if (output_dir / name).is_dir():
                shutil.rmtree(old)  # the new folder was swapped in; only the deletion was missed
            else:
                os.rename(old, output_dir / name)
                log(f"train: restored {name}/ from an interrupted checkpoint swap")
    for leftover in output_dir.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def save_checkpoint(
    output_dir: Path,
    name: str,
    model,
    processor,
    state: dict[str, Any],
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `output_dir/name/` atomically: build it in a temp dir, then rename old away, new in, delete old."""
    output_dir.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(name), dir=output_dir))
    temp.chmod(0o755)  # mkdtemp makes it private; the checkpoint is an ordinary folder
    try:
        model.save_pretrained(temp)
        processor.save_pretrained(temp)
        if optimizer_state is not None:
            torch.save(optimizer_state, temp / OPTIMIZER_FILE)
        (temp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _swap_in(temp, output_dir, name)


def publish_checkpoint(checkpoint: Path, output_dir: Path, name: str = "best") -> Path:
    """Copy `checkpoint` to `output_dir/name` atomically, its state without `RUN_SPECIFIC_STATE`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(name), dir=output_dir))
    temp.chmod(0o755)
    try:
        shutil.copytree(checkpoint, temp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(OPTIMIZER_FILE))
        state = read_state(checkpoint) or {}
        published = {key: value for key, value in state.items() if key not in RUN_SPECIFIC_STATE}
        (temp / STATE_FILE).write_text(json.dumps(published, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return _swap_in(temp, output_dir, name)


def _swap_in(temp: Path, output_dir: Path, name: str) -> Path:
    """Rename the finished temp folder to `output_dir/name`: old away, new in, old deleted."""
    target, old = output_dir / name, output_dir / f".{name}.old"
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(temp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def save_epoch(
    output_dir: Path, model, processor, state: dict[str, Any], improved: bool, optimizer, scheduler, average=None
) -> None:
    """`best/` when val improved (the weight average's when there is one: that is what was
    validated), and always `last/` with the trained weights and what resuming needs."""
    if improved:
        save_checkpoint(output_dir, "best", model if average is None else average.module, processor, state)
    resume = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if average is not None:
        resume["weight_average"] = average.state_dict()
    save_checkpoint(output_dir, "last", model, processor, state, optimizer_state=resume)


def restore_optimizer(last: Path, optimizer, scheduler, average=None) -> None:
    """Optimizer, scheduler, torch RNG state (and the weight average) as `save_epoch` left them in `last/`."""
    # CPU: the RNG state must stay a CPU tensor; load_state_dict moves optimizer state to the params.
    saved = torch.load(last / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    if average is not None:
        average.load_state_dict(saved["weight_average"])


def read_state(checkpoint: Path) -> dict[str, Any] | None:
    try:
        return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def resumable_state(last: Path, fingerprint: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The state of an unfinished run of this fingerprint in `last/`, or None (with the reason logged)."""
    if not last.is_dir():
        return None
    state = read_state(last)
    if state is None or not (last / OPTIMIZER_FILE).is_file():
        log("train: last/ is incomplete; starting fresh")
        return None
    if state.get("fingerprint") != fingerprint:
        log("train: last/ was trained with other params or another manifest; starting fresh")
        return None
    if state.get("complete"):
        log("train: last/ is a finished run of this config; training again from scratch")
        return None
    return state


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    lines = [",".join(HISTORY_COLUMNS)]
    for row in history:
        lines.append(",".join(_csv_value(row[column]) for column in HISTORY_COLUMNS))
    write_text_atomic(path, "\n".join(lines) + "\n")


def _csv_value(value: Any) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, encoding="utf-8", newline="") as handle:
        return [{key: float(value) for key, value in row.items()} for row in csv.DictReader(handle)]
