"""PyTorch against ONNX Runtime on 2 CPU cores, at the real recipe's inference settings, and the
exported model in a virtualenv with only onnxruntime, numpy and Pillow.

    python bench/bench_onnx.py                 # ~3 minutes on 2 cores (pip downloads included); writes bench/onnx_results.json
    python bench/bench_onnx.py --images 8 --rounds 3 --no-clean-env     # a quicker look, no venv
    python bench/bench_onnx.py --checkpoint models/clipseg/best --no-clean-env   # a trained checkpoint's weights

The model is `scripts/run_real.sh`'s architecture and inference path: the `tiny` preset with the conv
stem [24, 48, 96, 96] at 224 px and the skip decoder [32, 16] on its stride-8 and stride-4 maps,
inference mode `resize` with left-right and top-bottom mirrors at 256 px (3 vision passes per photo),
all 5 prompts. Its weights are seeded random ones (no trained
checkpoint of the recipe is in the repo; speed does not depend on the values), or with `--checkpoint` a
trained checkpoint of that architecture (e.g. `scripts/run_real.sh`'s), whose int8 mask agreement is the
one that says what quantisation costs a user (`results["weights"]` names which). The photos are real
ones from `../shared/realdata` (synthetic 640 px photos when that is absent).

Each runtime runs in its own process with 2 threads (peak RSS is that process's; it holds the last
pass's probabilities, as the comparison needs): one warm-up batch, then passes over every photo in
batches of 8 through `predict_probs` / `onnx_predict_probs`, probabilities at the photo's size for all
5 prompts. The three processes stay open and take turns, one pass each per round (the order reversed
every other round), so that other work on the machine slows them alike; each runtime's figure is its
median pass, and every pass's time, the load average then (the bench's own 2 threads count ~2 of it)
and each round's speed ratio to PyTorch are kept. It records ms per photo, photos per second,
peak memory, file sizes, the largest probability difference and the mask pixels that differ at 0.5,
and ONNX Runtime's dynamic int8 quantisation of the MatMuls (`onnxruntime.quantization.quantize_dynamic`) with the
IoU of its masks against the float model's. With random weights, that IoU measures how far int8
moves the outputs, not the accuracy of a trained model.

The clean-env check makes a virtualenv, pip installs onnxruntime, numpy and Pillow (nothing else),
runs `python -m drywall_qa.onnx_runtime` there with `src/` on PYTHONPATH, and compares its mask PNGs
with PyTorch's at the same rules.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RESULTS = REPO / "bench" / "onnx_results.json"
PROMPTS = ["segment crack", "segment wall crack", "segment taping area", "segment joint/tape", "segment drywall seam"]
RECIPE = {"preset": "tiny", "conv_stem": [24, 48, 96, 96], "image_size": 224, "flips": ["horizontal", "vertical"]}
RECIPE |= {"sizes": [256], "skip_decoder": [32, 16]}
THREADS = 2
RUNTIMES = ("torch", "onnx", "onnx_int8")
REPLY = "bench-phase: "  # marks a worker's replies on its stdout
BATCH = 8
CLEAN_PACKAGES = ["onnxruntime", "numpy", "pillow"]


def photo_paths(count: int, workdir: Path) -> list[Path]:
    """Real photos, half cracks and half taping, sorted by name; synthetic ones without them."""
    real = REPO.parent / "shared" / "realdata"
    found = [
        sorted((real / dataset).rglob("*.jpg"))[: (count + 1) // 2]
        for dataset in ("cracks-3ii36", "drywall-join-detect")
    ]
    paths = [path for pair in zip(*found, strict=False) for path in pair][:count]
    if len(paths) == count:
        return paths
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for index in range(count):
        path = workdir / "photos" / f"synthetic{index}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (640, 640, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def prepare(workdir: Path, checkpoint: Path | None = None) -> dict:
    """The recipe's checkpoint folder (seeded random weights, or `checkpoint`'s), its ONNX export and the
    int8 quantisation, with their sizes and times."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from drywall_qa.inference import InferenceConfig
    from drywall_qa.model import build_model, load_model
    from drywall_qa.onnx_export import export_onnx

    torch.manual_seed(0)
    if checkpoint is None:
        model, processor = build_model(
            RECIPE["preset"],
            None,
            RECIPE["image_size"],
            False,
            prompts=PROMPTS,
            conv_stem=RECIPE["conv_stem"],
            skip_decoder=RECIPE["skip_decoder"],
        )
    else:
        model, processor = load_model(checkpoint)
        check_recipe_architecture(model, checkpoint)
    InferenceConfig(flips=tuple(RECIPE["flips"]), sizes=tuple(RECIPE["sizes"])).attach(model)
    model.save_pretrained(workdir / "checkpoint")
    processor.save_pretrained(workdir / "checkpoint")
    started = time.perf_counter()
    export_onnx(model, processor, workdir / "model.onnx", PROMPTS)
    exported = time.perf_counter() - started
    # MatMuls only: quantised convolutions (ConvInteger) miss ONNX Runtime's fast convolution path and
    # made the int8 graph ~1.8x slower than the float one; the MatMul-only graph is ~15% faster
    quantize_dynamic(
        workdir / "model.onnx",
        workdir / "model.int8.onnx",
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
    )
    checkpoint_bytes = sum(path.stat().st_size for path in (workdir / "checkpoint").rglob("*") if path.is_file())
    return {
        "export_seconds": round(exported, 1),
        "checkpoint_bytes": checkpoint_bytes,
        "checkpoint_weights_bytes": (workdir / "checkpoint" / "model.safetensors").stat().st_size,
        "onnx_bytes": (workdir / "model.onnx").stat().st_size,
        "onnx_int8_bytes": (workdir / "model.int8.onnx").stat().st_size,
    }


