"""Figures: deterministic choice of examples and failure cases, every figure file written, clear errors."""

import csv

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from drywall_qa.contracts.manifest import ManifestError
from drywall_qa.contracts.naming import mask_file_name
from drywall_qa.visualize import VisualizationError, make_figures, spread_over_ranking, worst_cases

PROMPTS = {"cracks": ["segment crack"], "taping": ["segment taping area", "segment joint/tape"]}
ALL = [p for ps in PROMPTS.values() for p in ps]


def _per_image(ious, gt=0.1):
    return pd.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(len(ious))],
            "prompt": "p",
            "iou": ious,
            "gt_fg_fraction": gt,
            "dataset": "d",
            "dice": ious,
            "pred_fg_fraction": 0.1,
        }
    )


def test_examples_spread_over_the_ranking_best_first():
    rows = spread_over_ranking(_per_image([0.1, 0.9, 0.5, 0.3, 0.7]), "p", 3)
    assert list(rows["iou"]) == [0.9, 0.5, 0.1]


def test_examples_prefer_pairs_with_ground_truth():
    table = _per_image([1.0, 1.0, 0.4, 0.2])
    table.loc[:1, "gt_fg_fraction"] = 0.0  # empty/empty pairs score 1 but show nothing
    assert list(spread_over_ranking(table, "p", 2)["image_id"]) == ["i2", "i3"]


def test_worst_cases_lowest_iou_ties_by_id():
    assert list(worst_cases(_per_image([0.5, 0.0, 0.9, 0.0]), "p", 3)["image_id"]) == ["i1", "i3", "i0"]


@pytest.fixture
def evaluated(tmp_path):
    """What `evaluate` and `train` leave behind, for 2 test images per dataset."""
    rows, per_image = [], []
    for dataset, prompts in PROMPTS.items():
        for k in range(2):
            image_id = f"{dataset}_{k}"
            image_path = tmp_path / "raw" / f"{image_id}.png"
            image_path.parent.mkdir(exist_ok=True)
            Image.new("RGB", (20, 16), (90 + 40 * k, 90, 90)).save(image_path)
            gt = np.zeros((16, 20), np.uint8)
            gt[4:10, 3 + k : 12] = 255
            for prompt in ALL:
                pred_path = tmp_path / "pred" / dataset / mask_file_name(image_id, prompt)
                pred_path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.roll(gt, k, axis=1), mode="L").save(pred_path)
            for prompt in prompts:
                mask_path = tmp_path / "masks" / mask_file_name(image_id, prompt)
                mask_path.parent.mkdir(exist_ok=True)
                Image.fromarray(gt, mode="L").save(mask_path)
                rows.append(
                    {
                        "dataset": dataset,
                        "split": "test",
                        "image_id": image_id,
                        "image_path": image_path.relative_to(tmp_path).as_posix(),
                        "mask_path": mask_path.relative_to(tmp_path).as_posix(),
                        "prompt": prompt,
                        "group": image_id,
                        "width": gt.shape[1],
                        "height": gt.shape[0],
                        "source_split": "test",
                    }
                )
                per_image.append(
                    {
                        "image_id": image_id,
                        "dataset": dataset,
                        "prompt": prompt,
                        "iou": 1 - 0.2 * k,
                        "dice": 1 - 0.1 * k,
                        "gt_fg_fraction": 0.2,
                        "pred_fg_fraction": 0.2,
                    }
                )
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    pd.DataFrame(per_image).to_csv(tmp_path / "per_image.csv", index=False)
    pd.DataFrame({"prompt": ALL, "threshold": 0.5}).to_csv(tmp_path / "per_prompt.csv", index=False)
    pd.DataFrame([{"prompt": p, "threshold": t, "val_miou": t * (1 - t)} for p in ALL for t in (0.3, 0.5, 0.7)]).to_csv(
        tmp_path / "sweep.csv", index=False
    )
    with open(tmp_path / "history.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "val_loss", "val_miou", "val_dice", "lr", "seconds"])
        writer.writerows([[e, 1 / e, 1.1 / e, 0.1 * e, 0.12 * e, 1e-3 / e, 3.0] for e in (1, 2, 3)])
    return tmp_path


def _make(root, **changes):
    arguments = dict(
        manifest_path=root / "manifest.csv",
        per_image_csv=root / "per_image.csv",
        per_prompt_csv=root / "per_prompt.csv",
        threshold_sweep_csv=root / "sweep.csv",
        train_history_csv=root / "history.csv",
        predictions_dir=root / "pred",
        out_dir=root / "figures",
        examples_per_prompt=2,
        worst_k=1,
        repo_root=root,
    )
    return make_figures(**(arguments | changes))


def test_every_figure_is_written(evaluated):
    (evaluated / "figures").mkdir()
    (evaluated / "figures" / "stale.png").write_bytes(b"from an older run")
    paths = _make(evaluated)
    expected = {"prompt_sensitivity.png", "threshold_sweep.png", "training_curves.png"} | {
        f"{kind}__{slug}.png"
        for slug in ("segment_crack", "segment_taping_area", "segment_joint-tape")
        for kind in ("examples", "failures")
    }
    assert {p.name for p in (evaluated / "figures").iterdir()} == expected == {p.name for p in paths}
    with Image.open(evaluated / "figures" / "examples__segment_crack.png") as image:
        assert image.width > 500 and image.height > 200  # 2 rows x 4 panels


def test_missing_prediction_names_the_file(evaluated):
    (evaluated / "pred" / "taping" / mask_file_name("taping_1", "segment crack")).unlink()
    with pytest.raises(ManifestError, match=r"taping_1__segment_crack\.png does not exist"):
        _make(evaluated)
    assert not (evaluated / "figures").exists()  # nothing half-written


def test_missing_history_names_the_file(evaluated):
    with pytest.raises(VisualizationError, match=r"nope\.csv does not exist"):
        _make(evaluated, train_history_csv=evaluated / "nope.csv")
