"""Claim 1 (internal covariate shift): the run design, every verdict outcome from synthetic results, and
its "ours | paper" table beside Santurkar et al."""

import copy

import numpy as np
import pydantic
import pytest

from bnlab.study import claim_ics
from bnlab.study.report import analyze
from bnlab.study.specs import spec_key
from bnlab.study.verdict import (HOLDS, INCONCLUSIVE, NO_VERDICT, NOT_SUPPORTED, PARTLY, REFUTED, SUPPORTED,
                                 UNDECIDED)
from synthetic import paper_rows


# ---------------------------------------------------------- the design: runs, learning rates, profile section


SEEDS = [0, 1, 2, 3, 4, 5]

PROFILE = {"name": "synthetic", "dataset": "synthetic", "seeds": SEEDS, "width": 0.25, "depth": 8, "val_size": 64,
           "ics": {**claim_ics.PRESETS["tiny"], "lrs": {"bn": [0.1, 0.3], "none": [0.03, 0.1],
                                                        "noisy_bn": [0.1, 0.3]}, "ics_lr": 0.1}}


def test_gradient_ics_is_measured_for_bn_and_none_at_one_common_learning_rate():
    specs = claim_ics.measure(PROFILE)
    measured = [s for s in specs if s["measure_every"] > 0]
    assert {s["arm"] for s in measured} == {"bn", "none"}
    assert {s["lr"] for s in measured} == {0.1}
    for seed in SEEDS:  # paired: each seed has both arms, same lr, same steps and batch size
        pair = [s for s in measured if s["seed"] == seed]
        assert len(pair) == 2 and len({(s["lr"], s["steps"], s["batch_size"]) for s in pair}) == 1
    # every arm runs over its whole grid for every seed; a common lr outside a grid adds its own runs
    assert len(specs) == len(SEEDS) * 2 * 5
    off_grid = copy.deepcopy(PROFILE)
    off_grid["ics"]["ics_lr"] = 0.05
    extra = [s for s in claim_ics.measure(off_grid) if s["lr"] == 0.05]
    assert {s["arm"] for s in extra} == {"bn", "none"} and all(s["measure_every"] > 0 for s in extra)


def test_noisy_arms_share_bn_and_differ_only_in_noise():
    bn, noisy = claim_ics._spec(PROFILE, "bn", 0.1, 0), claim_ics._spec(PROFILE, "noisy_bn:2", 0.1, 0)
    assert noisy["norm"] == "bn" and noisy["noise"] == 2.0 and bn["noise"] == 0.0
    differing = {k for k in set(bn) | set(noisy) if bn.get(k) != noisy.get(k)}
    assert differing == {"arm", "noise", "measure_every", "probe_steps"}   # only BN measures gradient ICS here


def test_presets_validate_and_bad_sections_are_rejected():
    for name, preset in claim_ics.PRESETS.items():
        claim_ics.Config(**preset)
        assert len(claim_ics.noise_arms(preset["arms"])) >= 3, name
    good = claim_ics.PRESETS["quick"]
    for change, message in [({"arms": ["bn", "none", "noisy_bn:1"]}, "at least 3"),
                            ({"arms": ["bn", "none", "noisy_bn:1", "noisy_bn:2", "groupnorm"]}, "unknown arm"),
                            ({"ics_lr": -0.1}, "positive"),
                            ({"steps": 0}, "greater than or equal to 1"),
                            ({"lrs": {**good["lrs"], "none": [0.1, -1.0]}}, "positive"),
                            ({"speed": 3}, "Extra inputs")]:
        with pytest.raises(pydantic.ValidationError, match=message):
            claim_ics.Config(**{**good, **change})


# ---------------------------------------------------------------------------- verdicts from synthetic results


ETAS = PROFILE["ics"]["probe_steps"]   # [0.01, 0.1]: the tiny preset's probe steps (ics_lr 0.1 among them)


