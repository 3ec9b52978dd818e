"""Runs: the validation split never touches the test set, the stability rule, and failed runs → no
verdict with a non-zero exit naming the claim."""

import dataclasses
import json
import math

import pytest
import torch

import bnlab.data
from bnlab.cli import main
from bnlab.study import get_profile, kinds, runs
from bnlab.study.common import train_spec
from bnlab.study.metrics import is_stable


def test_split_validation_is_stratified_disjoint_and_leaves_the_test_set_alone():
    data = bnlab.data.load("synthetic")
    split = bnlab.data.split_validation(data, 64, seed=0)
    assert len(split.train_y) + len(split.val_y) == len(data.train_y)
    assert torch.bincount(split.val_y, minlength=data.num_classes).tolist() == [16] * 4  # 4 classes
    rows = {tuple(r) for r in data.train_x.flatten(1).tolist()}
    train = {tuple(r) for r in split.train_x.flatten(1).tolist()}
    val = {tuple(r) for r in split.val_x.flatten(1).tolist()}
    assert not train & val and train | val == rows
    assert torch.equal(split.test_x, data.test_x) and torch.equal(split.test_y, data.test_y)
    again = bnlab.data.split_validation(data, 64, seed=0)
    assert torch.equal(again.val_x, split.val_x)
    with pytest.raises(ValueError, match="validation size"):
        bnlab.data.split_validation(data, len(data.train_y), seed=0)


def _spec(**kw):
    profile = get_profile("tiny")
    return train_spec(profile, norm="bn", lr=0.1, batch_size=32, seed=0, max_steps=8, **kw)


def test_nothing_chosen_depends_on_the_test_set():
    """Poison the test set with NaN: the curves and validation numbers every choice reads are unchanged;
    only the reported test accuracy (once, at the end) sees the poison."""
    spec = _spec()
    runs._load.cache_clear()
    status, clean, _ = kinds.execute(spec)
    data = runs.load_data(spec)
    data.test_x.fill_(math.nan)  # the cached dataset every later run of this process reads
    try:
        status_p, poisoned, _ = kinds.execute(spec)
    finally:
        runs._load.cache_clear()
    assert status == status_p == "done"
    assert poisoned["curve"]["val_acc"] == clean["curve"]["val_acc"]
    assert poisoned["losses"] == clean["losses"]
    assert poisoned["final"]["val_acc"] == clean["final"]["val_acc"] is not None
    assert clean["final"]["test_acc"] is not None and poisoned["final"]["test_loss"] is None
    assert "test_acc" not in poisoned["curve"]


def test_the_validation_split_is_carved_from_training_data():
    spec = _spec()
    data = runs.load_data(spec)
    full = bnlab.data.load("synthetic")
    assert len(data.val_y) == spec["val_size"] and len(data.train_y) == len(full.train_y) - spec["val_size"]
    assert torch.equal(data.test_x, full.test_x)


def test_stability_rule_on_a_chance_level_run():
    chance = 0.1
    assert is_stable("done", 2.3, 1.0, 0.6, chance)
    assert not is_stable("done", 2.3, 1.0, 0.105, chance)   # loss halved, but accuracy at chance
    assert not is_stable("done", 2.3, 1.2, 0.6, chance)     # loss fell, but not to half
    assert not is_stable("diverged", 2.3, 1.0, 0.6, chance)
    assert not is_stable("done", 2.3, math.nan, 0.6, chance)
    assert not is_stable("done", 2.3, 1.0, None, chance)
    assert is_stable("done", 2.3, 1.15, 0.2, chance)        # both limits inclusive


def test_failed_runs_give_no_verdict_and_a_non_zero_exit_naming_the_claim(tmp_path, monkeypatch, capsys):
    real, real_stack = runs.run_train, runs.run_train_stack

    def broken(spec):
        if spec["norm"].startswith("groupnorm"):
            raise RuntimeError("a broken run")
        return real(spec)

    def broken_stack(specs):   # the seeds of a spec train as one stack: it breaks for all of them
        if specs[0]["norm"].startswith("groupnorm"):
            raise RuntimeError("a broken run")
        return real_stack(specs)
    monkeypatch.setitem(kinds.KINDS, "train", dataclasses.replace(kinds.TRAIN, run=broken, run_stack=broken_stack))
    out = tmp_path / "study"
    code = main(["study", "--profile", "tiny", "--claims", "3", "--jobs", "1", "--no-progress", "--out", str(out)])
    assert code != 0
    assert "claim 3" in capsys.readouterr().err
    verdicts = json.loads((out / "verdicts.json").read_text(), parse_constant=pytest.fail)["claims"]
    assert verdicts["3"]["verdict"] == "no verdict" and verdicts["3"]["failed_runs"] == 2  # 2 seeds


