"""The training/inference benchmark's quick mode runs end to end and reports every field with sane values.

Benchmarks are not timed tests: this checks what the numbers mean (same learning, same
probabilities, consistent counts), never how fast anything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "results.json"
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_train.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "| trainer, activation cache |" in completed.stdout  # the table is printed
    return json.loads(out.read_text(encoding="utf-8"))


def test_quick_benchmark_reports_every_phase(quick_results):
    results = quick_results
    assert results["settings"]["mode"] == "quick"
    assert set(results["phases"]) == {"naive", "trainer_uncached", "trainer_cached", "inference"}
    data = results["data"]
    assert data["train_images"] > 0 and data["val_images"] > 0
    assert data["train_pairs_with_negatives"] == data["train_images"] * data["prompts"]
    epochs = results["settings"]["epochs"]
    for name in ("naive", "trainer_uncached", "trainer_cached", "inference"):
        phase = results["phases"][name]
        assert 100 < phase["peak_rss_mb"] < 64_000, name  # MiB of a real Python + torch process
        assert phase["process_s"] > 0
    for name in ("trainer_uncached", "trainer_cached"):
        run = results["phases"][name]
        assert run["epochs_run"] == len(run["history"]) == epochs
        assert run["wall_s"] > 0 and 0 <= run["vision_s"] < run["wall_s"]
        assert results["summary"][f"speedup_{name}_vs_naive"] > 0
        for row in run["history"]:
            assert 0 <= row["val_miou"] <= 1 and row["val_loss"] > 0
    naive = results["phases"]["naive"]
    assert naive["projected_s"] > naive["epoch_s"] > 0
    assert naive["history"][0]["optimizer_steps"] == -(
        -data["train_images"] // results["config"]["train"]["batch_size"]
    )
    assert results["machine"]["gpu"]
    assert "naive HF loop" in results["table"]
    assert results["complete"] is True


def test_the_fast_paths_learn_what_the_naive_loop_learns(quick_results):
    naive = quick_results["phases"]["naive"]["history"][0]
    uncached = quick_results["phases"]["trainer_uncached"]["history"][0]
    cached = quick_results["phases"]["trainer_cached"]["history"][0]
    # Same weights, batches and steps: after epoch 1 the shared vision pass matches the per-pair loop
    # up to float rounding, and the fp16 activation cache up to fp16 rounding.
    assert uncached["train_loss"] == pytest.approx(naive["train_loss"], abs=1e-4)
    assert uncached["val_loss"] == pytest.approx(naive["val_loss"], abs=1e-4)
    assert cached["val_loss"] == pytest.approx(naive["val_loss"], abs=1e-2)


def test_cache_counts_and_inference_agree_with_the_naive_forward(quick_results):
    data, settings, config = quick_results["data"], quick_results["settings"], quick_results["config"]
    cached = quick_results["phases"]["trainer_cached"]
    views_used = min(config["train"]["cached_views"], settings["epochs"]) if config["train"]["augment"] else 1
    assert cached["cache_misses"] == data["train_images"] * views_used + data["val_images"]
    assert (
        cached["cache_hits"]
        == settings["epochs"] * (data["train_images"] + data["val_images"]) - cached["cache_misses"]
    )
    assert cached["cache_files"] == cached["cache_misses"] and cached["cache_bytes"] > 0

    inference = quick_results["phases"]["inference"]
    assert inference["max_abs_probability_difference"] < 1e-4  # one vision pass per image changes nothing
    for value in inference["ms_per_image"].values():
        assert value > 0
    assert inference["project_all_vs_1_prompt"] > 0
    costs = inference["unit_costs"]
    assert set(costs) == {"vision_per_image_ms", "decoder_step_per_pair_ms", "decoder_step_per_pair_one_call_ms"}
    assert all(value > 0 for value in costs.values())


def test_a_subset_of_phases_runs_alone_and_resume_reuses_it(tmp_path):
    out, workdir = tmp_path / "results.json", tmp_path / "work"
    command = [
        sys.executable,
        str(REPO_ROOT / "bench" / "bench_train.py"),
        "--quick",
        "--out",
        str(out),
        "--workdir",
        str(workdir),
    ]
    completed = subprocess.run(
        [*command, "--phases", "inference"], capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    alone = json.loads(out.read_text(encoding="utf-8"))
    assert set(alone["phases"]) == {"inference"} and alone["complete"] is False
    assert "all 5 prompts" in completed.stdout and "naive HF loop" not in completed.stdout
    assert set(alone["summary"]) == {"epochs", "inference_all_vs_1_prompt"}

    completed = subprocess.run(
        [*command, "--resume", "--phases", "inference,naive"], capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    resumed = json.loads(out.read_text(encoding="utf-8"))
    assert resumed["phases"]["inference"] == {**alone["phases"]["inference"], "reused_from_earlier_run": True}
    assert "reused_from_earlier_run" not in resumed["phases"]["naive"]

    rejected = subprocess.run(
        [*command, "--phases", "inference,warp"], capture_output=True, text=True, timeout=120, check=False
    )
    assert rejected.returncode == 2 and "unknown ['warp']" in rejected.stderr


def test_the_training_profile_measures_the_real_recipe_and_tables_its_parts():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import profile_train

    params = profile_train.recipe_params(threads=1)
    assert params["data"]["source"] == "local" and params["model"]["conv_stem"] == [24, 48, 96, 96]
    assert params["train"]["num_threads"] == 1 and params["train"]["ema_decay"] == 0.998
    assert profile_train.PATHS["after"]["sample_prompts"] and not profile_train.PATHS["before"]["sample_prompts"]
    row = {"steps": 4, "share": dict.fromkeys(profile_train.PARTS, 1 / 6), "pairs_per_step": 40.0}
    row |= {"seconds_per_step": 0.5, "cpu_percent": 190.0, "validation_seconds": 6.0, "seconds_per_epoch": 99.0}
    printed = profile_train.table({"before": row, "after": {**row, "seconds_per_epoch": 49.5}})
    assert "| backward | 16.7% | 16.7% |" in printed and "| epoch time / before | 1.0 | 0.5 |" in printed


def test_the_onnx_benchmark_measures_the_real_recipes_model():
    """bench/bench_onnx.py claims run_real.sh's architecture and views: a recipe change must reach it."""
    from test_experiment_workflow import real_recipe_settings

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import bench_onnx
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    recipe = real_recipe_settings()
    compact = {key: value.replace(" ", "") for key, value in recipe.items()}
    assert compact["model.preset"] == bench_onnx.RECIPE["preset"]
    assert compact["model.image_size"] == str(bench_onnx.RECIPE["image_size"])
    assert compact["model.conv_stem"] == str(bench_onnx.RECIPE["conv_stem"]).replace(" ", "")
    skip_decoder = bench_onnx.RECIPE["skip_decoder"]
    assert compact.get("model.skip_decoder") == (None if skip_decoder is None else str(skip_decoder).replace(" ", ""))
    assert compact["inference.sizes"] == str(bench_onnx.RECIPE["sizes"]).replace(" ", "")
    assert compact["inference.flips"] == "[" + ",".join(bench_onnx.RECIPE["flips"]) + "]"


def test_the_onnx_benchmark_refuses_a_checkpoint_of_another_architecture():
    """Timing another model under the recipe's name would publish the wrong speed."""
    from drywall_qa.model import build_model

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import bench_onnx
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))

    model, _ = build_model("tiny", None, 32, False, prompts=["segment crack"], conv_stem=[8, 8, 16, 16])
    with pytest.raises(SystemExit, match="not the recipe's architecture"):
        bench_onnx.check_recipe_architecture(model, Path("elsewhere"))
