"""Claim 2 (BN accelerates training): every outcome of its rules on synthetic results, the target set by
the unnormalized plateau run, the longer runs of an arm that had not reached it, a lower rate where an arm
diverges, and its "ours | paper" table beside Ioffe & Szegedy."""

import math

import pytest

from bnlab.study import claim_speed
from bnlab.study.claims import collect_specs
from bnlab.study.report import analyze
from bnlab.study.verdict import HOLDS, INCONCLUSIVE, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED, UNDECIDED
from synthetic import LR4, SEEDS, make_profile, make_row, paper_rows, simulate


def _speed_fake(speed, loss_level):
    """Sweep runs: validation accuracy peaks at lr 0.1 for every arm. Speed runs (constant schedule): the
    validation curve climbs linearly to 0.8 at step ``speed(arm, seed)``; the training loss sits at
    ``loss_level(arm)``."""
    def fake(spec):
        if spec.get("schedule") != "constant":
            acc = 0.8 if spec["lr"] == 0.1 else 0.6
            return make_row(val=acc, test=acc)
        k = speed(spec["norm"], spec["seed"])
        steps = list(range(1, 41))
        curve = {"step": steps, "val_acc": [0.8 * min(1.0, s / k) for s in steps], "seconds": [0.0] * 40}
        level = loss_level(spec["norm"])
        return make_row(val=0.8, losses=[2.4] + [level] * 39, curve=curve, steps=40)
    return fake


def _claim2(speed, loss_level=lambda a: 1.0):
    profile = make_profile(lr=LR4, speed={"target_fraction": 0.97})
    results = simulate(profile, [2], _speed_fake(speed, loss_level))
    return analyze(claim_speed, profile, results), profile, results


def test_claim2_supported_and_recovery_fractions():
    # target = 0.97 × 0.8: reached at step ceil(0.97 k) = k for k in {2, 4, 8}
    result, profile, results = _claim2(lambda a, s: {"bn": 2, "none": 8, "skipinit": 4}.get(a, 8),
                                       lambda a: {"bn": 0.5}.get(a, 1.0))
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["log10_speedup"]["mean"] == pytest.approx(math.log10(4))
    assert result.numbers["recovery"]["skipinit"]["mean"] == pytest.approx(0.5)  # log(8/4) / log(8/2)
    assert result.numbers["recovery"]["fixup"]["mean"] == pytest.approx(0.0)
    # the longer runs are at each arm's validated rate (0.1), with a constant schedule
    speed_runs = [s for s in collect_specs(profile, [2], results).values() if s.get("schedule") == "constant"]
    assert len(speed_runs) == 4 * len(SEEDS) and {s["lr"] for s in speed_runs} == {0.1}


def test_claim2_steps_down_when_an_arm_diverges_at_a_constant_rate():
    base = _speed_fake(lambda a, s: {"bn": 2}.get(a, 8), lambda a: {"bn": 0.5}.get(a, 1.0))

    def fake(spec):
        if spec.get("schedule") == "constant" and spec["norm"] == "fixup" and spec["lr"] == 0.1 and spec["seed"] == 3:
            return make_row("diverged", val=None, losses=(2.4, 90.0))
        return base(spec)
    profile = make_profile(lr=LR4, speed={"target_fraction": 0.97})
    results = simulate(profile, [2], fake)
    assert claim_speed._rates(profile, results, "fixup") == [0.1, 0.01]
    assert claim_speed._rates(profile, results, "bn") == [0.1]
    result = analyze(claim_speed, profile, results)
    assert result.tables[0]["rows"][3][:2] == ["Fixup", "0.01"]
    assert result.verdict.verdict == SUPPORTED


def test_claim2_equivalence_is_not_supported():
    result, _, _ = _claim2(lambda a, s: 8)
    assert result.verdict.verdict == NOT_SUPPORTED


