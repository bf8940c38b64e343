"""params.yaml reading and the file naming contract."""

from __future__ import annotations

from drywall_qa.naming import mask_file_name, prompt_slug, source_group
from drywall_qa.params import flatten, load_params


def test_lr_written_by_dvc_exp_set_is_a_float(tmp_path):
    # `dvc exp run -S lr=5e-5` writes `lr: 5e-05`, which PyYAML (YAML 1.1) reads as a string
    params_file = tmp_path / "params.yaml"
    params_file.write_text("lr: 5e-05\ntrain:\n  weight_decay: 1e-4\n  epochs: 3\nprompts:\n  cracks: [segment crack]\n")
    params = load_params(params_file)
    assert params["lr"] == 5e-05 and isinstance(params["lr"], float)
    assert params["train"]["weight_decay"] == 1e-4
    assert params["train"]["epochs"] == 3
    assert params["prompts"]["cracks"] == ["segment crack"]


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
