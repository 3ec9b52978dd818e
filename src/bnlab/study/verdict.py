"""Verdicts: the three answers a claim can get, and the interval rules that produce them.

Every claim module fixes its thresholds in code *before* any data is seen and states them in words
(``RULE``) for the report. A rule looks at a measured effect's 95% confidence interval over seeds:

* the whole interval clears the threshold → the effect is there;
* the whole interval falls short of it → it is not;
* the interval straddles it → we cannot tell at this number of seeds (which becomes a caveat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

__all__ = ["SUPPORTED", "NOT_SUPPORTED", "CAVEATS", "VERDICTS", "Interval", "Verdict", "ClaimResult",
           "clears", "combine"]

SUPPORTED = "supported"
NOT_SUPPORTED = "not supported"
CAVEATS = "supported with caveats"
VERDICTS = (SUPPORTED, CAVEATS, NOT_SUPPORTED)


@dataclass
class Interval:
    """A mean with its 95% confidence interval, and what it measures (for the report)."""

    mean: float
    low: float
    high: float
    unit: str = ""

    @classmethod
    def of(cls, triple: tuple[float, float, float], unit: str = "") -> "Interval":
        return cls(*triple, unit=unit)

    def text(self, digits: int = 2) -> str:
        if not math.isfinite(self.mean):
            return "n/a"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.mean:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict:
        return {"mean": self.mean, "low": self.low, "high": self.high, "unit": self.unit}


def clears(interval: Interval, threshold: float) -> Optional[bool]:
    """``True`` if the whole interval is above ``threshold``, ``False`` if wholly at or below it,
    ``None`` if it straddles (or is undefined)."""
    if not all(math.isfinite(v) for v in (interval.low, interval.high)):
        return None
    if interval.low > threshold:
        return True
    if interval.high <= threshold:
        return False
    return None


def combine(first: Optional[bool], second: Optional[bool]) -> str:
    """The verdict of a claim with two parts, each ``True`` (holds), ``False`` (fails) or ``None``
    (undecided): both hold → supported; neither holds (and none undecided) → not supported; anything
    in between → supported with caveats; the first part failing → not supported."""
    if first is True and second is True:
        return SUPPORTED
    if first is False or (first is None and second is False):
        return NOT_SUPPORTED
    return CAVEATS


@dataclass
class Verdict:
    """A claim's answer: the verdict, its key number and a paragraph that explains it from the figures."""

    verdict: str
    key_number: str
    key_interval: Interval
    explanation: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS} (got {self.verdict!r})")


@dataclass
class ClaimResult:
    """What a claim module's ``analyze`` returns and the report renders."""

    number: int
    title: str
    verdict: Verdict
    literature: str
    rule: str
    caveats: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)   # {"title", "columns", "rows"}
    figures: list[dict] = field(default_factory=list)  # {"title", "name", "figure" (matplotlib), "caption"}
    agrees_with_literature: Optional[bool] = None
    finding: str = ""                                   # the literature's finding in one line (summary table)
    numbers: dict = field(default_factory=dict)         # raw numbers, saved as JSON beside the report
    error: Optional[str] = None                         # why the analysis failed, if it did