def test_claim2_partly_when_faster_but_the_loss_is_no_lower():
    result, _, _ = _claim2(lambda a, s: {"bn": 2}.get(a, 8))
    assert [p["outcome"] for p in result.numbers["parts"]] == [HOLDS, REFUTED]
    assert result.verdict.verdict == PARTLY


def test_claim2_straddle_is_inconclusive():
    bn = {0: 2, 1: 8, 2: 3, 3: 8, 4: 2, 5: 9}
    result, _, _ = _claim2(lambda a, s: bn[s] if a == "bn" else 8, lambda a: {"bn": 0.5}.get(a, 1.0))
    assert result.numbers["parts"][0]["outcome"] == UNDECIDED
    assert result.verdict.verdict == INCONCLUSIVE


def test_claim2_target_comes_from_the_unnormalized_plateau_run_and_a_censored_arm_counts_its_budget():
    profile = make_profile(lr=LR4, speed={"epochs": 2, "plateau_epochs": 6, "target_fraction": 0.9,
                                          "warmup_fraction": 0.1})
    none_spec, bn_spec = (claim_speed._spec(profile, a, 0.1, 0) for a in ("none", "bn"))
    assert (none_spec["epochs"], bn_spec["epochs"]) == (6, 2)
    # the same warm-up steps in both: 10% of the 2 epochs every arm runs
    assert none_spec["warmup_fraction"] * 6 == pytest.approx(0.2)
    assert bn_spec["warmup_fraction"] * 2 == pytest.approx(0.2)

    def fake(spec):
        if spec.get("schedule") != "constant":
            acc = 0.8 if spec["lr"] == 0.1 else 0.6
            return make_row(val=acc, test=acc)
        n = 60 if spec["epochs"] == 6 else 20  # the plateau run is 3× longer
        steps = list(range(1, n + 1))
        if spec["norm"] == "none":  # climbs to 0.8 at step 40, then stays
            accs = [0.8 * min(1.0, s / 40) for s in steps]
        elif spec["norm"] == "bn" and spec["seed"] == 0:  # reaches 0.72 at step 45: not within its 20 steps
            accs = [0.8 * min(1.0, s / 50) for s in steps]
        elif spec["norm"] == "bn" and spec["seed"] == 1:  # never reaches 0.72, even when run longer
            accs = [0.5] * n
        else:
            accs = [0.8 * min(1.0, s / 10) for s in steps]
        return make_row(val=accs[-1], losses=[2.4] + [1.0] * (n - 1), steps=n,
                        curve={"step": steps, "val_acc": accs, "seconds": [0.0] * n})
    results = simulate(profile, [2], fake)
    findings = claim_speed.decide(profile, results)
    assert findings.targets == pytest.approx([0.72] * 6)  # 0.9 × the plateau 0.8
    assert findings.steps["none"] == [36.0] * 6  # 0.8 × 36/40 = 0.72
    # seeds 0 and 1 had not reached the target after 2 epochs: both ran again for the plateau's 6 epochs;
    # seed 0 then reached it at step 45, seed 1 never did and counts the plateau run's 60 steps
    assert findings.extended["bn"] == [0, 1] and findings.extended["skipinit"] == []
    longer = [s for s in results.values() if s["status"] == "done" and s["result"]["steps"] == 60]
    assert len(longer) == 6 + 2  # none's six plateau runs and BN's two longer ones
    assert findings.steps["bn"] == [45.0, 60.0] + [9.0] * 4
    assert findings.censored["bn"] == 1 and findings.common_steps == 20  # never, even run longer
    assert findings.parts[0].effect.values[1] == pytest.approx(math.log10(36 / 60))  # counts against BN


def test_claim2_paper_table_beside_ioffe_and_szegedy():
    result, _, _ = _claim2(lambda a, s: {"bn": 2, "none": 8}.get(a, 8))
    row = paper_rows(result)["steps without BN / steps with BN to the target"]
    assert row[1].startswith("4×")                          # 8 steps without BN, 2 with it
    assert "31.0M / 2.1M" in row[2] and "ImageNet" in row[3] and "synthetic" in row[3]
