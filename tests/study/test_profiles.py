"""Profiles: the pydantic schema rejects bad files with every problem and its JSON path in one message,
and what `--show-profile` prints loads back unchanged; the ``full`` profile replicates the papers'
settings (checked against the published numbers, typed in here from the papers) and needs CUDA."""

import json

import pytest
import torch

from bnlab.cli import main
from bnlab.errors import UserError
from bnlab.study import PROFILES, claim_regularize, claim_residual, get_profile, sweep, with_overrides
from bnlab.study.claims import CLAIMS
from bnlab.study.plan import count_runs
from bnlab.study.profiles import validate


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


# ------------------------------------------------------------------------------------------ the full profile

FULL = get_profile("full")


def test_full_validates_and_round_trips_through_show_profile(tmp_path, capsys):
    assert main(["study", "--profile", "full", "--show-profile"]) == 0
    path = tmp_path / "full.json"
    path.write_text(capsys.readouterr().out)
    assert get_profile(str(path)) == json.loads(path.read_text()) == FULL


def test_full_uses_the_papers_settings():
    assert FULL["dataset"] == "cifar10" and FULL["regularize"].get("dataset") in (None, "cifar10")
    assert len(FULL["seeds"]) >= 10 and FULL["requires_cuda"] and FULL["device"].startswith("cuda")
    # claim 5: He et al. 2016's CIFAR-10 depths, lr 0.1 among the rates, batch 128, wd 1e-4, momentum 0.9
    assert FULL["residual"]["train_depths"] == [20, 32, 44, 56, 110]
    assert 0.1 in FULL["residual"]["lrs"]
    lr = FULL["lr"]
    assert lr["batch_sizes"][0] == 128 and lr["weight_decay"] == 1e-4 and lr["momentum"] == 0.9
    # claim 4: Bjorck et al. 2018's ResNet-110 and a grid spanning their rates, 1e-4 and 0.1 interior
    assert FULL["depth"] == 110
    assert lr["lrs"][0] <= 1e-5 * 1.0001 and lr["lrs"][-1] >= 3.0
    assert lr["lrs"][0] < 1e-4 < lr["lrs"][-1] and 1e-4 in lr["lrs"] and 0.1 in lr["lrs"]
    # claim 3: Wu & He 2018's 32/16/8/4/2 images per batch as ghost batches, beside GroupNorm
    assert sorted(FULL["regularize"]["ghost_sizes"]) == [2, 4, 8, 16, 32]
    assert "groupnorm" in [key for key, _, _ in claim_regularize.arms(FULL)]
    for paper in ("He et al. 2016", "Bjorck et al. 2018", "Wu & He 2018", "Santurkar et al. 2018", "VGG"):
        assert paper in FULL["description"]


def test_full_sweep_runs_carry_weight_decay_and_other_profiles_keep_their_run_keys():
    spec = sweep.spec(FULL, "bn", 0.1, 128, 0)
    assert spec["weight_decay"] == 1e-4 and spec["depth"] == 110 and spec["dataset"] == "cifar10"
    depth20 = [s for s in claim_residual.measure(FULL) if s["kind"] == "train" and s["depth"] == 20]
    assert depth20 and all(s["weight_decay"] == 1e-4 and s["batch_size"] == 128 for s in depth20)
    quick = get_profile("quick")  # stores of earlier runs resume: no new keys where the profile sets none
    assert "weight_decay" not in sweep.spec(quick, "bn", 0.1, 64, 0)
    assert "momentum" not in sweep.spec(quick, "bn", 0.1, 64, 0)


def test_the_sweeps_weight_decay_and_momentum_are_validated_with_their_path():
    bad = {**FULL, "lr": {**FULL["lr"], "weight_decay": -1e-4, "momentum": 1.0}}
    with pytest.raises(UserError) as info:
        validate(bad, "profile bad")
    assert "lr.weight_decay" in str(info.value) and "lr.momentum" in str(info.value)


def test_the_stated_budget_matches_the_profiles_runs():
    """The description's run count and GPU-hours, recounted from the specs: 0.2 s per layer per epoch of
    the 45k training images, ICS steps counted as training steps, plus claim 2's 4 × 10 longer runs (the
    unnormalized arm's to its plateau)."""
    counts = count_runs(FULL, sorted(CLAIMS))
    specs = [s for c in counts.values() for s in c.own.values()]
    assert "1299 runs (the first round, then the other seeds" in FULL["description"] and len(specs) == 1299
    images = 50_000 - FULL["val_size"]

    def epochs(s):
        if s["kind"] == "train":
            return s["max_steps"] * s["batch_size"] / images if s.get("max_steps") else s["epochs"]
        return s["steps"] * s["batch_size"] / images if s["kind"] == "ics" else 0.0
    layer_epochs = sum(epochs(s) * s["depth"] for s in specs)
    speed = FULL["speed"]
    layer_epochs += len(FULL["seeds"]) * FULL["depth"] * ((len(FULL["lr"]["arms"]) - 1) * speed["epochs"]
                                                          + speed["plateau_epochs"])
    assert "≈ 100 GPU-hours" in FULL["description"]
    assert layer_epochs * 0.2 / 3600 == pytest.approx(100, rel=0.1)


def test_full_requires_cuda_and_says_so():
    with pytest.raises(UserError, match="requires a CUDA GPU"):
        with_overrides(FULL, device="cpu")
    custom = {**FULL, "requires_cuda": False, "device": "cpu"}
    assert validate(custom)["device"] == "cpu"  # a copy without the flag runs anywhere


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_study_full_without_cuda_fails_in_one_line_and_creates_nothing(tmp_path, capsys):
    out = tmp_path / "study-full"
    assert main(["study", "--profile", "full", "--out", str(out)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab study: error: ") and "needs a CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not out.exists()