def _run(cos: float, val: float, test: float, relative=0.1, descent=True, spike_at=None) -> dict:
    """A claim-1 run with three gradient-ICS measurements (steps 0, 2, 4). ``relative`` and ``descent``: the
    relative gradient change ‖G − G′‖/‖G‖ and whether the probe step lowers the loss, per probe step (a dict
    η → value) or the same at every η. ``spike_at``: a step whose batch loss spikes (training unstable there)."""
    steps = [0, 2, 4]
    ema = [2.3, 1.5, 1.0]
    losses = [2.3, 2.0, 1.5, 1.2, 1.0, 0.9]
    if spike_at is not None:
        losses[spike_at] = 50.0
    ema_losses = [2.3, 2.2, 2.0, 1.8, 1.6, 1.5]
    at = (lambda v, eta: v[eta] if isinstance(v, dict) else v)
    probe = {"etas": ETAS, "step": steps, "loss": [losses[i] for i in steps],
             "relative": [[[at(relative, eta)] * 2 for eta in ETAS] for _ in steps],
             "cosine": [[[cos] * 2 for _ in ETAS] for _ in steps], "distance": [[[0.1] * 2 for _ in ETAS] for _ in steps],
             "descent": [[at(descent, eta) for eta in ETAS] for _ in steps]}
    return {"ics": {"step": steps, "ema_loss": ema, "cosine": [[cos, cos]] * 3, "distance": [[0.1, 0.1]] * 3,
                    "probe": probe},
            "losses": losses, "ema_losses": ema_losses,
            "smooth": {"step": steps, "ema_loss": ema, "loss_range": [0.1] * 3, "grad_change": [0.1] * 3,
                       "beta": [1.0] * 3},
            "dist": {"step": steps, "p15": [0.0] * 3, "p50": [0.0, 0.1, 0.0], "p85": [1.0] * 3},
            "curve": {"step": [3, 6], "val_acc": [val / 2, val], "val_loss": [1.0, 0.5]},
            "final": {"val_acc": val, "test_acc": test, "chance": 0.25}, "layers": ["a.weight", "b.weight"]}


def _results(cos: dict, test: dict, cost_by_seed=None, val_bonus=None, failed=(), relative=None, descent=None,
             spike=None) -> dict:
    """Every run of PROFILE: cos[arm] (BN and none, at ics_lr), test accuracy test[arm] (fraction) with a small
    per-seed wiggle; noisy arms' accuracy is BN's minus ``cost_by_seed[seed]`` points when given. Validation
    accuracy equals test accuracy plus ``val_bonus[(arm, lr)]``. ``relative[arm]`` (× a per-seed wiggle),
    ``descent[arm]`` and ``spike[arm]`` are passed to :func:`_run` (defaults: BN 0.05, none 0.2, every step
    a descent step, no spike)."""
    relative = relative or {"bn": 0.05, "none": 0.2}
    results = {}
    for spec in claim_ics.measure(PROFILE):
        arm, lr, seed = spec["arm"], spec["lr"], spec["seed"]
        acc = test.get("noisy" if arm.startswith("noisy") else arm, test["bn"]) + 0.001 * seed
        if cost_by_seed is not None and arm.startswith("noisy"):
            acc = test["bn"] + 0.001 * seed - cost_by_seed[seed] / 100
        val = acc + (val_bonus or {}).get((arm, lr), 0.0)
        status = "failed" if (arm, lr, seed) in failed else "done"
        rel = relative.get(arm, 0.1)
        rel = {eta: v * (1 + 0.01 * seed) for eta, v in rel.items()} if isinstance(rel, dict) else rel * (1 + 0.01 * seed)
        run = _run(cos.get(arm, 0.0) + 0.002 * seed, val, acc, rel, (descent or {}).get(arm, True),
                   (spike or {}).get(arm))
        results[spec_key(spec)] = {"status": status, "result": run if status == "done" else {}}
    return results


def test_supported_when_bn_lowers_ics_and_noise_costs_accuracy():
    # the gradient changes 4× less with BN at every probe step: log10(0.2 / 0.05) = 0.602 decades
    result = analyze(claim_ics, PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8, "noisy": 0.85}))
    assert [p.outcome for p in result.verdict.parts] == [HOLDS, HOLDS]
    assert result.verdict.verdict == SUPPORTED and result.agrees_with_literature is False
    assert result.verdict.parts[0].effect.interval.mean == pytest.approx(np.log10(4.0))
    # the disagreement with Santurkar et al. is shown beside what was measured: ICS at every probe step
    assert result.differences[0].startswith("Gradient ICS without BN ÷ with BN at each probe step: η ")
    assert result.differences[0].count("0.60 decades") == len(PROFILE["ics"]["probe_steps"]), result.differences[0]
    assert result.verdict.parts[1].effect.interval.mean == pytest.approx(10.0)


def test_not_supported_through_equivalence():
    # the same relative gradient change with and without BN, and the noise costs 0.3 points: both effects absent
    result = analyze(claim_ics, PROFILE, _results({"bn": 0.7, "none": 0.695}, {"bn": 0.95, "none": 0.8},
                                                  cost_by_seed=[0.3, 0.2, 0.4, 0.3, 0.25, 0.35],
                                                  relative={"bn": 0.1, "none": 0.105}))
    assert [p.outcome for p in result.verdict.parts] == [REFUTED, REFUTED]
    assert not result.verdict.parts[0].reversed
    assert result.verdict.verdict == NOT_SUPPORTED and result.agrees_with_literature is True


