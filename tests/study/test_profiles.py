"""Profiles: the pydantic schema rejects bad files with every problem and its JSON path in one message,
and what `--show-profile` prints loads back unchanged."""

import json

import pytest

from bnlab.cli import main
from bnlab.errors import UserError
from bnlab.study import PROFILES, get_profile, with_overrides


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_preset_validates_and_round_trips_through_show_profile(name, tmp_path, capsys):
    assert main(["study", "--profile", name, "--show-profile"]) == 0
    printed = capsys.readouterr().out
    path = tmp_path / "p.json"
    path.write_text(printed)
    assert get_profile(str(path)) == json.loads(printed) == get_profile(name)


def test_seed_counts_of_the_presets():
    assert len(get_profile("quick")["seeds"]) >= 6
    assert len(get_profile("standard")["seeds"]) >= 10 and len(get_profile("full")["seeds"]) >= 10


def test_every_problem_is_reported_at_once_with_its_json_path(tmp_path):
    profile = get_profile("quick")
    profile["seeds"] = "abc"
    profile["width"] = -1
    profile["depth"] = 7
    profile["colour"] = "blue"                  # unknown key
    profile["lr"]["arms"] = ["bn", "none", "layer_norm"]
    profile["lr"]["lrs"] = [-1, 0, 0.1]
    profile["regularize"]["max_step"] = 10      # misspelled max_steps
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(profile))
    with pytest.raises(UserError) as info:
        get_profile(str(path))
    message = str(info.value)
    assert str(path) in message
    for where in ("seeds", "width", "depth", "colour", "lr.arms.2", "lr.lrs.0", "lr.lrs.1",
                  "regularize.max_step"):
        assert f"{where}:" in message, where
    assert "6n+2" in message and "Extra inputs are not permitted" in message


def test_missing_sections_and_bad_json_name_the_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text('{"dataset": "mnist1d"}')
    with pytest.raises(UserError, match=r"residual: Field required"):
        get_profile(str(path))
    path.write_text("{not json")
    with pytest.raises(UserError, match="--profile .*not valid JSON"):
        get_profile(str(path))
    with pytest.raises(UserError, match="--profile"):
        get_profile("enormous")


def test_section_checks():
    profile = get_profile("quick")
    profile["regularize"]["ghost_sizes"] = [5, 16]          # 5 does not divide the batch of 64
    profile["residual"]["train_depths"] = [8]               # a factorial across depth needs two
    profile["residual"]["lrs"] = [0.1, 0.3]                 # and three rates per cell
    with pytest.raises(UserError) as info:
        with_overrides(profile)
    for where in ("regularize:", "residual.train_depths:", "residual.lrs:"):
        assert where in str(info.value)


def test_overrides_are_validated_and_name_the_argument():
    with pytest.raises(UserError, match="--seeds"):
        with_overrides(get_profile("tiny"), seeds=0)
    with pytest.raises(UserError, match="--device tpu"):
        with_overrides(get_profile("tiny"), device="tpu")
    assert with_overrides(get_profile("tiny"), dataset="digits")["regularize"]["dataset"] == "digits"
    assert with_overrides(get_profile("quick"), seeds=2)["seeds"] == [0, 1]


def test_claim2_arms_must_be_swept_and_hold_bn_and_none():
    profile = get_profile("quick")
    profile["lr"]["arms"] = ["bn", "none"]
    profile["speed"]["arms"] = ["bn", "none", "fixup"]  # Fixup has no validated rate without the sweep
    with pytest.raises(UserError, match=r"speed.arms .* must be among lr.arms"):
        with_overrides(profile)
    profile["speed"]["arms"] = ["bn"]
    with pytest.raises(UserError, match=r"speed.arms: .*must hold 'bn' and 'none'"):
        with_overrides(profile)
    profile["speed"]["arms"], profile["speed"]["plateau_epochs"] = ["bn", "none"], profile["speed"]["epochs"] - 1
    with pytest.raises(UserError, match="plateau_epochs .* must be at least epochs"):
        with_overrides(profile)
