"""Where the pipeline's stages read and write, relative to the repo root: the paths dvc.yaml declares
(tests/test_dvc_deps.py checks that every out and metric there is one of these)."""

from __future__ import annotations

RAW_DIR = "data/raw"  # download: one Roboflow export per dataset, plus source.json
MASKS_DIR = "data/masks"  # convert: <dataset>/<image_id>__<prompt_slug>.png
IMAGES_CSV = "data/interim/images.csv"  # convert: one row per converted image
MANIFEST = "data/manifest.csv"  # split: one row per (image, prompt) with its split
MODEL_DIR = "models/clipseg"  # train: best/ (a save_pretrained folder), published when training ends
BEST_CHECKPOINT = f"{MODEL_DIR}/best"
# not a DVC output: best/ and last/ of the training in progress, so a killed run resumes; what DVC
# hashes (MODEL_DIR) then holds no wall times or run ids and repeats byte for byte
TRAIN_WORK_DIR = "data/cache/train"
PREDICTIONS_DIR = "data/predictions"  # evaluate: binarised test predictions, <dataset>/<mask file>
ACTIVATION_CACHE = "data/cache/activations"  # not a DVC output: reused across runs (keys hold what decides it)

SOURCE_RECORD = f"{RAW_DIR}/source.json"  # download: where the data came from (never the API key)
CONVERSION_METRICS = "metrics/conversion.json"
SPLIT_METRICS = "metrics/split.json"
TRAIN_METRICS = "metrics/train.json"
EVAL_METRICS = "metrics/eval.json"
HEADLINE_METRICS = "metrics/headline.json"  # evaluate: the one DVC metrics file (contracts.headline)

TRAIN_HISTORY = "plots/train_history.csv"
EVAL_PER_IMAGE = "plots/eval_per_image.csv"
EVAL_PER_PROMPT = "plots/eval_per_prompt.csv"
THRESHOLD_SWEEP = "plots/threshold_sweep.csv"
FIGURES_DIR = "plots/figures"

REPORT_DIR = "reports"
REPORT = f"{REPORT_DIR}/report.md"
REGISTRY_RECORD = "metrics/registry.json"  # register: the model version this pipeline registered