def test_partly_supported_and_inconclusive():
    partly = analyze(claim_ics, PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8},
                                                  cost_by_seed=[0.1] * 6))
    assert partly.verdict.verdict == PARTLY
    # the cost straddles the threshold: mean 2.5, spread over seeds from −1 to 6 points
    straddle = analyze(claim_ics, PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8},
                                                    cost_by_seed=[-1.0, 6.0, 0.5, 4.5, 1.0, 4.0]))
    assert [p.outcome for p in straddle.verdict.parts] == [HOLDS, UNDECIDED]
    assert straddle.verdict.verdict == INCONCLUSIVE and straddle.agrees_with_literature is None
    assert "injected shift costs accuracy is undecided" in straddle.verdict.explanation


def test_a_failed_run_means_no_verdict():
    results = _results({"bn": 0.7, "none": 0.695}, {"bn": 0.95, "none": 0.8}, cost_by_seed=[0.3] * 6,
                       failed={("noisy_bn:2", 0.3, 4)})
    result = analyze(claim_ics, PROFILE, results)
    assert result.failed_runs == 1 and result.verdict.verdict == NO_VERDICT
    assert result.agrees_with_literature is None and "failed" in result.verdict.explanation


def test_learning_rates_are_chosen_on_validation_and_reported_on_test():
    # BN at lr 0.3 is better on validation (+5 points) while test accuracy is the same at both rates:
    # the choice must be 0.3, and the noisy arm at 0.1 wins its validation by 3 points
    bonus = {("bn", 0.3): 0.05, ("noisy_bn:1", 0.1): 0.03}
    findings = claim_ics.decide(PROFILE, _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8,
                                                                              "noisy": 0.9}, val_bonus=bonus))
    assert findings.chosen_lr["bn"] == 0.3 and findings.chosen_lr["noisy_bn:1"] == 0.1
    assert findings.rule_arm == "noisy_bn:1"  # the middle of strengths 0.5, 1, 2
    assert findings.test_acc["bn"][0] == pytest.approx(95.0)  # test accuracy, not the validation number


def test_an_overshooting_probe_step_leaves_the_stable_range_and_is_reported_as_instability():
    """Without BN the probe step at the training rate raises the loss (no descent): that η leaves the stable
    range, and part 1 is decided at the smaller one alone, where the gradient changes alike with and without
    BN (refuted), however much larger the change is at the overshooting step."""
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8}, cost_by_seed=[0.3] * 6,
                       relative={"bn": {0.01: 0.01, 0.1: 0.05}, "none": {0.01: 0.0101, 0.1: 0.5}},
                       descent={"none": {0.01: True, 0.1: False}})
    findings = claim_ics.decide(PROFILE, results)
    assert findings.stable_etas == [0.01] and not findings.changes
    assert [p.outcome for p in findings.probes] == [REFUTED, HOLDS]      # at η = 0.1 alone it would hold
    assert findings.parts[0].outcome == REFUTED
    assert findings.probes[1].descent == {"bn": 1.0, "none": 0.0}
    explanation = analyze(claim_ics, PROFILE, results).verdict.explanation
    assert "the unnormalized net's step raised the loss in 100% of the measurements, BN's in 0%" in explanation


def test_an_outcome_that_changes_inside_the_stable_range_is_undecided():
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8}, cost_by_seed=[0.3] * 6,
                       relative={"bn": {0.01: 0.01, 0.1: 0.05}, "none": {0.01: 0.0101, 0.1: 0.5}})
    findings = claim_ics.decide(PROFILE, results)
    assert findings.stable_etas == [0.01, 0.1] and findings.changes
    assert findings.parts[0].outcome == UNDECIDED
    assert "the outcome changed between probe steps" in analyze(claim_ics, PROFILE, results).verdict.explanation
    # the answer names each outcome with its probe steps (it used to say "(about 1.0× so far; …)" of one of them)
    said = claim_ics.answer(findings)
    assert "the answer changed with the probe step η among those where both networks' steps were stable (" in said
    assert " at η 0.01" in said and " at η 0.1" in said and "so far" not in said.split("),")[0], said


