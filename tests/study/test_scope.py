"""Settings and sequential looks: where and on how many seeds each claim is judged."""

import json
import types
from dataclasses import dataclass

import numpy as np
import pytest
from scipy import stats

from bnlab.study import get_profile
from bnlab.study.profiles import validate
from bnlab.study.scope import DEPENDS, at_look, collect, design, robust, settings
from bnlab.study.specs import make_spec, spec_key
from bnlab.study.verdict import HOLDS, UNDECIDED, Part, Rule, paired_effect

RULE = Rule("toy", "treated − control", threshold=1.0, margin=0.5)


def _fake_claim(effects: dict):
    """A claim whose per-seed effect is ``effects[seed]``: one run per seed, one part."""
    @dataclass
    class Findings:
        parts: list

    def measure(profile, results=None):
        return [make_spec("train", seed=s, norm="bn", dataset=profile["dataset"]) for s in profile["seeds"]]

    def decide(profile, results):
        treated = {s: effects[s] for s in profile["seeds"] if spec_key(measure({**profile, "seeds": [s]})[0]) in results}
        return Findings([Part(RULE, paired_effect(treated, {s: 0.0 for s in treated}))])

    return types.SimpleNamespace(measure=measure, decide=decide)


def _profile(seeds=10, looks=(6, 10), alphas=(0.02, 0.03)):
    profile = get_profile("tiny")
    profile["seeds"] = list(range(seeds))
    profile["looks"], profile["look_alphas"] = list(looks), list(alphas)
    return validate(profile)


def _finished(claim, profile):
    return {spec_key(s): {"status": "done", "result": {}} for s in claim.measure(profile)}


def test_a_claim_starts_at_the_first_look_and_extends_only_while_undecided():
    profile = _profile()
    noisy = _fake_claim({s: v for s, v in enumerate([3.0, -1.0, 2.5, 0.0, 4.0, 1.0, 2.0, 3.0, 1.5, 2.5])})
    look = at_look(noisy, profile, None)
    assert look.index == 0 and look.seeds == list(range(6)) and look.level == pytest.approx(0.98)
    first = _finished(noisy, look.profile)
    assert at_look(noisy, profile, {}).index == 0
    # the six runs finished and the part is undecided: the next look, up to ten seeds, at its own level
    assert noisy.decide(look.profile, first).parts[0].outcome == UNDECIDED
    later = at_look(noisy, profile, first)
    assert later.index == 1 and later.seeds == list(range(10)) and later.level == pytest.approx(0.97)

    clear = _fake_claim({s: 5.0 + 0.1 * (s % 3) for s in range(10)})
    done = _finished(clear, at_look(clear, profile, None).profile)
    assert at_look(clear, profile, done).index == 0          # decided at the first look: no more seeds


def test_the_part_is_decided_at_the_looks_level():
    profile = _profile(seeds=10, looks=(6, 10), alphas=(0.02, 0.03))
    effects = {s: v for s, v in enumerate([1.9, 2.6, 1.4, 2.2, 3.1, 1.7, 2.0, 2.4, 1.6, 2.8])}
    claim = _fake_claim(effects)
    look = at_look(claim, profile, None)
    from bnlab.study.verdict import at_confidence
    with at_confidence(look.level):
        part = claim.decide(look.profile, _finished(claim, look.profile)).parts[0]
    x = np.array([effects[s] for s in range(6)])
    low, high = stats.t.interval(0.98, df=5, loc=x.mean(), scale=x.std(ddof=1) / np.sqrt(6))
    assert part.level == pytest.approx(0.98)
    assert (part.effect.interval.low, part.effect.interval.high) == pytest.approx((low, high))
    assert part.outcome == (HOLDS if low > 1.0 else UNDECIDED)


