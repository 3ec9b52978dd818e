"""The result store: one SQLite file per study directory, one row per finished run.

Why SQLite: every write is a transaction, so a process killed mid-write leaves either the whole row or
nothing; WAL mode plus a busy timeout lets ``--jobs N`` worker processes write to the same file safely.
A row exists only once its run has *finished* (done, diverged, or failed with its error), so an
interrupted run simply has no row and is redone on the next invocation, while finished ones are reused.

What goes wrong with the file itself is a :class:`StoreError` (a :class:`UserError`: one line from the CLI):

* :class:`StoreDamaged` — the file is not a SQLite database, or SQLite finds it malformed (a truncated copy,
  a disk fault). The message gives SQLite's integrity check and how many runs are still readable
  (:func:`inspect`). :func:`recover` moves the file aside to ``study.sqlite.damaged-<time>`` (with its
  ``-wal``; never overwriting anything) and starts a new store holding every readable run;
  :func:`bnlab.study.runner.run_study` does that and says so, ``bnlab report`` refuses and says how.
* :class:`StoreFull` — the disk is full (or over quota). SQLite rolls the transaction back, so the store
  holds every run written before, whole; once space is freed the same command resumes.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from bnlab.errors import UserError

__all__ = ["Store", "STORE_NAME", "FINISHED", "STATUSES", "environment", "StoreError", "StoreDamaged", "StoreFull",
           "Inspection", "Recovery", "inspect", "recover", "DAMAGED_SUFFIX"]

DAMAGED_SUFFIX = ".damaged-"  # a damaged store is moved aside to study.sqlite.damaged-YYYYmmdd-HHMMSS

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


# ------------------------------------------------------------------------------------------ what goes wrong
class StoreError(UserError):
    """The store's file cannot be used as it is (see the module docstring)."""

    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class StoreDamaged(StoreError):
    """The file is not a SQLite database or SQLite finds it malformed; ``inspection`` says what is left."""

    def __init__(self, path: Path, reason: str, inspection: "Inspection") -> None:
        self.reason, self.inspection = reason, inspection
        super().__init__(f"{path} is damaged (SQLite: {reason}; its integrity check: {inspection.integrity}); "
                         f"{inspection.readable} of its runs are still readable. Rerun the `bnlab study` command "
                         f"of {path.parent} to move it aside to {path.name}{DAMAGED_SUFFIX}<time> (never "
                         f"overwritten) and carry the readable runs into a new store; the rest are redone", path)


class StoreFull(StoreError):
    """The disk holding the store is full; the transaction was rolled back, so the store is intact.
    ``stored``: (runs finished in the store, runs of the study), when known."""

    def __init__(self, path: Path, reason: str, stored: Optional[tuple[int, int]] = None,
                 workers_stopped: bool = False) -> None:
        self.reason, self.stored = reason, stored
        after = f" with {stored[0]} of {stored[1]} runs stored" if stored else ""
        stopped = "; the workers were stopped and" if workers_stopped else ";"
        super().__init__(f"the disk holding {path} is full ({reason}){after}{stopped} the store is intact (every "
                         f"run in it is whole, none half-written): free space there and rerun the same command to "
                         f"resume", path)


def _code(error: BaseException) -> str:
    """SQLite's primary result name for ``error`` (``SQLITE_CORRUPT``, ...; read from the message before 3.11)."""
    name = getattr(error, "sqlite_errorname", None)
    if name:
        return name.split("_")[0] + "_" + name.split("_")[1] if name.count("_") > 1 else name
    text = str(error)
    for fragment, code in (("disk is full", "SQLITE_FULL"), ("malformed", "SQLITE_CORRUPT"),
                           ("not a database", "SQLITE_NOTADB")):
        if fragment in text:
            return code
    return ""


def _disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, sqlite3.Error) and _code(error) == "SQLITE_FULL"


def _damaged(error: BaseException) -> bool:
    return isinstance(error, sqlite3.DatabaseError) and _code(error) in ("SQLITE_CORRUPT", "SQLITE_NOTADB")


def _translate(error: BaseException, path: Path) -> Optional[StoreError]:
    """The :class:`StoreError` ``error`` means for the store at ``path``, or ``None`` (a bug: re-raised)."""
    if _disk_full(error):
        return StoreFull(path, str(error) if isinstance(error, sqlite3.Error) else
                         f"{error.strerror} (errno {error.errno})")
    if _damaged(error):
        return StoreDamaged(path, str(error), inspect(path))
    return None


