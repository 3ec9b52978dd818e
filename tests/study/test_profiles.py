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
    profile = get_profile("quick")
    profile["regularize"]["depth"] = 10                     # not a 6n+2 ResNet depth
    with pytest.raises(UserError, match=r"regularize\.depth: .*6n\+2.*\[10\]"):
        with_overrides(profile)


def test_overrides_are_validated_and_name_the_argument():
    with pytest.raises(UserError, match="--seeds"):
        with_overrides(get_profile("tiny"), seeds=0)
    with pytest.raises(UserError, match="--device tpu"):
        with_overrides(get_profile("tiny"), device="tpu")
    assert with_overrides(get_profile("tiny"), dataset="digits")["regularize"]["dataset"] == "digits"
    assert with_overrides(get_profile("quick"), seeds=2)["seeds"] == [0, 1]
    # the profile's sequential looks (6, then 10) give way to one look of the seeds asked for
    assert get_profile("quick")["looks"] == [6, 10]
    assert with_overrides(get_profile("quick"), seeds=8)["looks"] is None
    # and so does a claim's own design (claim 3's 10, 20, 40, 80)
    assert get_profile("quick")["regularize"]["looks"] == [10, 20, 40, 80]
    assert with_overrides(get_profile("quick"), seeds=8)["regularize"]["looks"] is None


def test_a_claims_own_looks_are_checked_against_the_seeds():
    quick = get_profile("quick")
    assert len(quick["seeds"]) == quick["regularize"]["looks"][-1] == 80 and quick["looks"][-1] == 10
    with pytest.raises(UserError, match=r"regularize.looks \(90\) exceeds the number of seeds \(80\)"):
        validate({**quick, "regularize": {**quick["regularize"], "looks": [10, 20, 40, 90]}}, "q")
    with pytest.raises(UserError, match=r"must be the number of seeds \(90\)"):   # 10 seeds would never run
        validate({**quick, "seeds": list(range(90))}, "q")
    with pytest.raises(UserError, match="looks and look_alphas go together"):
        validate({**quick, "regularize": {**quick["regularize"], "look_alphas": None}}, "q")
    with pytest.raises(UserError, match="more than the 0.05 budget"):
        validate({**quick, "regularize": {**quick["regularize"], "look_alphas": [0.02] * 4}}, "q")
    # without a design of its own a claim follows the profile's, whose last look is then the number of seeds
    own_free = {**quick, "seeds": list(range(10)), "regularize": {**quick["regularize"], "looks": None,
                                                                  "look_alphas": None}}
    assert validate(own_free, "q")["regularize"]["looks"] is None


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


# ------------------------------------------------------------------------------------------ bounds (issue 21)
# Values that pass the types and then fail every run or the machine. The sizes are the registry's documented
# ones (bnlab.data: synthetic has 512 training examples; tiny holds 64 out for validation, leaving 448).
def _tiny_with(path: str, value) -> dict:
    profile = get_profile("tiny")
    *parents, last = path.split(".")
    target = profile
    for key in parents:
        target = target[key]
    target[last] = value
    return profile


@pytest.mark.parametrize("path, value, expected", [
    ("val_size", 1_000_000_000, "val_size: must be less than 512, the training examples of synthetic"),
    ("lr.lrs", [0.01, 0.1, 1e308], "lr.lrs.2: must be at most 10000 (got 1e+308)"),
    ("ics.lrs.bn", [1e308], "ics.lrs.bn.0: must be at most 10000"),
    ("width", 1e308, "width: must be at most 64 (got 1e+308)"),
    ("width", float("inf"), "width: must be a finite number (got inf)"),
    ("depth", 6_000_000_002, "depth: must be at most 2000 (got 6000000002)"),
    ("residual.signal_depths", [8, 6_000_000_002], "residual.signal_depths.1: must be at most 2000"),
    ("ics.batch_size", 10 ** 12, "ics.batch_size: must be at most 448 (got 1000000000000), the training examples "
                                 "of synthetic left after the validation split"),
    ("lr.batch_sizes", [32, 449], "lr.batch_sizes.1: must be at most 448 (got 449)"),
    ("regularize.batch_size", 128, "regularize.batch_size: must be at most 64 (got 128), regularize.subset"),
    ("seeds", list(range(1_000_000)), "seeds: at most 1000 seeds (got 1000000)"),
    ("seeds", [0, -1], "seeds.1: must be in [0, 4294967296) (got -1)"),
])
def test_values_beyond_what_a_study_can_run_are_refused_with_their_json_path(path, value, expected):
    with pytest.raises(UserError) as info:
        validate(_tiny_with(path, value), "--profile p.json")
    message = str(info.value)
    assert message.startswith("--profile p.json: ") and expected in message and "\n" not in message, message
    assert "got None" not in message   # Infinity was once reported as None (re-validated after a JSON dump)


