"""The study: measure each claimed effect of batch normalization in residual networks.

One module per claim (``claim_ics``, ``claim_speed``, ``claim_regularize``, ``claim_lr``,
``claim_residual``), each in three parts: ``measure`` (its runs, as specs), ``decide`` (its verdict
rules, ``RULES``, fixed in code before any data, and every number its report shows, as findings) and
``render`` (tables, figures, prose formatted from the findings). The registry is
:mod:`bnlab.study.claims` (a claim is one module plus one line there); what several claims share is in
:mod:`bnlab.study.common` and :mod:`bnlab.study.sweep` (the learning-rate sweep of claims 2, 4 and 5);
the kinds of run are declared in :mod:`bnlab.study.kinds`. The runner executes the union of the claims'
specs once each into a SQLite store; the report reads the store.

Example::

    >>> from bnlab.study import run_study, get_profile
    >>> report = run_study(get_profile("quick"), "study-out", jobs=2)   # doctest: +SKIP

The names below are loaded on first use, so importing a claim module never imports this package's
registry (no import cycle between the package and its claims).
"""

from __future__ import annotations

__all__ = ["CLAIMS", "PROFILES", "get_profile", "with_overrides", "parse_claims", "run_study"]

_FROM = {"CLAIMS": "claims", "parse_claims": "claims", "PROFILES": "profiles", "get_profile": "profiles",
         "with_overrides": "profiles", "run_study": "runner"}


def __getattr__(name: str):
    if name not in _FROM:
        raise AttributeError(f"module 'bnlab.study' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"bnlab.study.{_FROM[name]}"), name)
