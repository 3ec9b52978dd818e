"""The registry of claims: number → module, and the spec collection the runner loops on.

Each claim module has ``measure(profile, results=None) -> specs``, ``decide(profile, results) -> (parts,
facts)``, ``render(profile, results, parts, facts) -> ClaimResult`` and ``analyze`` (render ∘ decide), its
profile section's schema ``Config`` and ``PRESETS``. ``measure`` may ask for more runs once it sees results
(claim 4 extends its learning-rate grid while an arm is stable at the top; claim 2 trains each arm at the
rate claim 4's sweep validated), so the runner collects specs again after each round until none are new.
"""

from __future__ import annotations

from typing import Optional, Sequence

from bnlab.errors import UserError
from bnlab.study import claim_ics, claim_lr, claim_regularize, claim_residual, claim_speed
from bnlab.study.specs import unique_specs

__all__ = ["CLAIMS", "SECTIONS", "parse_claims", "collect_specs"]

CLAIMS = {m.NUMBER: m for m in (claim_ics, claim_speed, claim_regularize, claim_lr, claim_residual)}
SECTIONS = {m.SLUG: m for m in CLAIMS.values()}  # profile section name → the module owning its schema


def parse_claims(text) -> list[int]:
    """``"1,4"`` (or a list) → ``[1, 4]``; raises :class:`UserError` naming ``--claims`` for anything else."""
    if text is None or text == "" or text == "all":
        return sorted(CLAIMS)
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        numbers = sorted({int(str(i).strip()) for i in items})
    except ValueError:
        raise UserError(f"--claims expects comma-separated claim numbers 1-5, e.g. 1,4 (got {text!r})") from None
    unknown = [n for n in numbers if n not in CLAIMS]
    if unknown:
        raise UserError(f"--claims: no claim {unknown[0]}; expected numbers among {sorted(CLAIMS)}")
    return numbers


def collect_specs(profile: dict, claims: Sequence[int], results: Optional[dict] = None) -> dict[str, dict]:
    """Key → spec for every run the chosen claims declare given ``results`` so far; shared runs appear once."""
    return unique_specs(spec for n in claims for spec in CLAIMS[n].measure(profile, results))