def check_recipe_architecture(model, checkpoint: Path) -> None:
    """Refuse a checkpoint whose speed would not be the recipe's: another stem, decoder or input side."""
    config = model.config
    found = {
        "conv_stem": list(getattr(config, "conv_stem_channels", None) or []) or None,
        "skip_decoder": list(getattr(config, "skip_decoder_widths", None) or []) or None,
        "image_size": config.vision_config.image_size,
    }
    expected = {key: RECIPE[key] for key in found}
    if found != expected:
        raise SystemExit(f"{checkpoint} is not the recipe's architecture: {found} where the bench times {expected}")


def run_phase(runtime: str, workdir: Path, photos: list[Path]) -> None:
    """One runtime in this process, a worker of `Phase`: load it and warm it up, then answer each line
    of stdin: `time` times one pass over every photo, `done` saves the last pass's probabilities for
    the comparison, reports peak memory and ends."""
    from PIL import Image

    from drywall_qa.runtime import peak_rss_bytes

    images = [Image.open(path).convert("RGB") for path in photos]
    if runtime == "torch":
        import torch

        from drywall_qa.inference import predict_probs
        from drywall_qa.model import load_model

        torch.set_num_threads(THREADS)
        model, processor = load_model(workdir / "checkpoint")

        def probs_of(batch):
            return predict_probs(model, processor, batch, PROMPTS, device="cpu", batch_size=BATCH)
    else:
        from drywall_qa.onnx_runtime import load_onnx_model, onnx_predict_probs

        name = "model.onnx" if runtime == "onnx" else "model.int8.onnx"
        onnx_model = load_onnx_model(workdir / name, threads=THREADS)

        def probs_of(batch):
            return onnx_predict_probs(onnx_model, batch, PROMPTS, batch_size=BATCH)

    probs_of(images[:BATCH])  # warm-up: allocations, kernel choice
    reply({"ready": True})
    probs = []
    for command in sys.stdin:
        if command.strip() == "time":
            probs.clear()  # one pass's probabilities in memory at a time, as one run over the photos holds
            started = time.perf_counter()
            probs = [prob for start in range(0, len(images), BATCH) for prob in probs_of(images[start : start + BATCH])]
            seconds = time.perf_counter() - started
            reply({"seconds": seconds, "load_average": round(os.getloadavg()[0], 2)})
        elif command.strip() == "done":
            np.savez_compressed(workdir / f"probs_{runtime}.npz", *probs)
            reply({"peak_rss_mb": round(peak_rss_bytes() / 2**20, 1)})
            return


def reply(message: dict) -> None:
    print(REPLY + json.dumps(message), flush=True)


