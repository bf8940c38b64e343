"""params.yaml reading and the file naming contract."""

from __future__ import annotations

from pathlib import Path

import pytest

from drywall_qa.contracts.naming import mask_file_name, prompt_slug, source_group
from drywall_qa.params import ParamsError, flatten, load_params
from drywall_qa.stage import run_stage, select_params

PROJECT_PARAMS = Path(__file__).parents[1] / "params.yaml"


def params_with(tmp_path, old: str, new: str) -> Path:
    text = PROJECT_PARAMS.read_text(encoding="utf-8")
    assert old in text, old
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path


def test_lr_written_by_dvc_exp_set_is_a_float(tmp_path):
    # `dvc exp run -S lr=5e-5` writes `lr: 5e-05`: YAML 1.2 (DVC's reading) makes it a float
    params = load_params(params_with(tmp_path, "lr: 5.0e-4", "lr: 5e-05"))
    assert params["lr"] == 5e-05 and isinstance(params["lr"], float)
    assert isinstance(params["train"]["weight_decay"], float) and params["train"]["epochs"] == 36


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("lr: 5.0e-4", "lr: abc", "params.yaml: lr must be a number, got 'abc'"),
        ("  epochs: 36", "  epochs: 2.5", "train.epochs must be an integer, got 2.5"),
        (
            "  batch_size: 8\n  weight_decay",
            "  batch_size: 0\n  weight_decay",
            "train.batch_size must be greater than 0, got 0",
        ),
        ("  mode: resize", "  mode: tiles", "inference.mode must be 'resize', 'whole' or 'sliding', got 'tiles'"),
        ("  source: synthetic", "  source: s3", "data.source must be 'synthetic', 'roboflow' or 'local', got 's3'"),
        ("  val: 0.15", "  val: 0.25", "split: split fractions must sum to 1, got 0.7 + 0.25 + 0.15"),
        ("  augment: true", "  augment: maybe", "train.augment must be true or false, got 'maybe'"),
        ("seed: 42", "seed: 42\nsede: 1", "sede is not a known parameter"),
        ("  thresholds: [0.1,", "  thresholds: [1.5, 0.1,", "evaluate.thresholds.0 must be less than 1, got 1.5"),
        (
            "  crop_foreground_prob: 0.7",
            "  crop_foreground_prob: 7",
            "train.crop_foreground_prob must be less than or equal to 1, got 7",
        ),
        (
            "  skip_decoder: null",
            "  skip_decoder: [32, 16, 8]",
            "skip_decoder reads the conv stem's feature maps: it needs conv_stem and weights null",
        ),
    ],
)
def test_bad_params_are_refused_at_load_naming_the_key(tmp_path, old, new, message):
    with pytest.raises(ParamsError) as error:
        load_params(params_with(tmp_path, old, new))
    assert message in str(error.value)


def test_a_stage_with_bad_params_exits_with_one_line_before_its_body_runs(tmp_path, capsys):
    path = params_with(tmp_path, "lr: 5.0e-4", "lr: abc")
    ran = []
    assert run_stage("train", ran.append, params_path=path, dvc_yaml="dvc.yaml") == 1
    assert ran == [] and capsys.readouterr().err.strip().splitlines() == [
        f"train: {path}: lr must be a number, got 'abc'"
    ]


def test_a_stage_gets_exactly_the_params_dvc_yaml_declares_for_it():
    seen = {}
    assert run_stage("register", lambda stage: seen.update(stage.params)) == 0
    params = load_params("params.yaml")
    assert seen == {
        "prompts": params["prompts"],
        "model": params["model"],
        "gate": params["gate"],
        "mlflow": {"registered_model": params["mlflow"]["registered_model"]},
    }
    assert select_params({"a": {"b": 1, "c": 2}, "d": 3}, ["a.c"]) == {"a": {"c": 2}}
    with pytest.raises(ParamsError, match="declares param 'a.x'"):
        select_params({"a": {"b": 1}}, ["a.x"])


def test_project_params_have_the_brief_prompts_and_split():
    params = load_params("params.yaml")
    assert params["prompts"] == {
        "cracks": ["segment crack", "segment wall crack"],
        "taping": ["segment taping area", "segment joint/tape", "segment drywall seam"],
    }
    assert isinstance(params["lr"], float)
    fractions = [params["split"][name] for name in ("train", "val", "test")]
    assert fractions == [0.70, 0.15, 0.15]
    assert isinstance(params["seed"], int)


def test_flatten_uses_dotted_keys():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_mask_file_names_follow_the_contract():
    assert prompt_slug("segment joint/tape") == "segment_joint-tape"
    assert mask_file_name("IMG_1_jpg.rf.0123456789abcdef0123456789abcdef", "segment crack") == (
        "IMG_1_jpg.rf.0123456789abcdef0123456789abcdef__segment_crack.png"
    )


def test_source_group_joins_roboflow_copies():
    a = "IMG_8234_JPG_jpg.rf.c8b01112166b14bd57666c7c1782472a"
    b = "IMG_8234_JPG_jpg.rf.34afe7c8519090e8375fc9867bdbbbae"
    assert source_group(a) == source_group(b) == "IMG_8234_JPG_jpg"
    assert source_group("plain_photo") == "plain_photo"
