"""The study's specs, profiles and SQLite store."""

import multiprocessing
import sqlite3

import pytest

from bnlab.study.common import tuning_seeds
from bnlab.study import CLAIMS, get_profile, parse_claims
from bnlab.study import claim_lr, claim_residual, claim_speed
from bnlab.study.claims import collect_specs
from bnlab.study.specs import make_spec, spec_key, unique_specs
from bnlab.study.store import Store


def test_spec_key_ignores_field_order_and_sees_every_value():
    a = make_spec("train", lr=0.1, seed=0, norm="bn")
    b = make_spec("train", norm="bn", seed=0, lr=0.1)
    assert spec_key(a) == spec_key(b)
    assert spec_key(a) != spec_key(make_spec("train", lr=0.1, seed=1, norm="bn"))
    assert list(unique_specs([a, b, make_spec("signal", seed=0)])) == [spec_key(a), spec_key(make_spec("signal", seed=0))]


def test_make_spec_rejects_unknown_kinds_and_unstorable_values():
    with pytest.raises(ValueError, match="kind"):
        make_spec("fly")
    with pytest.raises(TypeError):
        make_spec("train", lr=object())


def test_claims_share_identical_runs():
    profile = get_profile("quick")
    sweep = {spec_key(s) for s in claim_lr.specs(profile)}
    assert {spec_key(s) for s in claim_speed.specs(profile)} <= sweep  # claim 2 reuses claim 4's runs
    residual = {spec_key(s) for s in claim_residual.specs(profile)}
    shared = residual & sweep  # claim 5's residual runs at the profile's depth are claim 4's
    # the BN and none residual cells at the profile's depth, at the rates both grids share
    common = set(profile["residual"]["lrs"]) & set(profile["lr"]["lrs"])
    # (first round: every rate on the tuning seeds; the other seeds follow at the validated rate)
    assert len(shared) == 2 * len(common) * len(tuning_seeds(profile)) > 0
    total = sum(len(CLAIMS[n].specs(profile)) for n in CLAIMS)
    assert len(collect_specs(profile, sorted(CLAIMS))) < total


@pytest.mark.parametrize("name", ["tiny", "quick", "standard", "full"])
def test_every_profile_declares_runs_for_every_claim_with_enough_seeds(name):
    profile = get_profile(name)
    assert len(profile["seeds"]) >= {"tiny": 2, "quick": 6}.get(name, 10)
    for number, module in CLAIMS.items():
        assert module.specs(profile), f"claim {number} declares no runs in profile {name}"


def test_claim_errors_name_the_argument():
    with pytest.raises(ValueError, match="--claims"):
        parse_claims("1,x")
    with pytest.raises(ValueError, match="--claims"):
        parse_claims("7")
    assert parse_claims("4, 1") == [1, 4]


def test_store_round_trip_attempts_and_finished(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    spec = make_spec("train", seed=3)
    store.put("a", spec, "failed", error="boom", versions={}, hardware={})
    assert store.finished_keys() == set()  # failed runs are retried
    store.put("a", spec, "done", {"x": [1.0, float("nan")]}, versions={"torch": "t"}, hardware={})
    store.put("b", spec, "diverged", {}, versions={}, hardware={})
    row = store.get("a")
    assert row["status"] == "done" and row["attempts"] == 2 and row["seed"] == 3
    assert row["result"]["x"][0] == 1.0 and row["result"]["x"][1] != row["result"]["x"][1]  # NaN survives
    assert store.finished_keys() == {"a", "b"}
    assert store.count() == 2
    store.set_meta("profile", {"name": "tiny"})
    assert Store(tmp_path / "s.sqlite").get_meta("profile") == {"name": "tiny"}
    with pytest.raises(ValueError, match="status"):
        store.put("c", spec, "running")
    with pytest.raises(ValueError, match="directory"):
        Store(tmp_path)


def test_a_write_interrupted_inside_its_transaction_leaves_nothing(tmp_path):
    store = Store(tmp_path / "s.sqlite")
    with pytest.raises(RuntimeError):
        with store._connect() as db:
            db.execute("INSERT INTO runs (key, kind, spec, status) VALUES ('k', 'train', '{}', 'done')")
            raise RuntimeError("killed mid-write")
    assert store.count() == 0
    assert sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def _writer(path, offset):
    store = Store(path)
    for i in range(15):
        store.put(f"{offset}-{i}", {"kind": "train", "seed": i}, "done", {"i": i}, versions={}, hardware={})


def test_parallel_processes_write_one_store_safely(tmp_path):
    path = str(tmp_path / "s.sqlite")
    Store(path)
    context = multiprocessing.get_context("fork")  # the writers touch only sqlite3, never torch
    workers = [context.Process(target=_writer, args=(path, n)) for n in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert Store(path).count() == 45


def test_claim_modules_import_without_the_registry():
    """No import cycle: a claim module never needs bnlab.study's package init or registry for its names."""
    import subprocess
    import sys
    code = ("import sys, bnlab.study.claim_speed, bnlab.study.claim_residual, bnlab.study.claim_regularize; "
            "assert 'bnlab.study.claims' not in sys.modules and 'bnlab.study.profiles' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