class Phase:
    """`run_phase` in its own process (own peak memory, no caches shared with another runtime), held
    open so that the runtimes can take short turns."""

    def __init__(self, runtime: str, workdir: Path, count: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=str(REPO / "src"))
        command = [sys.executable, __file__, "--phase", runtime, "--workdir", str(workdir), "--images", str(count)]
        self.runtime, self.log = runtime, workdir / f"phase_{runtime}.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen(
                command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True
            )

    def ask(self, command: str | None = None) -> dict:
        if command:
            self.process.stdin.write(command + "\n")
            self.process.stdin.flush()
        for line in self.process.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY) :])
        raise SystemExit(f"phase {self.runtime} failed:\n{self.log.read_text()[-3000:]}")


def timed_in_turns(workdir: Path, count: int, rounds: int) -> dict:
    """Each runtime's passes over the photos, taking turns round after round (the order reversed every
    other round), so that other work on the machine slows them alike. A runtime's figure is its median
    pass; every pass's time and the machine's load average then are kept, and so is each round's speed
    ratio of ONNX Runtime to PyTorch."""
    phases = {runtime: Phase(runtime, workdir, count) for runtime in RUNTIMES}
    for phase in phases.values():
        phase.ask()  # loaded and warmed up (they load side by side; that is not timed)
    passes: dict[str, list[dict]] = {runtime: [] for runtime in RUNTIMES}
    for turn in range(rounds):
        for runtime in RUNTIMES if turn % 2 == 0 else RUNTIMES[::-1]:
            passes[runtime].append(phases[runtime].ask("time"))
    results = {}
    for runtime, phase in phases.items():
        ms = [1000 * one["seconds"] / count for one in passes[runtime]]
        middle = float(np.median(ms))
        results[runtime] = {
            "ms_per_image": round(middle, 1),
            "images_per_second": round(1000 / middle, 3),
            "peak_rss_mb": phase.ask("done")["peak_rss_mb"],
            "rounds_ms_per_image": [round(value, 1) for value in ms],
            "rounds_load_average": [one["load_average"] for one in passes[runtime]],
        }
        phase.process.wait(timeout=60)
    for runtime in ("onnx", "onnx_int8"):
        pairs = zip(results["torch"]["rounds_ms_per_image"], results[runtime]["rounds_ms_per_image"], strict=True)
        results[runtime]["rounds_speedup"] = [round(torch_ms / other_ms, 2) for torch_ms, other_ms in pairs]
    return results


def agreement(workdir: Path, reference: str, other: str) -> dict:
    """Largest probability difference, mask pixels that differ at 0.5, and the mean and lowest mask IoU."""
    first = np.load(workdir / f"probs_{reference}.npz")
    second = np.load(workdir / f"probs_{other}.npz")
    difference, differing, pixels, ious = 0.0, 0, 0, []
    for key in first.files:
        a, b = first[key], second[key]
        difference = max(difference, float(np.abs(a - b).max()))
        mask_a, mask_b = a >= 0.5, b >= 0.5
        differing += int((mask_a != mask_b).sum())
        pixels += mask_a.size
        for prompt_a, prompt_b in zip(mask_a, mask_b, strict=True):
            union = np.logical_or(prompt_a, prompt_b).sum()
            ious.append(1.0 if union == 0 else float(np.logical_and(prompt_a, prompt_b).sum() / union))
    return {
        "max_prob_difference": difference,
        "differing_mask_pixels": differing,
        "mask_pixels": pixels,
        "mask_iou_mean": round(float(np.mean(ious)), 6),
        "mask_iou_min": round(float(np.min(ious)), 6),
    }


def clean_env_check(workdir: Path, photos: list[Path]) -> dict:
    """The exported model in a virtualenv with only onnxruntime, numpy and Pillow, against PyTorch's masks."""
    from PIL import Image

    from drywall_qa.cli import main as cli_main
    from drywall_qa.contracts.masks import read_mask

    venv = workdir / "clean-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    started = time.perf_counter()
    subprocess.run([python, "-m", "pip", "install", "-q", *CLEAN_PACKAGES], check=True)
    installed = subprocess.run([python, "-m", "pip", "freeze"], capture_output=True, text=True, check=True).stdout
    sample = photos[:4]
    runner = [python, "-m", "drywall_qa.onnx_runtime", str(workdir / "model.onnx"), *map(str, sample)]
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "src")}  # the package's files, not its deps
    done = subprocess.run([*runner, "--out", str(workdir / "clean-masks")], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"passed": False, "error": done.stderr[-2000:], "installed": installed.split()}
    inputs = [str(path) for path in sample]
    common = ["--out", str(workdir / "torch-masks"), "--threshold", "0.5", *inputs]
    assert (
        cli_main(["predict", "--model", str(workdir / "checkpoint"), *[f"--prompt={p}" for p in PROMPTS], *common]) == 0
    )
    written = sorted(path.name for path in (workdir / "clean-masks").iterdir())
    differing = sum(
        int((read_mask(workdir / "clean-masks" / name) != read_mask(workdir / "torch-masks" / name)).sum())
        for name in written
    )
    sizes = [Image.open(path).size for path in sample]
    return {
        "passed": len(written) == len(sample) * len(PROMPTS) and differing == 0,
        "masks": len(written),
        "differing_mask_pixels": differing,
        "mask_pixels": sum(width * height for width, height in sizes) * len(PROMPTS),
        "installed": installed.split(),
        "install_seconds": round(time.perf_counter() - started, 1),
    }


