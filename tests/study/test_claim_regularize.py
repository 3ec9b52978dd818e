"""Claim 3 (BN regularizes): every outcome of its rules on synthetic results, unfit and diverged runs counted
as intervals, the choice among rates that fit, training to the fit, and its "ours | paper" table beside Wu & He."""

import pytest

from bnlab.study import claim_regularize
from bnlab.study.report import analyze
from bnlab.study.verdict import INCONCLUSIVE, NO_VERDICT, NOT_SUPPORTED, PARTLY, SUPPORTED, UNDECIDED
from synthetic import leading_number, make_profile, make_row, paper_rows, simulate


def _reg_fake(gap, train=lambda a, s: 1.0, status=lambda a, s: "done"):
    """Every arm fits (training accuracy ``train``); its test = validation accuracy is ``gap`` points lower
    (plus a per-seed jitter of 0.1 point), at every learning rate."""
    def fake(spec):
        arm = "none+wd" if spec["norm"] == "none" and spec["weight_decay"] > 0 else spec["norm"].split(":")[0] \
            if spec["norm"].startswith("groupnorm") else spec["norm"]
        tr = train(arm, spec["seed"])
        test = tr - gap(arm, spec["seed"]) / 100 - 0.001 * spec["seed"]
        return make_row(status(arm, spec["seed"]), val=test, test=test, train=tr,
                        weight_norm={"initial": 10.0, "final": 8.0 if arm == "none+wd" else 12.0})
    return fake


def _claim3(gap, **kw):
    profile = make_profile(regularize={"fit_threshold": 99.0})
    return analyze(claim_regularize, profile, simulate(profile, [3], _reg_fake(gap, **kw)))


def test_claim3_supported_with_the_gap_reduction_of_the_data():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5, "ghost:16": 8, "groupnorm": 12, "none+wd": 15}
    result = _claim3(lambda a, s: gaps[a])
    assert result.verdict.verdict == SUPPORTED
    assert result.numbers["gap_reduction"]["mean"] == pytest.approx(10.0)
    assert result.numbers["noise_effect"]["mean"] == pytest.approx(5.0)
    assert result.numbers["groupnorm_reduction"]["mean"] == pytest.approx(8.0)
    table = {row[0]: row for row in result.tables[0]["rows"]}
    assert table["no norm + weight decay"][5].startswith("-20.0")  # 10 → 8: the weights shrank by 20%


def test_claim3_equivalence_is_not_supported_and_disagrees_with_the_literature():
    result = _claim3(lambda a, s: 10)
    assert result.verdict.verdict == NOT_SUPPORTED and result.agrees_with_literature is False


def test_claim3_partly_when_bn_helps_but_batch_noise_does_not():
    result = _claim3(lambda a, s: {"none": 20}.get(a, 10))
    assert result.verdict.verdict == PARTLY


def test_claim3_straddle_is_inconclusive():
    jitter = {0: 0, 1: 4, 2: -2, 3: 3, 4: -1, 5: 2}
    result = _claim3(lambda a, s: {"none": 11 + jitter[s], "ghost:4": 5}.get(a, 10))
    assert result.numbers["parts"][0]["outcome"] == UNDECIDED and result.verdict.verdict == INCONCLUSIVE