class Store:
    """``Store(path)`` opens (creating if needed) the SQLite file at ``path``.

    Each method opens its own short connection, so a ``Store`` can be pickled to worker processes and
    used from several processes at once. ``readonly=True`` opens an existing file for reading only
    (SQLite's ``mode=ro``): nothing is created or written, so a study on a read-only disk can be reported.
    A damaged file raises :class:`StoreDamaged`, a full disk :class:`StoreFull` (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if self.path.exists() and self.path.is_dir():
            raise UserError(f"store path {self.path} is a directory; expected a SQLite file path")
        if readonly:
            if not self.path.is_file():
                raise UserError(f"no store at {self.path}; expected the study.sqlite of a `bnlab study` directory")
            with self._connect() as db:   # the file is a database holding a study (damage is reported here)
                tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not {"runs", "meta"} <= tables:
                raise UserError(f"{self.path} holds no study (no {' or '.join(sorted({'runs', 'meta'} - tables))} "
                                f"table{'s' if len({'runs', 'meta'} - tables) > 1 else ''}); expected the "
                                f"study.sqlite of a `bnlab study` directory")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.executescript(_SCHEMA)
            finally:
                db.close()
        except (sqlite3.Error, OSError) as error:
            translated = _translate(error, self.path)
            if translated is None:
                raise
            raise translated from None

    def check(self) -> None:
        """Raise :class:`StoreDamaged` unless SQLite's quick check passes (it reads every page once)."""
        with self._connect() as db:
            problems = [r[0] for r in db.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            raise StoreDamaged(self.path, f"SQLite's quick check: {'; '.join(problems)}", inspect(self.path))

    def _connect(self) -> "_Transaction":
        try:
            if self.readonly:
                db = _connect_readonly(self.path)
            else:
                db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None)
            db.execute("PRAGMA busy_timeout=60000")
        except (sqlite3.Error, OSError) as error:
            translated = _translate(error, self.path)
            if translated is None:
                raise
            raise translated from None
        return _Transaction(db, "BEGIN" if self.readonly else "BEGIN IMMEDIATE", self.path)

    # ------------------------------------------------------------------ runs
    def put(self, key: str, spec: dict, status: str, result: Optional[dict] = None,
            error: Optional[str] = None, seconds: Optional[float] = None,
            versions: Optional[dict] = None, hardware: Optional[dict] = None) -> None:
        """Record one finished run (atomically; a second ``put`` of the same key replaces it and counts
        an attempt)."""
        self.put_many([(key, spec, status, result, error, seconds, versions, hardware)])

    def put_many(self, rows: list[tuple]) -> None:
        """Record several finished runs in one transaction — all or none: the runs of a stack, so an
        interruption never leaves part of a stack stored. Each row is :meth:`put`'s arguments in order."""
        checked, here = [], None
        for row in rows:
            key, spec, status, result, error, seconds, versions, hardware = (list(row) + [None] * 8)[:8]
            if status not in STATUSES:
                raise ValueError(f"status must be one of {', '.join(STATUSES)} (got {status!r})")
            if versions is None or hardware is None:
                here = here or environment()   # once per call
                versions, hardware = here
            checked.append((key, spec, status, result, error, seconds, versions, hardware))
        with self._connect() as db:
            for key, spec, status, result, error, seconds, versions, hardware in checked:
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
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db
    except sqlite3.OperationalError as error:
        db.close()
        if _disk_full(error):
            raise
        return sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, timeout=60.0, isolation_level=None)