def table(results: dict) -> str:
    rows = [
        ("runtime", "ms/photo", "photos/s", "x torch", "passes ms/photo", "x torch by round", "peak RSS MB", "file MB")
    ]
    sizes = {"torch": "checkpoint_weights_bytes", "onnx": "onnx_bytes", "onnx_int8": "onnx_int8_bytes"}
    torch_rate = results["runtimes"]["torch"]["images_per_second"]
    for runtime in RUNTIMES:
        phase = results["runtimes"].get(runtime)
        if phase:
            rows.append(
                (
                    runtime,
                    phase["ms_per_image"],
                    phase["images_per_second"],
                    f"{phase['images_per_second'] / torch_rate:.2f}",
                    " ".join(str(ms) for ms in phase["rounds_ms_per_image"]),
                    " ".join(str(ratio) for ratio in phase.get("rounds_speedup", [])) or "-",
                    phase["peak_rss_mb"],
                    f"{results['files'][sizes[runtime]] / 1e6:.2f}",
                )
            )
    return "\n".join(" | ".join(str(cell) for cell in row) for row in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="photos timed per runtime (default 32)")
    parser.add_argument("--rounds", type=int, default=7, help="timed passes per runtime, taking turns (default 7)")
    parser.add_argument("--no-clean-env", action="store_true", help="skip the virtualenv check (no pip downloads)")
    parser.add_argument("--checkpoint", type=Path, help="a trained checkpoint of the recipe's architecture")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results file (default %(default)s)")
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: one runtime in a fresh process
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        workdir = Path(args.workdir)
        run_phase(args.phase, workdir, photo_paths(args.images, workdir))
        return
    with tempfile.TemporaryDirectory(prefix="drywall-qa-bench-onnx-") as folder:
        workdir = Path(folder)
        photos = photo_paths(args.images, workdir)
        files = prepare(workdir, args.checkpoint)
        runtimes = timed_in_turns(workdir, args.images, args.rounds)
        results = {
            "settings": RECIPE
            | {"prompts": PROMPTS, "threads": THREADS, "batch": BATCH, "photos": len(photos), "rounds": args.rounds},
            "photos_from": "shared/realdata, half cracks and half taping"
            if "realdata" in str(photos[0])
            else "synthetic",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "weights": f"trained: {args.checkpoint}" if args.checkpoint else "seeded random (torch.manual_seed(0))",
            "files": files,
            "runtimes": runtimes,
            "onnx_speedup": round(runtimes["onnx"]["images_per_second"] / runtimes["torch"]["images_per_second"], 2),
            "int8_speedup": round(
                runtimes["onnx_int8"]["images_per_second"] / runtimes["torch"]["images_per_second"], 2
            ),
            "onnx_vs_torch": agreement(workdir, "torch", "onnx"),
            "int8_vs_onnx": agreement(workdir, "onnx", "onnx_int8"),
            "clean_env": None if args.no_clean_env else clean_env_check(workdir, photos),
        }
    from drywall_qa.contracts.atomic import write_json_atomic

    write_json_atomic(args.results, results)
    print(table(results))
    print(
        json.dumps(
            {key: results[key] for key in ("onnx_speedup", "int8_speedup", "onnx_vs_torch", "int8_vs_onnx")}, indent=2
        )
    )
    print(f"clean env: {results['clean_env'] and {k: v for k, v in results['clean_env'].items() if k != 'installed'}}")


if __name__ == "__main__":
    main()
