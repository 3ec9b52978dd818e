"""Run specs: what one run is, as plain JSON-able data, with a key that identifies it.

A spec is a flat ``dict`` (``kind``, one of :data:`bnlab.study.kinds.KINDS`, plus the settings that
change the result: dataset, model, norm, learning rate, seed, …). Two claims that need the same run
declare equal dicts and so get the same :func:`spec_key`; the runner executes it once and both claims
read the one stored result. Keeping specs as data (not objects) lets them go into SQLite as text and
come back unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

from bnlab.study.kinds import named

__all__ = ["make_spec", "spec_key", "unique_specs", "spec_label"]


def make_spec(kind: str, **fields: Any) -> dict:
    """A spec of the kind named ``kind`` (see :mod:`bnlab.study.kinds`; a claim calls the kind's own
    ``spec``). Values must be JSON scalars, lists or dicts; an unknown kind raises :class:`ValueError`.
    """
    return named(kind).spec(**fields)


def spec_key(spec: dict) -> str:
    """A short stable hash of the spec's canonical JSON: equal specs, equal keys, in any process."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def unique_specs(specs: Iterable[dict]) -> dict[str, dict]:
    """Key → spec, keeping the first of each set of identical specs (declaration order is kept)."""
    out: dict[str, dict] = {}
    for spec in specs:
        out.setdefault(spec_key(spec), spec)
    return out


def spec_label(spec: dict) -> str:
    """A one-line human label, for progress bars and error messages."""
    parts = [spec.get("kind", "?"), spec.get("model", ""), spec.get("norm", "")]
    if spec.get("plain"):
        parts.append("plain")
    for name in ("depth", "lr", "batch_size", "seed"):
        if name in spec:
            parts.append(f"{name}={spec[name]}")
    return " ".join(str(p) for p in parts if p != "")