def test_few_seeds_yield_no_verdict_not_a_firm_one(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", "--profile", "tiny", "--claims", "3", "--seeds", "1", "--jobs", "1", "--no-progress",
                 "--out", str(out)]) == 0
    verdicts = json.loads((out / "verdicts.json").read_text(), parse_constant=pytest.fail)["claims"]
    assert verdicts["3"]["verdict"] == "no verdict"


def test_eval_every_zero_evaluates_only_the_final_model():
    """Sweep runs (claims 4, 5) read only the final model: no evaluation during training, one at the end,
    and the same training trajectory as a run that evaluates every 2 steps."""
    status, end_only, _ = kinds.execute(_spec(eval_every=0))
    _, curved, _ = kinds.execute(_spec(eval_every=2))
    assert status == "done" and end_only["curve"]["step"] == [8] and curved["curve"]["step"] == [2, 4, 6, 8]
    assert end_only["losses"] == curved["losses"] and end_only["final"]["val_acc"] == curved["final"]["val_acc"]
    with pytest.raises(ValueError, match="eval_every must be >= 0"):
        runs.Probe(runs.load_data(_spec()), -1)


def test_an_image_profile_trains_on_a_pooled_class_balanced_subset():
    """Validation carved from the whole (pooled) training set, then the profile's training subset, then a
    claim's smaller subset inside it; the test set whole. Oracle: the same steps by bnlab.data's pieces."""
    base = {"kind": "train", "dataset": "digits", "val_size": 100, "train_size": 300, "image_size": 4}
    data = runs.load_data(base)
    full = bnlab.data.split_validation(bnlab.data.downsample(bnlab.data.load("digits"), 4), 100, seed=0)
    assert data.train_x.shape == (300, 1, 4, 4)
    assert torch.bincount(data.train_y, minlength=10).tolist() == [30] * 10
    assert torch.equal(data.val_x, full.val_x) and torch.equal(data.val_y, full.val_y)
    assert torch.equal(data.test_x, full.test_x) and len(data.test_y) == 360
    pool = {tuple(r) for r in full.train_x.flatten(1).tolist()}
    train = {tuple(r) for r in data.train_x.flatten(1).tolist()}
    assert train <= pool and not train & {tuple(r) for r in data.val_x.flatten(1).tolist()}
    inner = runs.load_data({**base, "subset": 50})
    assert len(inner.train_y) == 50 and {tuple(r) for r in inner.train_x.flatten(1).tolist()} <= train
    assert len(runs.load_data({**base, "train_size": 5000}).train_y) == 1337  # at most what is left


def test_image_settings_reach_image_specs_only():
    """A sequence dataset's specs do not carry the image settings (their store keys do not change); every
    spec of an image study carries them, train, ICS and signal runs alike."""
    from bnlab.study.claims import CLAIMS
    from bnlab.study.common import dataset_label
    from bnlab.study.plan import count_runs
    from bnlab.study.profiles import with_overrides
    quick = get_profile("quick")

    def specs(profile):
        return [s for c in count_runs(profile, sorted(CLAIMS)).values() for s in c.own.values()]
    assert all("image_size" not in s and "train_size" not in s for s in specs(quick))
    images = specs(with_overrides(quick, dataset="fashion-mnist"))
    assert {s["kind"] for s in images} == {"train", "ics", "signal"}
    assert all(s["image_size"] == 14 and s["train_size"] == 3500 for s in images)
    shrunk = with_overrides(quick, dataset="fashion-mnist")
    assert dataset_label(shrunk) == "fashion-mnist (14×14, 3500 training images)"
    assert dataset_label(quick) == "mnist1d"
    assert dataset_label(with_overrides(quick, dataset="digits")) == "digits"  # 8×8, 937 left: nothing shrunk
    full = get_profile("full")
    assert full["image_size"] is None and full["image_train_size"] is None  # CIFAR-10 whole, at 32×32


def test_the_arms_of_a_seed_start_from_the_same_weights():
    """Every spec pairs initial weights by seed: BN, no normalization and GroupNorm arms of one seed share
    their convolution and classifier weights (the unnormalized net's conv biases no longer shift them)."""
    from bnlab.study.kinds import TRAIN
    data = runs.load_data(TRAIN.spec(dataset="synthetic", val_size=64, seed=0))
    nets = {norm: runs.build_model(TRAIN.spec(dataset="synthetic", val_size=64, norm=norm, seed=3, depth=8,
                                              width=0.5), data) for norm in ("bn", "none", "groupnorm")}
    weights = {norm: {f"{name}.weight": m.weight for name, m in net.named_modules()
                      if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear))}
               for norm, net in nets.items()}
    assert weights["bn"].keys() == weights["none"].keys() == weights["groupnorm"].keys()
    for key, value in weights["bn"].items():
        assert torch.equal(value, weights["none"][key]) and torch.equal(value, weights["groupnorm"][key]), key
    other = runs.build_model(TRAIN.spec(dataset="synthetic", val_size=64, norm="bn", seed=4, depth=8, width=0.5), data)
    assert not torch.equal(other.fc.weight, nets["bn"].fc.weight)
