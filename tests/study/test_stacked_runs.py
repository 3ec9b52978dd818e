"""Train runs that differ only in their seed and learning rate, trained as one stack
(bnlab.study.runs.run_train_stack). The oracle is each run alone (run_train)."""

import math

import pytest

from bnlab.study import get_profile, kinds, runs
from bnlab.study.common import train_spec
from bnlab.study.runner import stacks


def _specs(seeds=(0, 1, 2), **kw):
    profile = get_profile("tiny")
    fields = dict(norm="bn", lr=0.05, batch_size=32, max_steps=12)
    fields.update(kw)
    return [train_spec(profile, seed=s, **fields) for s in seeds]


def _close(a, b, rel=1e-3):
    return a is None and b is None or (a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-5))


@pytest.mark.parametrize("norm", ["bn", "none", "ghost:4", "groupnorm:4"])
def test_each_member_of_a_stack_is_its_run_alone(norm):
    specs = _specs(norm=norm)
    alone = [runs.run_train(s) for s in specs]
    stacked = runs.run_train_stack(specs)
    for i, ((status, one), (status_s, member)) in enumerate(zip(alone, stacked)):
        assert status_s == status and member["reason"] == one["reason"] and member["steps"] == one["steps"]
        assert member["stack"] == {"members": 3, "index": i}
        assert all(_close(a, b, 1e-4) for a, b in zip(member["losses"][:4], one["losses"][:4])), (norm, i)
        assert member["curve"]["step"] == one["curve"]["step"]
        assert all(_close(a, b) for a, b in zip(member["curve"]["train_loss"], one["curve"]["train_loss"]))
        for name in ("val_acc", "test_acc", "train_acc"):
            a, b = member["final"][name], one["final"][name]
            assert (a is None and b is None) or abs(a - b) <= 0.05, (norm, i, name)
        assert _close(member["weight_norm"]["initial"], one["weight_norm"]["initial"], 1e-9)
        assert ("bn_snapshot" in member) == ("bn_snapshot" in one)
    # which seeds share a stack changes a run by rounding only
    pair = runs.run_train_stack(specs[1:])
    for (_, m), (_, n) in zip(pair, stacked[1:]):
        assert all(_close(a, b, 1e-4) for a, b in zip(m["losses"][:6], n["losses"][:6]))


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_members_at_different_learning_rates_are_their_runs_alone(norm):
    """A learning-rate grid as one stack — two members share seed 0 — under the tiny profile's decaying
    schedule with momentum: each member's losses and results are its run's alone at its rate."""
    specs = [_specs(seeds=(s,), lr=lr, norm=norm)[0] for s, lr in ((0, 0.02), (0, 0.1), (1, 0.05))]
    alone = [runs.run_train(s) for s in specs]
    stacked = runs.run_train_stack(specs)
    for (status, one), (status_s, member), spec in zip(alone, stacked, specs):
        assert status_s == status and member["steps"] == one["steps"], spec["lr"]
        assert all(_close(a, b, 1e-4) for a, b in zip(member["losses"][:6], one["losses"][:6])), spec["lr"]
        assert abs(member["final"]["val_acc"] - one["final"]["val_acc"]) <= 0.05
    first = [m["losses"][:6] for _, m in stacked[:2]]
    assert first[0][0] == pytest.approx(first[1][0], rel=1e-5) and first[0][5] != pytest.approx(first[1][5], rel=1e-3), \
        "the same seed at two rates: the same first loss, then apart"


def test_members_that_fit_early_stop_where_they_would_alone():
    """Claim 3's runs stop once they fit: each member stops at its own step, as alone, and the rest go on."""
    specs = _specs(seeds=(0, 1, 2, 3), stop_at_train_acc=0.6, max_steps=60, eval_every=2, train_eval_size=64,
                   schedule="constant")
    alone = [runs.run_train(s) for s in specs]
    stacked = runs.run_train_stack(specs)
    steps = [one["steps"] for _, one in alone]
    assert len(set(steps)) > 1, "the test needs members that stop at different steps"
    for (status, one), (status_s, member) in zip(alone, stacked):
        assert (status_s, member["steps"]) == (status, one["steps"])
        assert member["reason"].startswith("fitted") == one["reason"].startswith("fitted")


def test_diverged_members_say_so_as_alone():
    specs = _specs(norm="none", lr=2000.0, max_steps=6)
    alone = [runs.run_train(s) for s in specs]
    stacked = runs.run_train_stack(specs)
    assert all(status == "diverged" for status, _ in alone)
    for (status, one), (status_s, member) in zip(alone, stacked):
        assert status_s == "diverged" and member["steps"] == one["steps"]
        assert member["reason"].split(" is ")[-1] == one["reason"].split(" is ")[-1]


def test_the_runner_stacks_one_group_in_even_stacks_by_rate_then_seed():
    """Ten seeds at lr 0.05 and two at 0.2 are one group (twelve runs: three stacks of four, the two at 0.2
    together); three runs without normalization another (one stack of three); nine runs of a group five at a
    time: stacks of five and four, not five and one."""
    specs = _specs(seeds=range(10)) + _specs(seeds=(0, 1), lr=0.2) + _specs(seeds=(0, 1, 2), norm="none")
    ics = {"kind": "ics", "seed": 0, "steps": 10}
    items = [(f"k{i}", s) for i, s in enumerate(specs)] + [("ics", ics)]
    jobs = stacks(items, most=4)
    assert sorted(len(j) for j in jobs) == [1, 3, 4, 4, 4]
    for job in jobs:
        assert len({kinds.stack_group(s) for _, s in job}) == 1
        order = [(s.get("lr"), s["seed"]) for _, s in job]
        assert order == sorted(order)
    assert any([(s["lr"], s["seed"]) for _, s in job][-2:] == [(0.2, 0), (0.2, 1)] for job in jobs)
    assert sorted(k for job in jobs for k, _ in job) == sorted(k for k, _ in items)
    assert all(len(j) == 1 for j in stacks(items, most=1))
    nine = [(f"n{i}", s) for i, s in enumerate(_specs(seeds=range(9)))]
    assert sorted(len(j) for j in stacks(nine, most=5)) == [4, 5]


def test_a_stack_that_fails_fails_every_run_with_the_traceback():
    specs = [dict(s, dataset="no-such-dataset") for s in _specs(seeds=(0, 1))]
    outcomes = kinds.execute_stack(specs)
    assert [o[0] for o in outcomes] == ["failed", "failed"]
    assert all("no-such-dataset" in o[2] for o in outcomes)
    with pytest.raises(ValueError, match="one stack group"):
        kinds.execute_stack(_specs(seeds=(0,)) + _specs(seeds=(1,), norm="none"))
