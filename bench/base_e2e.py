"""The 150M checkpoint path end to end: `model.preset=base` (CIDAS/clipseg-rd64-refined's architecture,
150,747,746 parameters, from scratch) at the smallest settings through the real pipeline:
train -> evaluate -> registered MLflow model -> `drywall-qa predict --model models:/...`.

    python bench/base_e2e.py                    # ~10 minutes on 2 CPU cores; writes bench/base_e2e.json

It copies this working tree into a temp git repo (as the tests do), runs `dvc repro` there with a
small synthetic data set and one epoch, then records:
- wall time of each stage (MLflow `stage_seconds`) and of the whole run, and the peak RSS of the
  largest stage process (`getrusage(RUSAGE_CHILDREN)`);
- the checkpoint's bytes: in `models/clipseg/best/`, in the DVC cache, in MLflow's artifact store,
  and how many copies of the weights each holds (1 in each: nothing logged twice);
- that `drywall-qa predict` on the registered version writes one mask per prompt.
Not part of CI (too slow for it); its numbers are this file's output, not copied anywhere by hand.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ruamel.yaml import YAML

REPO = Path(__file__).resolve().parents[1]
SMALL = {
    ("data", "synthetic", "source_images"): 6,
    ("data", "synthetic", "image_size"): 64,
    ("model", "preset"): "base",
    ("model", "image_size"): 64,
    ("train", "epochs"): 1,
    ("train", "batch_size"): 4,
    ("evaluate", "zero_shot"): False,
    ("evaluate", "timing_images"): 4,
    ("visualize", "examples_per_prompt"): 1,
    ("visualize", "worst_k"): 1,
    ("cpu_numerics",): "native",
}


def copy_repo(root: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    yaml = YAML()
    params = yaml.load((root / "params.yaml").read_text())
    for keys, value in SMALL.items():
        node = params
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    with open(root / "params.yaml", "w") as handle:
        yaml.dump(params, handle)
    for command in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "base"],
    ):
        subprocess.run(command, cwd=root, check=True)


def weights_files(folder: Path, size: int) -> list[Path]:
    """Files under `folder` of the weights' size (+-1%): copies of the checkpoint, whatever their name."""
    return [p for p in folder.rglob("*") if p.is_file() and abs(p.stat().st_size - size) <= size * 0.01]


def main() -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("DVC_ROOT", None)
    with tempfile.TemporaryDirectory(prefix="drywall-base-e2e-") as temp:
        root = Path(temp)
        copy_repo(root)
        started = time.perf_counter()
        repro = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if repro.returncode != 0:
            print(repro.stdout[-4000:], repro.stderr[-4000:])
            return 1
        peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
        best = root / "models" / "clipseg" / "best"
        weights = (best / "model.safetensors").stat().st_size
        masks = root / "masks"
        predict = subprocess.run(
            [sys.executable, "-m", "drywall_qa.cli", "predict", "--model", "models:/drywall-qa-clipseg/1"]
            + ["--out", str(masks), str(next((root / "data" / "raw" / "cracks").rglob("*.jpg")))],
            cwd=root,
            env={**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"},
            capture_output=True,
            text=True,
        )
        train = json.loads((root / "metrics" / "train.json").read_text())
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("drywall-qa")
        stage_seconds = {
            run.info.run_name: round(run.data.metrics.get("stage_seconds", float("nan")), 1)
            for run in client.search_runs([experiment.experiment_id], "tags.stage != ''")
        }
        result = {
            "preset": "base",
            "params": train["params"],
            "settings": {".".join(k): v for k, v in SMALL.items()},
            "wall_seconds": round(wall, 1),
            "stage_seconds": stage_seconds,
            "peak_rss_bytes_largest_stage": peak_rss,
            "checkpoint_bytes": {
                "models/clipseg/best": sum(p.stat().st_size for p in best.rglob("*") if p.is_file()),
                "model.safetensors": weights,
                "dvc_cache": sum(p.stat().st_size for p in (root / ".dvc" / "cache").rglob("*") if p.is_file()),
                "mlflow_artifacts": sum(p.stat().st_size for p in (root / "mlartifacts").rglob("*") if p.is_file()),
                "train_work_folder (not tracked)": sum(
                    p.stat().st_size for p in (root / "data" / "cache" / "train").rglob("*") if p.is_file()
                ),
            },
            "weights_copies": {
                "dvc_cache": len(weights_files(root / ".dvc" / "cache", weights)),
                "mlflow_artifacts": len(weights_files(root / "mlartifacts", weights)),
            },
            "predict_exit_code": predict.returncode,
            "predict_masks": len(list(masks.glob("*.png"))),
        }
    out = REPO / "bench" / "base_e2e.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if predict.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