def test_claim3_counts_every_seed_unfit_and_diverged_runs_as_intervals():
    """No seed is left out: a run below the fit threshold enters with its gap up to that gap plus the training
    accuracy it lacks, a diverged one at chance (gap 0) up to what it lacks; the part is decided only when
    both ends agree."""
    gaps = {"none": 20, "bn": 10, "ghost:4": 5}
    # none misses the fit by 1 point on seeds 0 and 1: the ends (gap 19 … 20) both hold
    result = _claim3(lambda a, s: gaps.get(a, 10), train=lambda a, s: 0.98 if a == "none" and s < 2 else 1.0)
    assert result.numbers["intervals"]["none"] == {"diverged": 0, "unfit": 2}
    assert result.numbers["parts"][0]["n"] == 6 and result.numbers["parts"][0]["outcome"] == "holds"
    # what a disagreement with the papers would be read beside: the unfit seeds and the span of the ends
    unfit = next(d for d in result.differences if "did not fit" in d)
    assert "in 2 of 6 seeds" in unfit and "10.0 to 10.7 points" in unfit, unfit
    low, high = result.numbers["ends"][0]["low"], result.numbers["ends"][0]["high"]
    assert low["mean"] == pytest.approx(10.0) and high["mean"] == pytest.approx(10.0 + 2 * 2 / 6)
    # a BN run that diverged (chance on both: gap 0, up to 100 − 10 = 90 points) makes the ends disagree
    result = _claim3(lambda a, s: gaps.get(a, 10), status=lambda a, s: "diverged" if a == "bn" and s == 5 else "done")
    assert result.numbers["intervals"]["bn"] == {"diverged": 1, "unfit": 0}
    assert result.numbers["parts"][0]["n"] == 6 and result.numbers["parts"][0]["outcome"] == UNDECIDED
    assert result.verdict.verdict == INCONCLUSIVE


def test_claim3_chooses_among_the_rates_at_which_the_arm_fits():
    # without normalization lr 0.2 validates better but leaves seed 1 at 90% training accuracy; lr 0.05
    # fits every tuning seed, so it is chosen and no seed is excluded
    profile = make_profile(regularize={"fit_threshold": 99.0, "lrs": [0.05, 0.2]})
    profile["tune_seeds"] = 2

    def fake(spec):
        unfit = spec["norm"] == "none" and spec["lr"] == 0.2 and spec["seed"] == 1
        acc = 0.7 if spec["lr"] == 0.2 else 0.6
        return make_row(val=acc, test=acc, train=0.9 if unfit else 1.0, weight_norm={"initial": 1.0, "final": 1.0})
    results = simulate(profile, [3], fake)
    per_arm = claim_regularize.decide(profile, results).arms
    assert per_arm["none"].lr == 0.05 and per_arm["none"].unfit == 0 and len(per_arm["none"].gap) == 6
    assert per_arm["none"].gap == per_arm["none"].gap_high   # every run fitted: no interval
    assert per_arm["bn"].lr == 0.2


def test_claim3_paper_table_beside_wu_and_he():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5, "ghost:16": 8, "groupnorm": 12, "none+wd": 15}
    rows = paper_rows(_claim3(lambda a, s: gaps[a]))
    # test accuracy = 100 − gap − 0.1·seed points, so the error is gap + 0.1·mean(seeds) = gap + 0.25
    ghost4, ghost16 = (rows[f"test error % with BN over {g} images (ours: ghost batches of {g})"] for g in (4, 16))
    assert leading_number(ghost4[1]) == pytest.approx(5.25, abs=0.051) and ghost4[2].startswith("27.3")  # shown to 0.1
    assert leading_number(ghost16[1]) == pytest.approx(8.25, abs=0.051) and ghost16[2].startswith("23.7")
    assert leading_number(rows["test error % with GroupNorm"][1]) == pytest.approx(12.25, abs=0.051)
    assert rows["test error % with BN over 2 images (ours: ghost batches of 2)"][1] == "not measured by this profile"
    assert "overfitting regime" in rows["test error % with GroupNorm"][3]


def test_claim3_runs_train_at_a_constant_rate_until_they_fit():
    from bnlab.study import get_profile
    profile = get_profile("quick")
    specs = claim_regularize.measure(profile)
    cfg = profile["regularize"]
    assert {s["schedule"] for s in specs} == {"constant"}
    assert {s["stop_at_train_acc"] for s in specs} == {cfg["fit_threshold"] / 100}
    assert {s["max_steps"] for s in specs} == {cfg["max_steps"]}
    assert {s["norm"] for s in specs} >= {"groupnorm:4", "bn", "ghost:4", "ghost:16", "none"}