def test_refuted_at_one_probe_step_and_undecided_at_another_is_refuted():
    """The claim is made for every probe step of the stable range: one step where BN clearly does not lower
    gradient ICS refutes it, when it holds at none (quick's seed sets 0-29: refuted at η ≤ 0.01, undecided at
    0.03-0.1, which the every-η rule of v3 left inconclusive in all five). The refutation is read at the
    Bonferroni level, 97.5% with two probe steps."""
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8}, cost_by_seed=[0.3] * 6,
                       relative={"bn": 0.1, "none": 0.1})
    straddle = [0.0, 0.4, 0.1, 0.3, -0.1, 0.5]   # log10 none ÷ BN at η = 0.1, per seed: mean 0.2, undecided
    for spec in claim_ics.measure(PROFILE):
        if spec["arm"] == "none" and spec["lr"] == PROFILE["ics"]["ics_lr"]:
            bn = 0.1 * (1 + 0.01 * spec["seed"])   # BN's relative change at every η (_results' wiggle)
            for row in results[spec_key(spec)]["result"]["ics"]["probe"]["relative"]:
                row[1] = [bn * 10 ** straddle[spec["seed"]]] * 2
    findings = claim_ics.decide(PROFILE, results)
    assert [p.outcome for p in findings.probes] == [REFUTED, UNDECIDED] and findings.stable_etas == [0.01, 0.1]
    assert findings.parts[0].outcome == REFUTED and findings.part1_eta == 0.01 and not findings.reverses
    assert findings.parts[0].level == 0.975
    assert findings.probes[1].effect.interval.mean == pytest.approx(np.mean(straddle))
    result = analyze(claim_ics, PROFILE, results)
    assert result.verdict.verdict == NOT_SUPPORTED           # the premise refuted
    assert "at η = 0.01 the gradient changed" in result.verdict.explanation
    assert "the 97.5% interval of a claim tested at 2 probe steps" in result.verdict.explanation
    assert result.answer.startswith("BN did not clearly lower gradient ICS: at probe step η 0.01 earlier layers' "
                                    "steps changed a layer's gradient at most slightly less with BN (about 1.0×), "
                                    "and at no probe step where both networks' steps were stable did BN clearly "
                                    "lower it"), result.answer


def test_measurements_at_an_unstable_step_count_for_neither_arm():
    # a loss spike at step 2 in the unnormalized runs: that measurement is left out of both arms
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8}, spike={"none": 2})
    findings = claim_ics.decide(PROFILE, results)
    assert all(p.counted == 2 * len(SEEDS) for p in findings.probes)
    assert claim_ics.decide(PROFILE, _results({"bn": 0.9, "none": 0.5},
                                              {"bn": 0.95, "none": 0.8})).probes[0].counted == 3 * len(SEEDS)


def test_the_report_says_when_bn_is_still_rising_at_the_end():
    """Part 2 compares accuracy after the budget; when BN's validation accuracy still rises by more than the
    part's margin over the last third, the explanation says the comparison is not at convergence."""
    results = _results({"bn": 0.9, "none": 0.5}, {"bn": 0.95, "none": 0.8, "noisy": 0.9})
    rising = analyze(claim_ics, PROFILE, results).verdict.explanation  # _run's curve doubles: val/2 → val
    assert "still rising" in rising and "not at convergence" in rising
    for row in results.values():
        if row["status"] == "done":
            curve = row["result"]["curve"]
            curve["val_acc"] = [curve["val_acc"][-1] - 0.005 * i for i in (1, 0)]  # +0.5 points: a plateau
    flat = analyze(claim_ics, PROFILE, results)
    assert "still rising" not in flat.verdict.explanation
    assert flat.numbers["bn_plateau_gain"]["mean"] == pytest.approx(0.5)


def test_claim1_paper_table_beside_santurkar():
    result = analyze(claim_ics, PROFILE, _results({"bn": 0.9, "none": 0.5},
                                                         {"bn": 0.95, "none": 0.8, "noisy": 0.85}))
    rows = paper_rows(result)
    ics = rows["gradient ICS with BN against without (their Fig. 5: ‖G − G′‖ and cos(G, G′))"]
    assert ics[1].startswith("ratio none ÷ BN 0.60") and "Santurkar et al. 2018" in ics[2]   # log10(0.2 / 0.05)
    noisy = rows["test accuracy, BN − noisy BN (points)"]
    assert noisy[1].startswith("10.0")                                               # 95% − 85%
    assert "stands in for their VGG" in noisy[3] and "VGG network on CIFAR-10" in noisy[3]


def test_without_the_premise_the_claim_is_not_supported_even_if_noise_costs_accuracy():
    """BN does not reduce gradient ICS (part 1 refuted) while injected noise costs accuracy (part 2 holds):
    the claim "BN reduces ICS, and that is why it helps" is not supported, not partly."""
    result = analyze(claim_ics, PROFILE, _results({"bn": 0.7, "none": 0.695}, {"bn": 0.95, "none": 0.8, "noisy": 0.85},
                                                  relative={"bn": 0.1, "none": 0.105}))
    assert [p.outcome for p in result.verdict.parts] == [REFUTED, HOLDS]
    assert result.verdict.verdict == NOT_SUPPORTED