class _Transaction:
    """A connection used as ``with``: BEGIN IMMEDIATE (a plain BEGIN when read-only) on entry, COMMIT (or
    ROLLBACK) and close on exit. A full disk or a damaged file inside it becomes a :class:`StoreError`."""

    def __init__(self, db: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE", path: Optional[Path] = None) -> None:
        self._db = db
        self._begin = begin
        self._path = path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self._db.execute(self._begin)
        except BaseException as error:
            self._db.close()
            self._raise_translated(error)
            raise
        return self._db

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            try:
                self._db.execute("ROLLBACK" if exc_type else "COMMIT")
            except sqlite3.Error as error:   # SQLite rolls back a commit that failed (a full disk, say)
                if exc is None:
                    self._raise_translated(error)
                    raise
        finally:
            self._db.close()
        if exc is not None:
            self._raise_translated(exc)

    def _raise_translated(self, error: BaseException) -> None:
        translated = _translate(error, self._path) if self._path is not None else None
        if translated is not None:
            raise translated from None


# ------------------------------------------------------------------------------------------ damage
@dataclass
class Inspection:
    """What is left of a damaged store: SQLite's integrity check (``"ok"``, or its first problems, or why it
    could not run) and the run rows still readable whole (``rows``: the raw columns)."""

    integrity: str
    rows: list

    @property
    def readable(self) -> int:
        return len(self.rows)


_COLUMNS = ("key", "kind", "spec", "status", "result", "error", "seed", "seconds", "finished", "attempts",
            "versions", "hardware")


def _whole(row: tuple) -> bool:
    """A row read back from a damaged file is kept only if its JSON columns decode and its status is known."""
    named = dict(zip(_COLUMNS, row))
    try:
        for name in ("spec", "result", "versions", "hardware"):
            if named[name] is not None:
                json.loads(named[name])
        json.loads(named["spec"])
    except (TypeError, ValueError):
        return False
    return isinstance(named["key"], str) and named["status"] in STATUSES


def inspect(path: str | os.PathLike, problems: int = 3, gap: int = 10000) -> Inspection:
    """SQLite's integrity check of the store at ``path`` and every run row that can still be read whole,
    opened read-only: nothing is written. Rows are read in rowid order, stepping past what a damaged page
    hides, until ``gap`` rowids in a row are unreadable. A file shorter than its header says (truncated) is
    read as far as it goes (``writable_schema``, as SQLite's own recovery does)."""
    path = Path(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        db.execute("PRAGMA writable_schema=ON")   # read-only: lets SQLite open a truncated file as it is
    except sqlite3.Error as error:
        return Inspection(f"cannot run ({error})", [])
    try:
        try:
            found = [line for r in db.execute(f"PRAGMA integrity_check({int(problems)})")
                     for line in r[0].splitlines() if line.strip() and not line.startswith("***")]
            integrity = "ok" if found == ["ok"] else (f"{len(found)}{'+' if len(found) >= problems else ''} "
                                                      f"problem(s), the first: {found[0] if found else '?'}")
        except sqlite3.Error as error:
            integrity = f"cannot run ({error})"
        rows: list = []
        rowid, misses, columns = 0, 0, ", ".join(_COLUMNS)
        while misses < gap:
            try:
                row = db.execute(f"SELECT rowid, {columns} FROM runs WHERE rowid > ? ORDER BY rowid LIMIT 1",
                                 (rowid,)).fetchone()
            except sqlite3.Error:
                row = ()
            if row is None:
                break
            if not row or row[0] <= rowid:   # unreadable, or a damaged page's garbage: step past it
                rowid, misses = rowid + 1, misses + 1
                continue
            rowid, misses = row[0], 0
            if _whole(row[1:]):
                rows.append(row[1:])
        return Inspection(integrity, rows)
    finally:
        db.close()


def _aside(path: Path) -> Path:
    """A name beside ``path`` that nothing holds yet: ``study.sqlite.damaged-YYYYmmdd-HHMMSS[-N]``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}{stamp}{'' if n == 0 else f'-{n}'}")
        if not any(Path(f"{target}{end}").exists() for end in ("", "-wal", "-shm")):
            return target
    raise UserError(f"{path} is damaged and the names beside it for moving it aside are all taken; move it "
                    f"away by hand")


@dataclass
class Recovery:
    """What :func:`recover` did: where the damaged file went, the runs it carried over, and why."""

    moved_to: Path
    kept: int
    damage: str


def recover(path: str | os.PathLike, damage: str = "") -> Recovery:
    """Move the damaged store at ``path`` aside (with its ``-wal`` and ``-shm``; nothing is overwritten or
    deleted) and put in its place a new store holding every run still readable from it (:func:`inspect`),
    built beside it first, so that a failure on the way (a full disk) leaves the damaged file where it was.
    The new store's meta is left empty (the study writes its own). Raises :class:`StoreFull` if the disk is
    full."""
    path = Path(path)
    inspection = inspect(path)
    fresh = path.with_name(f"{path.name}.recovering")
    for end in ("", "-wal", "-shm"):
        Path(f"{fresh}{end}").unlink(missing_ok=True)   # an earlier recovery that stopped half-way
    store = Store(fresh)
    with store._connect() as db:
        db.executemany(f"INSERT OR REPLACE INTO runs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                       inspection.rows)
    db = sqlite3.connect(fresh)
    try:
        db.execute("PRAGMA journal_mode=DELETE")   # every row in the one file it is renamed as
    except sqlite3.Error as error:
        translated = _translate(error, path)
        raise translated or error from None
    finally:
        db.close()
    target = _aside(path)
    for end in ("", "-wal", "-shm"):
        if Path(f"{path}{end}").exists():
            os.replace(f"{path}{end}", f"{target}{end}")
    os.replace(fresh, path)
    Store(path)   # back to WAL, as every store
    return Recovery(target, inspection.readable, damage or f"SQLite's integrity check: {inspection.integrity}")


def _decode(row: dict) -> dict:
    for name in ("spec", "result", "versions", "hardware"):
        if row.get(name) is not None:
            row[name] = json.loads(row[name])
    return row
