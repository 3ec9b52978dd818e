"""The result store: one SQLite file per study directory, one row per finished run.

Why SQLite: every write is a transaction, so a process killed mid-write leaves either the whole row or
nothing; WAL mode plus a busy timeout lets ``--jobs N`` worker processes write to the same file safely.
A row exists only once its run has *finished* (done, diverged, or failed with its error), so an
interrupted run simply has no row and is redone on the next invocation, while finished ones are reused.
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from bnlab.errors import UserError

__all__ = ["Store", "STORE_NAME", "FINISHED", "STATUSES", "environment"]

STORE_NAME = "study.sqlite"  # the store's file name in a study directory

STATUSES = ("done", "diverged", "failed")
FINISHED = ("done", "diverged")  # reused on resume; "failed" runs are retried

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key       TEXT PRIMARY KEY,
    kind      TEXT NOT NULL,
    spec      TEXT NOT NULL,
    status    TEXT NOT NULL,
    result    TEXT,
    error     TEXT,
    seed      INTEGER,
    seconds   REAL,
    finished  REAL,
    attempts  INTEGER NOT NULL DEFAULT 1,
    versions  TEXT,
    hardware  TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


def environment() -> tuple[dict, dict]:
    """(versions, hardware) of this process, stored with every run so results say what produced them."""
    import numpy
    import torch

    import bnlab
    versions = {"bnlab": bnlab.__version__, "torch": torch.__version__, "numpy": numpy.__version__,
                "python": platform.python_version()}
    hardware = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "system": platform.system(),
                "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    return versions, hardware


class Store:
    """``Store(path)`` opens (creating if needed) the SQLite file at ``path``.

    Each method opens its own short connection, so a ``Store`` can be pickled to worker processes and
    used from several processes at once. ``readonly=True`` opens an existing file for reading only
    (SQLite's ``mode=ro``): nothing is created or written, so a study on a read-only disk can be reported.
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"store path {self.path} is a directory; expected a SQLite file path")
        if readonly:
            if not self.path.is_file():
                raise UserError(f"no store at {self.path}; expected the study.sqlite of a `bnlab study` directory")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
        finally:
            db.close()

    def _connect(self) -> "_Transaction":
        if self.readonly:
            db = _connect_readonly(self.path)
        else:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout=60000")
        return _Transaction(db, "BEGIN" if self.readonly else "BEGIN IMMEDIATE")

    # ------------------------------------------------------------------ runs
    def put(self, key: str, spec: dict, status: str, result: Optional[dict] = None,
            error: Optional[str] = None, seconds: Optional[float] = None,
            versions: Optional[dict] = None, hardware: Optional[dict] = None) -> None:
        """Record one finished run (atomically; a second ``put`` of the same key replaces it and counts
        an attempt)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)} (got {status!r})")
        if versions is None or hardware is None:
            versions, hardware = environment()
        with self._connect() as db:
            row = db.execute("SELECT attempts FROM runs WHERE key=?", (key,)).fetchone()
            attempts = (row[0] + 1) if row else 1
            db.execute(
                "INSERT OR REPLACE INTO runs (key, kind, spec, status, result, error, seed, seconds,"
                " finished, attempts, versions, hardware) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, spec.get("kind", "?"), json.dumps(spec, sort_keys=True), status,
                 json.dumps(result, allow_nan=True) if result is not None else None, error,
                 spec.get("seed"), seconds, time.time(), attempts,
                 json.dumps(versions), json.dumps(hardware)))

    def get(self, key: str) -> Optional[dict]:
        """The stored row for ``key`` as a dict (spec and result decoded), or ``None``."""
        with self._connect() as db:
            cursor = db.execute("SELECT * FROM runs WHERE key=?", (key,))
            names = [d[0] for d in cursor.description]
            row = cursor.fetchone()
        return _decode(dict(zip(names, row))) if row else None

    def rows(self) -> Iterator[dict]:
        """Every stored run, oldest first."""
        with self._connect() as db:
            cursor = db.execute("SELECT * FROM runs ORDER BY finished")
            names = [d[0] for d in cursor.description]
            rows = cursor.fetchall()
        for row in rows:
            yield _decode(dict(zip(names, row)))

    def finished_keys(self) -> set[str]:
        """Keys of runs that need not run again (done or diverged)."""
        with self._connect() as db:
            marks = ",".join("?" * len(FINISHED))
            return {r[0] for r in db.execute(f"SELECT key FROM runs WHERE status IN ({marks})", FINISHED)}

    def results(self) -> dict[str, dict]:
        """Key → row for every stored run."""
        return {row["key"]: row for row in self.rows()}

    def count(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]

    # ------------------------------------------------------------------ meta
    def set_meta(self, name: str, value: Any) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, json.dumps(value)))

    def get_meta(self, name: str, default: Any = None) -> Any:
        with self._connect() as db:
            row = db.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return json.loads(row[0]) if row else default


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection. In WAL mode SQLite needs a ``-shm`` file beside the database; where it cannot
    create one (a read-only directory) the file is opened as immutable, as nothing can be writing it there."""
    uri = path.resolve().as_uri()
    db = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=60.0, isolation_level=None)
    try:
        db.execute("SELECT 1 FROM meta LIMIT 1")
        return db
    except sqlite3.OperationalError:
        db.close()
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=60.0, isolation_level=None)


class _Transaction:
    """A connection used as ``with``: BEGIN IMMEDIATE (a plain BEGIN when read-only) on entry, COMMIT (or
    ROLLBACK) and close on exit."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE") -> None:
        self._db = db
        self._begin = begin

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute(self._begin)
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self._db.close()


def _decode(row: dict) -> dict:
    for name in ("spec", "result", "versions", "hardware"):
        if row.get(name) is not None:
            row[name] = json.loads(row[name])
    return row
