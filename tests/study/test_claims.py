"""The registry of claims (:mod:`bnlab.study.claims`): what each claim module declares, the runs claims
share, ``--claims``, and that a new claim is one file plus one line in the registry."""

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import bnlab
from bnlab.study import CLAIMS, claim_lr, claim_residual, claim_speed, get_profile, parse_claims
from bnlab.study.claims import MODULES, collect_specs, register
from bnlab.study.common import tuning_seeds
from bnlab.study.specs import spec_key


def test_claims_share_identical_runs():
    profile = get_profile("quick")
    sweep = {spec_key(s) for s in claim_lr.measure(profile)}
    assert {spec_key(s) for s in claim_speed.measure(profile)} <= sweep  # claim 2 reuses claim 4's runs
    residual = {spec_key(s) for s in claim_residual.measure(profile)}
    shared = residual & sweep  # claim 5's residual runs at the profile's depth are claim 4's
    # the BN and none residual cells at the profile's depth, at the rates both grids share
    common = set(profile["residual"]["lrs"]) & set(profile["lr"]["lrs"])
    # (first round: every rate on the tuning seeds; the other seeds follow at the validated rate)
    assert len(shared) == 2 * len(common) * len(tuning_seeds(profile)) > 0
    total = sum(len(CLAIMS[n].measure(profile)) for n in CLAIMS)
    assert len(collect_specs(profile, sorted(CLAIMS))) < total


@pytest.mark.parametrize("name", ["tiny", "quick", "standard", "full"])
def test_every_profile_declares_runs_for_every_claim_with_enough_seeds(name):
    profile = get_profile(name)
    assert len(profile["seeds"]) >= {"tiny": 2, "quick": 6}.get(name, 10)
    for number, module in CLAIMS.items():
        assert module.measure(profile), f"claim {number} declares no runs in profile {name}"


def test_claim_errors_name_the_argument():
    with pytest.raises(ValueError, match="--claims"):
        parse_claims("1,x")
    with pytest.raises(ValueError, match="--claims"):
        parse_claims("7")
    assert parse_claims("4, 1") == [1, 4]


def test_claim_modules_import_without_the_registry():
    """No import cycle: a claim module never needs bnlab.study's package init or registry for its names."""
    import subprocess
    import sys
    code = ("import sys, bnlab.study.claim_speed, bnlab.study.claim_residual, bnlab.study.claim_regularize; "
            "assert 'bnlab.study.claims' not in sys.modules and 'bnlab.study.profiles' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_claim_declares_its_published_figures():
    for number, module in CLAIMS.items():
        assert module.PAPER, number
        for entry in module.PAPER:
            assert set(entry) == {"quantity", "paper", "value", "setting", "ours_key"}, (number, entry)
            assert all(isinstance(v, str) and v for v in entry.values()), (number, entry)


def test_the_registry_checks_what_a_claim_module_declares():
    def module(name, **changes):
        fake = types.ModuleType(name)
        fake.__dict__.update({k: v for k, v in vars(claim_lr).items() if not k.startswith("__")}, **changes)
        return fake
    assert register([module("claim_a")])[4].TITLE == claim_lr.TITLE
    incomplete = module("claim_b")
    del incomplete.DATASET_FIELDS
    with pytest.raises(TypeError, match=r"claim module claim_b must provide DATASET_FIELDS"):
        register([incomplete])
    with pytest.raises(TypeError, match=r"must provide TUNED_ON_SEEDS, LATER_ROUNDS"):
        register([module("claim_c", TUNED_ON_SEEDS="yes", LATER_ROUNDS=3)])
    with pytest.raises(TypeError, match=r"claim_a and claim_d both declare 4"):
        register([module("claim_a"), module("claim_d", SLUG="other")])
    with pytest.raises(TypeError, match=r"claim_a and claim_e both declare 'lr'"):
        register([module("claim_a"), module("claim_e", NUMBER=9)])


TOY = Path(__file__).with_name("toy_claim.py")


def _final_val_pct(status: str, result: dict) -> float:
    """The oracle's reading of a stored run: its final validation accuracy in %, chance level if it diverged."""
    value = result["final"]["val_acc"]
    return 100.0 * (result["chance"] if status == "diverged" or value is None else value)


def test_a_claim_is_one_file_and_one_registry_line(tmp_path):
    """A copy of the package with the toy claim's file beside the others and its name added to
    ``claims.MODULES`` (nothing else changed) plans, runs, decides and reports claim 6 through the tiny
    profile; its numbers are recomputed here from the store."""
    package = tmp_path / "src" / "bnlab"
    shutil.copytree(Path(bnlab.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(TOY, package / "study" / "claim_toy.py")
    registry = package / "study" / "claims.py"
    last = f'    "{MODULES[-1]}",\n'
    assert registry.read_text().count(last) == 1
    registry.write_text(registry.read_text().replace(last, last + '    "bnlab.study.claim_toy",\n'))
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "src")}

    def study(*args):
        done = subprocess.run([sys.executable, "-m", "bnlab.cli", "study", "--profile", "tiny", "--claims", "6",
                               "--seeds", "3", *args], env=env, cwd=tmp_path, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout
    plan = json.loads(study("--dry-run", "--no-calibrate", "--json"))
    assert [(c["claim"], c["runs"], c["kinds"]) for c in plan["claims"]] == [(6, 6, {"train": 6})]  # 2 arms × 3 seeds
    out = tmp_path / "out"
    study("--jobs", "1", "--no-progress", "--out", str(out))

    db = sqlite3.connect(out / "study.sqlite")
    val = {}
    for spec, status, result in db.execute("SELECT spec, status, result FROM runs"):
        spec = json.loads(spec)
        val[(spec["norm"], spec["seed"])] = _final_val_pct(status, json.loads(result))
    assert len(val) == 6
    gains = np.array([val[("bn", s)] - val[("none", s)] for s in range(3)])
    half = stats.t.ppf(0.975, 2) * gains.std(ddof=1) / math.sqrt(3)
    claim = json.loads((out / "verdicts.json").read_text())["claims"]["6"]
    part = claim["parts"][0]
    assert part["values"] == pytest.approx(list(gains)) and part["n"] == 3
    assert part["interval"]["mean"] == pytest.approx(gains.mean())
    assert part["interval"]["low"] == pytest.approx(max(-100, gains.mean() - half))
    assert part["interval"]["high"] == pytest.approx(min(100, gains.mean() + half))
    low, high = part["interval"]["low"], part["interval"]["high"]
    outcome = "holds" if low > 1.0 else "refuted" if high < 0.5 else "undecided"
    assert part["outcome"] == outcome
    assert claim["verdict"] == {"holds": "supported", "refuted": "not supported", "undecided": "inconclusive"}[outcome]
    assert claim["title"] == "BN validates better after a few steps" and claim["failed_runs"] == 0
    report = (out / "report.md").read_text()
    assert '## Claim 6: "BN validates better after a few steps"' in report and "Validation accuracy per arm" in report
    assert (out / "figures" / "claim6_toy.png").is_file()
