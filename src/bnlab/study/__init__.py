"""The study: measure each claimed effect of batch normalization in residual networks.

One module per claim (``claim_ics``, ``claim_speed``, ``claim_regularize``, ``claim_lr``,
``claim_residual``), each declaring its runs (``specs(profile)``), its verdict rule (``RULE`` and the
thresholds beside it, fixed before any data) and its analysis (``analyze(profile, results)``). The
runner executes the union of their specs once each into a SQLite store; the report reads the store.

Example::

    >>> from bnlab.study import run_study, get_profile
    >>> report = run_study(get_profile("quick"), "study-out", jobs=2)   # doctest: +SKIP
"""

from __future__ import annotations

from bnlab.study import claim_ics, claim_lr, claim_regularize, claim_residual, claim_speed
from bnlab.study.profiles import PROFILES, get_profile, with_overrides

CLAIMS = {m.NUMBER: m for m in (claim_ics, claim_speed, claim_regularize, claim_lr, claim_residual)}


def parse_claims(text) -> list[int]:
    """``"1,4"`` (or a list) → ``[1, 4]``; raises ``ValueError`` naming ``--claims`` for anything else."""
    if text is None or text == "" or text == "all":
        return sorted(CLAIMS)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        numbers = sorted({int(str(i).strip()) for i in items})
    except ValueError:
        raise ValueError(f"--claims expects comma-separated claim numbers 1-5, e.g. 1,4 (got {text!r})") from None
    unknown = [n for n in numbers if n not in CLAIMS]
    if unknown:
        raise ValueError(f"--claims: no claim {unknown[0]}; expected numbers among {sorted(CLAIMS)}")
    return numbers


def run_study(*args, **kwargs):
    from bnlab.study.runner import run_study as run
    return run(*args, **kwargs)


__all__ = ["CLAIMS", "PROFILES", "get_profile", "with_overrides", "parse_claims", "run_study"]