def test_infinity_in_a_profile_file_is_named_as_such(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps(_tiny_with("width", float("inf"))))   # JSON's Infinity
    assert "Infinity" in path.read_text()
    with pytest.raises(UserError, match=r"width: must be a finite number \(got inf\)"):
        with_overrides(get_profile(str(path)))


def test_the_bounds_themselves_are_accepted():
    profile = _tiny_with("width", 64.0)
    profile.update(depth=2000, val_size=511 - 447)   # 2000 = 6·333 + 2
    profile["lr"]["lrs"] = [0.1, 1.0, 1e4]
    profile["ics"]["batch_size"] = 448               # every training example left
    assert validate(profile)["ics"]["batch_size"] == 448


def test_sizes_are_checked_against_every_dataset_the_profile_reads():
    """digits has 1437 training examples (bnlab.data): quick's val_size 500 leaves 937; a setting brings it in."""
    quick = get_profile("quick")
    quick["lr"]["batch_sizes"] = [64, 1000]
    assert validate(quick)["lr"]["batch_sizes"] == [64, 1000]   # MNIST-1D leaves 3500
    with pytest.raises(UserError, match=r"lr.batch_sizes.1: must be at most 937 \(got 1000\), the training "
                                        r"examples of digits"):
        validate({**quick, "settings": [{"dataset": "digits"}]})
    with pytest.raises(UserError, match=r"lr.batch_sizes.1: must be at most 937"):
        with_overrides(quick, dataset="digits")
    # an image dataset shrunk by image_train_size: at most that many
    with pytest.raises(UserError, match=r"lr.batch_sizes.1: must be at most 448 \(got 1000\).*and image_train_size"):
        with_overrides({**get_profile("tiny"), "lr": quick["lr"]}, dataset="fashion-mnist")


# (preset, dataset) whose runs would all fail: too few training examples for its validation split or batches
# (quick's 500 held out of synthetic's 512 left 12 examples for batches of 64: "Loader: batch_size 64 exceeds
# the 12 examples per epoch" in every run)
TOO_SMALL = {("quick", "synthetic"), ("standard", "synthetic"), ("full", "synthetic"), ("full", "digits"),
             ("full", "mnist1d")}


@pytest.mark.parametrize("name", list(PROFILES))
@pytest.mark.parametrize("dataset", [None, "mnist1d", "fashion-mnist", "digits", "synthetic", "cifar10"])
def test_every_preset_stays_within_the_bounds_on_every_dataset_large_enough(name, dataset):
    profile = get_profile(name)
    if dataset is None:
        assert validate(profile) == profile
    elif (name, dataset) in TOO_SMALL:
        with pytest.raises(UserError, match=rf"(val_size|batch_size|batch_sizes\.0): must be .* of {dataset}"):
            with_overrides(profile, dataset=dataset)
    else:
        assert with_overrides(profile, dataset=dataset)["dataset"] == dataset


def test_a_missing_profile_file_says_no_such_file(tmp_path):
    missing = tmp_path / "x.json"
    with pytest.raises(UserError, match=rf"^--profile {missing}: no such file$"):
        get_profile(str(missing))


def test_tiny_shrinks_an_image_dataset_to_its_budget():
    """Issue 21 item 14: tiny on Fashion-MNIST trained on all 60,000 images at 28×28; now every spec of an image
    study carries tiny's 8×8 and 448 images (synthetic's 512 minus its 64 held out)."""
    from bnlab.study.common import dataset_label
    tiny = with_overrides(get_profile("tiny"), dataset="fashion-mnist")
    specs = [s for c in count_runs(tiny, sorted(CLAIMS)).values() for s in c.own.values()]
    assert specs and all(s["image_size"] == 8 and s["train_size"] == 448 for s in specs)
    assert dataset_label(tiny) == "fashion-mnist (8×8, 448 training images)"
    assert dataset_label(get_profile("tiny")) == "synthetic"   # already 8×8 with 448 left: nothing shrunk


def test_tiny_on_fashion_mnist_loads_448_images_of_8_by_8():
    import bnlab.data
    from bnlab.study.runs import load_data
    if bnlab.data.locate("fashion-mnist") is None:
        pytest.skip("Fashion-MNIST is not on disk")
    tiny = with_overrides(get_profile("tiny"), dataset="fashion-mnist")
    spec = next(s for c in count_runs(tiny, [4]).values() for s in c.own.values())
    data = load_data(spec)
    assert tuple(data.train_x.shape) == (448, 1, 8, 8) and len(data.val_y) == 64 and len(data.test_y) == 10000
