"""The study's SQLite store: attempts, finished runs, atomic writes, several writing processes."""

import multiprocessing
import sqlite3

import pytest

from bnlab.study.specs import make_spec
from bnlab.study.store import Store


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
