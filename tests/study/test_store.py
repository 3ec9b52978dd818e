"""The study's SQLite store: attempts, finished runs, atomic writes, several writing processes."""

import json
import multiprocessing
import os
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


# ------------------------------------------------------------------------------------------ damage (issue 21)
def _filled(path, runs=40, pad=2000, start=0):
    """A checkpointed store with rows ``start`` … ``runs - 1`` added, about ``pad`` bytes each (so they span
    many pages)."""
    store = Store(path)
    for i in range(start, runs):
        store.put(f"run{i:03d}", {"kind": "train", "seed": i, "pad": "x" * pad}, "done", {"i": i},
                  versions={}, hardware={})
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return store


def _pages(path) -> int:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA page_count").fetchone()[0]
    finally:
        db.close()


def test_a_truncated_store_keeps_every_run_written_within_the_pages_left(tmp_path):
    """Oracle: rows appended with increasing rowids fill new pages at the end, so a copy cut at the page count
    the file had after the first 15 rows still holds those 15 whole (and nothing it did not hold)."""
    from bnlab.study.store import StoreDamaged, inspect
    path = tmp_path / "s.sqlite"
    _filled(path, runs=15)
    pages = _pages(path)
    _filled(path, runs=40, start=15)   # 25 more, appended
    assert _pages(path) > pages
    os.truncate(path, pages * 4096)
    found = inspect(path)
    keys = [row[0] for row in found.rows]
    assert keys[:15] == [f"run{i:03d}" for i in range(15)] and len(keys) < 40
    assert all(json.loads(row[2])["pad"] == "x" * 2000 for row in found.rows)   # whole rows only
    assert found.integrity != "ok"
    with pytest.raises(StoreDamaged, match=rf"{found.readable} of its runs are still readable"):
        Store(path, readonly=True).results()
    with pytest.raises(StoreDamaged, match="is damaged"):
        Store(path).check()


def test_random_bytes_and_an_empty_file(tmp_path):
    from bnlab.errors import UserError
    from bnlab.study.store import StoreDamaged, inspect
    noise = tmp_path / "noise.sqlite"
    noise.write_bytes(os.urandom(50000))
    assert inspect(noise).readable == 0 and "not a database" in inspect(noise).integrity
    with pytest.raises(StoreDamaged, match="file is not a database"):
        Store(noise)
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="holds no study"):
        Store(empty, readonly=True)
    Store(empty).check()   # an empty file is an empty database: a study starts in it
    assert Store(empty).count() == 0


def test_recover_moves_the_damaged_file_aside_untouched_and_never_overwrites(tmp_path):
    from bnlab.study.store import DAMAGED_SUFFIX, recover
    path = tmp_path / "study.sqlite"
    _filled(path, runs=30)
    os.truncate(path, path.stat().st_size // 2)
    damaged = path.read_bytes()
    first = recover(path)
    assert first.moved_to.read_bytes() == damaged and first.moved_to.name.startswith("study.sqlite" + DAMAGED_SUFFIX)
    assert Store(path).count() == first.kept > 0
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    os.truncate(path, 0)
    path.write_bytes(b"garbage" * 1000)
    second = recover(path)   # within the same second: a new name, the first copy untouched
    assert second.moved_to != first.moved_to and first.moved_to.read_bytes() == damaged
    assert second.moved_to.read_bytes() == b"garbage" * 1000 and second.kept == 0


def test_a_full_disk_is_a_store_error_and_the_store_stays_intact(tmp_path, monkeypatch):
    """SQLite's `database or disk is full` at a commit: the row is not written, the earlier ones are whole."""
    from bnlab.study.store import StoreFull
    path = tmp_path / "s.sqlite"
    store = _filled(path, runs=3)
    connect = sqlite3.connect

    class Full:
        def __init__(self, db):
            self._db = db

        def execute(self, sql, *args):
            if sql == "COMMIT":
                self._db.execute("ROLLBACK")
                raise sqlite3.OperationalError("database or disk is full")
            return self._db.execute(sql, *args)

        def __getattr__(self, name):
            return getattr(self._db, name)
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: Full(connect(*a, **k)))
    with pytest.raises(StoreFull, match=r"is full \(database or disk is full\); the store is intact"):
        store.put("new", {"kind": "train"}, "done", {}, versions={}, hardware={})
    monkeypatch.setattr(sqlite3, "connect", connect)
    assert store.count() == 3 and store.get("new") is None
    assert connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_put_many_stores_all_or_none(tmp_path):
    """A stack's runs in one transaction: a row that cannot be stored (an unknown status) stores none."""
    store = Store(tmp_path / "s.sqlite")
    spec = {"kind": "train", "seed": 0}
    with pytest.raises(ValueError, match="status must be one of"):
        store.put_many([("a", spec, "done", {"x": 1}), ("b", dict(spec, seed=1), "finished", {})])
    assert store.count() == 0
    store.put_many([("a", spec, "done", {"x": 1}, None, 1.0), ("b", dict(spec, seed=1), "diverged", {}, None, 2.0)])
    rows = store.results()
    assert {k: (r["status"], r["seconds"], r["attempts"]) for k, r in rows.items()} == \
        {"a": ("done", 1.0, 1), "b": ("diverged", 2.0, 1)}