def test_without_looks_every_seed_is_one_look_at_95_percent():
    profile = get_profile("tiny")
    assert design(profile).looks == (len(profile["seeds"]),) and design(profile).alphas == (0.05,)
    claim = _fake_claim({s: 1.0 for s in profile["seeds"]})
    look = at_look(claim, profile, None)
    assert look.seeds == profile["seeds"] and look.level == pytest.approx(0.95) and look.count == 1


def test_looks_must_fit_the_seeds_and_the_error_budget():
    profile = get_profile("tiny")
    profile["seeds"] = list(range(10))
    for looks, alphas, message in [((6, 8), (0.02, 0.03), "must be the number of seeds"),
                                   ((6, 10), (0.03, 0.03), "0.05 budget"), ((6, 10), None, "go together")]:
        bad = {**profile, "looks": list(looks), "look_alphas": None if alphas is None else list(alphas)}
        with pytest.raises(Exception, match=message):
            validate(bad)


def test_settings_narrow_the_dataset_and_depth():
    profile = get_profile("tiny")
    profile["settings"] = [{}, {"depth": 14}, {"dataset": "digits"}]
    places = settings(validate(profile))
    assert [(p.dataset, p.depth) for p in places] == [("synthetic", 8), ("synthetic", 14), ("digits", 8)]
    assert [p.profile["depth"] for p in places] == [8, 14, 8]
    assert places[2].profile["dataset"] == "digits" and places[2].label.startswith("digits")
    assert all(p.profile["settings"] == [] for p in places)
    with pytest.raises(Exception, match="settings repeat"):
        validate({**profile, "settings": [{"depth": 8}, {}]})


def test_every_setting_declares_its_own_runs_and_shares_the_identical_ones():
    profile = get_profile("tiny")
    one = collect(profile, [2])
    profile["settings"] = [{}, {"depth": 14}]
    both = collect(validate(profile), [2])
    assert set(one) < set(both)
    assert {s["depth"] for s in both.values()} >= {8, 14}


def test_robust_answer():
    assert robust([("a", "supported"), ("b", "supported")]) == ("supported", "supported in all 2 settings")
    answer, text = robust([("a", "supported"), ("b", "inconclusive"), ("c", "supported")])
    assert answer == DEPENDS and text == "supported in a, c; inconclusive in b"
    assert robust([("a", "not supported")]) == ("not supported", "not supported in the one setting")


def test_the_printed_summary_says_when_the_answer_depends_on_the_setting():
    """A 20-minute standard run printed claim 5 as "supported" (its first setting's verdict) where the report
    said "depends on the setting": supported on MNIST-1D, inconclusive on Fashion-MNIST."""
    from bnlab.commands.study import summary_verdict
    places = [("mnist1d, ResNet-8", "supported"), ("fashion-mnist, ResNet-8", "inconclusive")]
    answer, text = robust(places)
    claim = {"verdict": "supported", "robust": {"answer": answer, "text": text},
             "settings": [{"setting": p, "verdict": v} for p, v in places]}
    assert summary_verdict(claim) == ("depends on the setting: supported in mnist1d, ResNet-8; inconclusive in "
                                      "fashion-mnist, ResNet-8")
    same = robust([(p, "supported") for p, _ in places])
    assert summary_verdict({**claim, "robust": dict(zip(("answer", "text"), same))}) == "supported"
    assert summary_verdict({"verdict": "inconclusive", "robust": {"answer": "inconclusive", "text": ""},
                            "settings": claim["settings"][:1]}) == "inconclusive"