def test_a_run_stops_at_the_evaluation_where_it_fits(tmp_path):
    """A real run on the synthetic dataset: it stops at the first evaluation with training accuracy at or
    above the threshold, long before the cap, and its final model is the one that fitted."""
    from bnlab.study import kinds, runs
    spec = kinds.TRAIN.spec(dataset="synthetic", val_size=64, subset=64, norm="bn", lr=0.05, batch_size=32,
                            max_steps=400, epochs=10 ** 6, weight_decay=0.0, seed=0, train_eval_size=64,
                            schedule="constant", warmup_fraction=0.01, stop_at_train_acc=0.9, eval_every=4, depth=8,
                            width=0.25)
    status, result = runs.run_train(spec)
    assert status == "done" and result["reason"].startswith("fitted")
    assert result["steps"] < 400 and result["steps"] % 4 == 0
    accs = result["curve"]["train_acc"]
    assert accs[-1] >= 0.9 and all(a < 0.9 for a in accs[:-1])
    assert result["final"]["train_acc"] == accs[-1]


def test_claim3_at_its_own_depth_is_one_set_of_runs_for_both_depth_settings():
    """``regularize.depth`` fixes claim 3's depth whatever the setting's (standard: ResNet-8 in its depth-14
    settings too); unset, the claim follows the setting."""
    from bnlab.study import get_profile
    from bnlab.study.profiles import validate
    from bnlab.study.scope import collect

    profile = get_profile("tiny")
    profile["settings"] = [{}, {"depth": 14}]
    follows = collect(validate(profile), [3])
    assert {s["depth"] for s in follows.values()} == {8, 14}
    profile["regularize"]["depth"] = 8
    fixed = collect(validate(profile), [3])
    assert {s["depth"] for s in fixed.values()} == {8}
    assert len(fixed) * 2 == len(follows)     # the depth-14 setting asks for the very runs of the depth-8 one
    assert get_profile("standard")["regularize"]["depth"] == 8


def test_claim3_says_when_it_trains_at_another_depth_than_its_setting():
    gaps = {"none": 20, "bn": 10, "ghost:4": 5, "ghost:16": 8, "groupnorm": 12, "none+wd": 15}
    profile = make_profile(regularize={"fit_threshold": 99.0, "depth": 8})
    profile["depth"] = 14                                   # the setting's depth
    result = analyze(claim_regularize, profile, simulate(profile, [3], _reg_fake(lambda a, s: gaps[a])))
    assert any("ResNet-8" in c and "ResNet-14" in c for c in result.caveats)
    # the "ours | paper | setting" table names the depth the runs trained at
    assert any("ours: " in row[3] and "ResNet-8," in row[3] for row in result.tables[1]["rows"])
    same = _claim3(lambda a, s: gaps[a])
    assert not any("setting's ResNet" in c for c in same.caveats)


