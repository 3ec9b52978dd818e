"""The registry of claims: number → module, and the spec collection the runner loops on.

A claim is one module plus one line in :data:`MODULES`. Everything the rest of the study knows about a
claim it reads from the module's declarations (:data:`PROVIDES`, checked here when the module is
registered); nothing outside the module tests a claim's number:

* ``NUMBER``, ``SLUG``, ``TITLE`` — its number (``--claims``, the report's order), the name of its
  profile section, its title; ``LITERATURE``, ``FINDING``, ``EXPECTED``, ``RULES``, ``RULE``, ``PAPER``
  — what the literature found and the rules fixed before any data (:mod:`bnlab.study.verdict`);
* ``Config``, ``PRESETS`` — its profile section's schema (pydantic) and its defaults per profile size;
* ``measure(profile, results=None) -> [spec, ...]`` — its runs. It may ask for more once it sees results
  (claim 4 extends its learning-rate grid while an arm is stable at the top; claim 2 trains each arm at
  the rate claim 4's sweep validated), so the runner collects specs again after each round until none
  are new;
* ``decide(profile, results) -> findings`` — a dataclass holding its parts (``findings.parts``) and every
  number its report shows; ``render(profile, findings) -> ClaimResult`` — tables, figures and prose
  formatted from the findings alone;
* ``TUNED_ON_SEEDS`` — whether it chooses rates on the tuning seeds and then runs the other seeds at the
  choice (the dry-run plan counts that second round); ``LATER_ROUNDS`` — ``None``, or what it may add in
  later rounds and at most how many (:class:`bnlab.study.common.LaterRounds`);
* ``PROFILE_CHECKS`` — checks across sections, each called with the profile being validated and raising
  :class:`ValueError`; ``DATASET_FIELDS`` — fields of its section that ``--dataset`` sets too.

A claim module imports no other claim module (what several share lives in :mod:`bnlab.study.common` and
:mod:`bnlab.study.sweep`) and never this registry.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable, Optional, Sequence

from bnlab.errors import UserError
from bnlab.study.common import LaterRounds
from bnlab.study.specs import unique_specs

__all__ = ["MODULES", "PROVIDES", "CLAIMS", "SECTIONS", "register", "parse_claims", "collect_specs"]

# One line per claim, in the order their profile sections appear.
MODULES = [
    "bnlab.study.claim_ics",
    "bnlab.study.claim_speed",
    "bnlab.study.claim_regularize",
    "bnlab.study.claim_lr",
    "bnlab.study.claim_residual",
]

PROVIDES = {"NUMBER": int, "SLUG": str, "TITLE": str, "LITERATURE": str, "FINDING": str, "EXPECTED": str,
            "RULES": list, "RULE": str, "PAPER": list, "Config": type, "PRESETS": dict, "measure": callable,
            "decide": callable, "render": callable, "TUNED_ON_SEEDS": bool,
            "LATER_ROUNDS": (LaterRounds, type(None)), "PROFILE_CHECKS": tuple, "DATASET_FIELDS": tuple}


def _provides(value, kind) -> bool:
    return kind(value) if kind is callable else isinstance(value, kind)


def register(modules: Iterable[ModuleType]) -> dict[int, ModuleType]:
    """Number → module for ``modules``, each checked to provide :data:`PROVIDES` with a number and a
    section name of its own; raises :class:`TypeError` naming the module and what it lacks."""
    claims: dict[int, ModuleType] = {}
    for module in modules:
        wrong = [name for name, kind in PROVIDES.items()
                 if not hasattr(module, name) or not _provides(getattr(module, name), kind)]
        if wrong:
            raise TypeError(f"claim module {module.__name__} must provide {', '.join(wrong)} "
                            f"(see bnlab.study.claims)")
        taken = {c.NUMBER: c for c in claims.values()} | {c.SLUG: c for c in claims.values()}
        for mine in (module.NUMBER, module.SLUG):
            if mine in taken:
                raise TypeError(f"claim modules {taken[mine].__name__} and {module.__name__} both declare {mine!r}")
        claims[module.NUMBER] = module
    return claims


CLAIMS = register(importlib.import_module(name) for name in MODULES)
SECTIONS = {m.SLUG: m for m in CLAIMS.values()}  # profile section name → the module owning its schema


def parse_claims(text) -> list[int]:
    """``"1,4"`` (or a list) → ``[1, 4]``; raises :class:`UserError` naming ``--claims`` for anything else."""
    if text is None or text == "" or text == "all":
        return sorted(CLAIMS)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        numbers = sorted({int(str(i).strip()) for i in items})
    except ValueError:
        raise UserError(f"--claims expects comma-separated claim numbers {min(CLAIMS)}-{max(CLAIMS)}, e.g. 1,4 "
                        f"(got {text!r})") from None
    unknown = [n for n in numbers if n not in CLAIMS]
    if unknown:
        raise UserError(f"--claims: no claim {unknown[0]}; expected numbers among {sorted(CLAIMS)}")
    return numbers


def collect_specs(profile: dict, claims: Sequence[int], results: Optional[dict] = None) -> dict[str, dict]:
    """Key → spec for every run the chosen claims declare given ``results`` so far; shared runs appear once."""
    return unique_specs(spec for n in claims for spec in CLAIMS[n].measure(profile, results))