def test_a_study_in_two_settings_with_two_looks(tmp_path, capsys):
    """End to end: claim 3 on the tiny profile in two depths, five seeds in looks of 3 and 5. Its parts stay
    undecided on synthetic data, so both settings run the second look; verdicts.json (schema 3) gives the
    verdict per setting, the look reached and the answer across settings."""
    from bnlab.cli import main
    from bnlab.study.store import Store
    profile = get_profile("tiny")
    profile.update(seeds=[0, 1, 2, 3, 4], looks=[3, 5], look_alphas=[0.02, 0.03], settings=[{}, {"depth": 14}])
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    out = tmp_path / "out"
    assert main(["study", "--profile", str(path), "--claims", "3", "--out", str(out), "--jobs", "2",
                 "--no-progress"]) == 0
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts["schema_version"] == 3
    claim = verdicts["claims"]["3"]
    assert [s["setting"] for s in claim["settings"]] == ["synthetic, ResNet-8", "synthetic, ResNet-14"]
    for setting in claim["settings"]:
        if setting["look"] == 1:                       # the first look stops only when nothing is undecided
            assert UNDECIDED not in setting["outcomes"]
        assert setting["confidence"] == pytest.approx(0.97 if setting["look"] == 2 else 0.98)
    verdicts_per_setting = [s["verdict"] for s in claim["settings"]]
    assert claim["robust"]["answer"] == (verdicts_per_setting[0] if len(set(verdicts_per_setting)) == 1 else DEPENDS)
    rows = Store(out / "study.sqlite", readonly=True).results().values()
    assert {r["spec"]["depth"] for r in rows} == {8, 14}
    seeds_run = {r["spec"]["seed"] for r in rows}
    assert seeds_run == ({0, 1, 2, 3, 4} if any(s["look"] == 2 for s in claim["settings"]) else {0, 1, 2})
    report = (out / "report.md").read_text()
    assert "In every setting" in report and "synthetic, ResNet-14" in report
    # the printed summary gives the answer across the settings, not the first setting's verdict
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("3. "))
    expected = claim["robust"]["answer"] + (f": {claim['robust']['text']}" if claim["robust"]["answer"] == DEPENDS
                                            else "")
    assert line.endswith(" " + expected)


def test_rounds_end_when_a_later_look_asks_for_other_runs_than_the_first(monkeypatch):
    """Reproduces a study that never ended (quick, seeds 70–79: claim 2's second look asks for other runs
    than its first). The runner's rounds let a claim see only the runs the last round asked for: the first
    look's runs, no longer asked for, vanished, the claim went back to its first look, asked for them again,
    and so on for ever. The rounds must end, each run asked for once, the claim at its second look."""
    from bnlab.study import scope
    from bnlab.study.runner import run_rounds

    effects = {s: v for s, v in enumerate([3.0, -1.0, 2.5, 0.0, 4.0, 1.0, 2.0, 3.0, 1.5, 2.5])}  # undecided at 6

    def measure(profile, results=None):   # the second look runs every seed at another norm (other runs)
        norm = "bn" if len(profile["seeds"]) <= 6 else "none"
        return [make_spec("train", seed=s, norm=norm, dataset=profile["dataset"]) for s in profile["seeds"]]

    def decide(profile, results):
        specs = {s: spec_key(spec) for s, spec in zip(profile["seeds"], measure(profile))}
        treated = {s: effects[s] for s, key in specs.items() if key in results}
        return types.SimpleNamespace(parts=[Part(RULE, paired_effect(treated, {s: 0.0 for s in treated}))])

    monkeypatch.setitem(scope.CLAIMS, 99, types.SimpleNamespace(measure=measure, decide=decide))
    profile = _profile()
    store, asked = {}, []

    def collect(seen):
        asked.append(len(seen))
        assert len(asked) < 10, f"the rounds do not end: runs seen per round {asked}"
        return scope.collect(profile, [99], seen)

    def run(fresh):
        store.update({k: {"status": "done", "result": {}} for k in fresh})
        return {k: "done" for k in fresh}

    specs = {}
    statuses = run_rounds(collect, run, lambda: dict(store), specs)
    assert sorted(s["norm"] for s in specs.values()) == ["bn"] * 6 + ["none"] * 10
    assert len(statuses) == len(specs) == 16                              # each run once
    assert at_look(scope.CLAIMS[99], profile, store).index == 1           # where the report judges it