def test_claim3_parts_stop_separately_and_only_the_undecided_part_runs_more_seeds():
    """Under claim 3's own looks (3, 6, 9 seeds) part 1 (none − BN, 20 points on every seed) is decided at the
    first look, so the unnormalized net stops at 3 seeds; part 2 (BN − ghost 4, a spread-out 0.75 points
    between margin and threshold) stays undecided, so BN and ghost batches of 4 run all 9 seeds; the arms
    of no part (GroupNorm, weight decay, ghost batches of 16) run the first look's 3; each part is judged at
    its own look's seeds and level."""
    noise = [3.0, -2.0, 1.0, 4.0, -3.0, 2.0, 0.0, 1.0, 0.75]   # bn − ghost:4 per seed (mean 0.75)
    gaps = {"none": 30, "bn": 10, "ghost:16": 10, "groupnorm": 12, "none+wd": 25}
    profile = make_profile(regularize={"fit_threshold": 99.0, "looks": [3, 6, 9], "look_alphas": [0.01, 0.01, 0.02]})
    profile["seeds"] = list(range(9))
    fake, ran = _reg_fake(lambda a, s: 10 - noise[s] if a == "ghost:4" else gaps[a]), []
    results = simulate(profile, [3], lambda spec: ran.append(spec) or fake(spec))
    seeds = {}
    for spec in ran:
        arm = "none+wd" if spec["norm"] == "none" and spec["weight_decay"] else spec["norm"].split(":")[0] \
            if spec["norm"].startswith("groupnorm") else spec["norm"]
        seeds.setdefault(arm, set()).add(spec["seed"])
    assert {a: sorted(s) for a, s in seeds.items()} == {
        "none": [0, 1, 2], "groupnorm": [0, 1, 2], "none+wd": [0, 1, 2], "ghost:16": [0, 1, 2],
        "bn": list(range(9)), "ghost:4": list(range(9))}
    result = analyze(claim_regularize, profile, results)
    first, second = result.numbers["parts"]
    assert (first["outcome"], first["n"], first["confidence"]) == ("holds", 3, pytest.approx(0.99))
    assert (second["outcome"], second["n"], second["confidence"]) == (UNDECIDED, 9, pytest.approx(0.98))
    assert second["interval"]["mean"] == pytest.approx(sum(noise) / 9)
    assert result.verdict.verdict == INCONCLUSIVE
    assert any("stopped separately" in p and "on 3 seeds" in p and "on 9;" in p and "first look's 3" in p
               for p in result.paragraphs), result.paragraphs
    assert result.numbers["groupnorm_reduction"]["mean"] == pytest.approx(18.0)   # paired on seeds 0-2
    table = {row[0]: row for row in result.tables[0]["rows"]}
    assert (table["no norm (He init)"][-1], table["GroupNorm"][-1], table["BN"][-1]) == ("3", "3", "9")
    # without looks of its own (the profile's single look) every arm runs every seed, as before
    profile["regularize"].update(looks=None, look_alphas=None)
    results = simulate(profile, [3], _reg_fake(lambda a, s: 10 - noise[s] if a == "ghost:4" else gaps[a]))
    assert len(results) == 6 * 9 and analyze(claim_regularize, profile, results).numbers["parts"][0]["n"] == 9


def test_claim3_own_looks_set_its_scope_and_the_reports_first_line():
    """A claim with looks of its own is judged against its own design: the report's scope gives its look of
    its own count and its largest seed count, and the first screen names both designs."""
    from bnlab.study.profiles import validate
    from bnlab.study.report import _first_screen_scope, analyze_claims
    noise = [3.0, -2.0, 1.0, 4.0, -3.0, 2.0, 0.0, 1.0, 0.75]
    gaps = {"none": 30, "bn": 10, "ghost:16": 10, "groupnorm": 12, "none+wd": 25}
    profile = make_profile(regularize={"fit_threshold": 99.0, "looks": [3, 6, 9], "look_alphas": [0.01, 0.01, 0.02]})
    profile.update(seeds=list(range(9)), looks=[3, 5], look_alphas=[0.02, 0.03])
    profile = validate(profile)   # the longest design (claim 3's) ends at the 9 seeds
    results = simulate(profile, [3], _reg_fake(lambda a, s: 10 - noise[s] if a == "ghost:4" else gaps[a]))
    (result,) = analyze_claims(profile, results, [3])
    assert {k: result.scope[k] for k in ("seeds", "max_seeds", "look", "looks")} == \
        {"seeds": 9, "max_seeds": 9, "look": 3, "looks": 3}
    line = _first_screen_scope(profile, {}, [result])
    assert "5 seeds (sequential seeds: 3, 5)" in line and "claim 3: up to 9 (3, 6, 9" in line, line
    # standard: claim 3's parts stop separately, claim 5 (looks of its own too) stops as a whole
    from types import SimpleNamespace
    from bnlab.study import get_profile
    line = _first_screen_scope(get_profile("standard"), {}, [SimpleNamespace(number=n, across=[]) for n in (3, 5)])
    assert "claim 3: up to 80 (10, 20, 40, 80, each part stopping when decided)" in line, line
    assert "claim 5: up to 24 (6, 10, 16, 24)" in line, line
