"""Verdicts: how a claim's measured effects become one of five answers, by rules fixed before the data.

A claim has one or more *parts* (claim 4: "BN allows higher learning rates" and "hence better models").
Each part is a :class:`Rule` fixed in code before any run exists: the effect it measures (a paired,
per-seed difference oriented so that *positive* is the direction the claim asserts), a **threshold** the
effect must exceed to count as present, and an **equivalence margin** below which it counts as absent
(the smallest effect that would matter). With the 95% Student-t interval of the paired effect:

* the whole interval above the threshold            → the part **holds**;
* the whole interval below the margin               → the part is **refuted** (absent, or reversed when
  the whole interval is below −margin);
* anything else (it straddles threshold or margin)  → **undecided** at this number of seeds;
* fewer than :data:`MIN_SEEDS` finished seeds       → **no data** (a failed or missing arm).

The parts combine (:func:`combine`) into the claim's verdict:

=====================  ==========================================================================
``supported``          every part holds
``partly supported``   at least one part holds and another is refuted
``not supported``      a part is refuted and none holds
``inconclusive``       nothing refuted, and some part undecided (the report says which part and
                       roughly how many seeds would decide it, from the observed spread)
``no verdict``         some part has no data: runs failed or too few seeds finished
=====================  ==========================================================================

Each claim module also declares what the literature found (``EXPECTED``, one of the verdicts);
:func:`agrees` compares the two and is never loosened: "partly supported" agrees only with
"partly supported", and "inconclusive" or "no verdict" agree with nothing (shown as "—").
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["SUPPORTED", "PARTLY", "NOT_SUPPORTED", "INCONCLUSIVE", "NO_VERDICT", "VERDICTS",
           "HOLDS", "REFUTED", "UNDECIDED", "NO_DATA", "MIN_SEEDS", "CONFIDENCE",
           "Interval", "Rule", "Effect", "Part", "Verdict", "ClaimResult",
           "t_interval", "paired_effect", "combine", "combine_with_premise", "agrees", "seeds_to_decide",
           "between", "SEEDS_LIMIT", "confidence", "at_confidence", "across", "Across", "percent"]

SUPPORTED = "supported"
PARTLY = "partly supported"
NOT_SUPPORTED = "not supported"
INCONCLUSIVE = "inconclusive"
NO_VERDICT = "no verdict"
VERDICTS = (SUPPORTED, PARTLY, NOT_SUPPORTED, INCONCLUSIVE, NO_VERDICT)

HOLDS, REFUTED, UNDECIDED, NO_DATA = "holds", "refuted", "undecided", "no data"

MIN_SEEDS = 3       # fewer finished (paired) seeds than this: no verdict for the part
CONFIDENCE = 0.95   # two-sided level of every interval in the study, unless a sequential design's look sets another

_LEVEL = contextvars.ContextVar("confidence", default=CONFIDENCE)


def confidence() -> float:
    """The two-sided level intervals are computed at now: :data:`CONFIDENCE`, or the level a sequential
    design gives the current look (:func:`at_confidence`, :mod:`bnlab.study.sequential`)."""
    return _LEVEL.get()


@contextlib.contextmanager
def at_confidence(level: float):
    """Compute every interval (and every part's decision) inside the block at ``level``."""
    if not 0 < level < 1:
        raise ValueError(f"confidence level must lie in (0, 1) (got {level})")
    token = _LEVEL.set(float(level))
    try:
        yield
    finally:
        _LEVEL.reset(token)


@dataclass
class Interval:
    """A mean with its confidence interval and unit (for the report)."""

    mean: float
    low: float
    high: float
    unit: str = ""

    @classmethod
    def of(cls, triple: Sequence[float], unit: str = "") -> "Interval":
        mean, low, high = triple
        return cls(float(mean), float(low), float(high), unit=unit)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.mean, self.low, self.high))

    def text(self, digits: int = 2) -> str:
        if not self.finite:
            return "n/a"
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.mean:.{digits}f}{unit} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    def to_dict(self) -> dict:
        """JSON-safe: non-finite numbers become ``None``."""
        def clean(v):
            return float(v) if math.isfinite(v) else None
        return {"mean": clean(self.mean), "low": clean(self.low), "high": clean(self.high), "unit": self.unit}


def t_interval(values: Sequence[float], bounds: Optional[tuple[float, float]] = None,
               level: Optional[float] = None) -> tuple[float, float, float]:
    """(mean, low, high): the mean of the finite ``values`` and its two-sided Student-t interval at
    ``level`` (default: :func:`confidence`).

    One value gives a zero-width interval, none gives NaNs (callers decide what too few seeds mean:
    :func:`paired_effect` marks them as no data). ``bounds`` clips the interval to the quantity's range
    (an accuracy in percent: ``(0, 100)``; a difference of two: ``(-100, 100)``): the t-interval
    ignores that a bounded mean cannot leave its range, so the clipped part carries no information.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if x.size == 1:
        low = high = mean
    else:
        level = confidence() if level is None else level
        half = float(stats.t.ppf(0.5 + level / 2, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
        low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return (mean, low, high)


@dataclass(frozen=True)
class Rule:
    """One part of a claim, fixed before any data.

    ``effect`` names the paired per-seed difference, oriented so that positive is what the claim asserts;
    it must exceed ``threshold`` to hold and counts as absent below ``margin`` (0 ≤ margin ≤ threshold).
    """

    name: str            # "higher learning rates"
    effect: str          # "log10(max stable lr BN) − log10(max stable lr none)"
    threshold: float
    margin: float
    unit: str = ""
    bounds: Optional[tuple[float, float]] = None  # the effect's possible range, if bounded

    def __post_init__(self) -> None:
        if not (0 <= self.margin <= self.threshold):
            raise ValueError(f"Rule {self.name!r}: need 0 <= margin <= threshold "
                             f"(got margin {self.margin}, threshold {self.threshold})")

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.name}: holds when the {percent(confidence())} CI of {self.effect} lies above "
                f"{self.threshold:g}{unit}; "
                f"refuted (absent) when it lies below {self.margin:g}{unit}; otherwise undecided")

    def decide(self, effect: "Effect") -> str:
        """:data:`HOLDS`, :data:`REFUTED`, :data:`UNDECIDED` or :data:`NO_DATA` for ``effect``."""
        if effect.n < MIN_SEEDS or not effect.interval.finite:
            return NO_DATA
        if effect.interval.low > self.threshold:
            return HOLDS
        if effect.interval.high < self.margin:
            return REFUTED
        return UNDECIDED


@dataclass
class Effect:
    """A paired effect: per-seed differences, their mean and interval."""

    values: list[float]
    interval: Interval
    seeds: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def sd(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan


def paired_effect(treated: Mapping, control: Mapping, unit: str = "",
                  bounds: Optional[tuple[float, float]] = None) -> Effect:
    """``treated[seed] − control[seed]`` over the seeds both have a finite value for (paired by seed:
    the same data order and initialization seed in both arms), with its t-interval."""
    seeds = [s for s in treated if s in control and _finite(treated[s]) and _finite(control[s])]
    values = [float(treated[s]) - float(control[s]) for s in seeds]
    return Effect(values, Interval.of(t_interval(values, bounds), unit), seeds)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


SEEDS_LIMIT = 1000   # seeds_to_decide looks no further


def between(rule: Rule, effect: Effect) -> bool:
    """Whether the effect's mean lies between the rule's margin and threshold (inclusive), where more seeds
    would pin an undecided part there rather than decide it."""
    mean = effect.interval.mean
    return math.isfinite(mean) and rule.margin <= mean <= rule.threshold


def seeds_to_decide(rule: Rule, effect: Effect, limit: int = SEEDS_LIMIT,
                    level: Optional[float] = None) -> Optional[int]:
    """Roughly how many seeds would decide an undecided part, if its mean and spread stayed as observed:
    the smallest n whose interval half-width leaves the mean clear of the threshold (mean above it) or of
    the margin (mean below it). ``None`` when the mean sits between margin and threshold (more seeds would
    pin it there, undecided: :func:`between`), when more than ``limit`` seeds would be needed, or when the
    spread is unknown."""
    mean, sd = effect.interval.mean, effect.sd
    if not (math.isfinite(mean) and math.isfinite(sd)):
        return None
    if mean > rule.threshold:
        gap = mean - rule.threshold
    elif mean < rule.margin:
        gap = rule.margin - mean
    else:
        return None
    if sd == 0:
        return max(MIN_SEEDS, effect.n)
    level = confidence() if level is None else level
    for n in range(max(2, effect.n), limit + 1):
        if float(stats.t.ppf(0.5 + level / 2, df=n - 1)) * sd / math.sqrt(n) < gap:
            return max(n, MIN_SEEDS)
    return None


@dataclass
class Part:
    """One decided part: the rule, the measured effect and the outcome."""

    rule: Rule
    effect: Effect
    outcome: str = ""
    level: float = 0.0          # the interval's confidence level (set from :func:`confidence` when made)

    def __post_init__(self) -> None:
        if not self.outcome:
            self.outcome = self.rule.decide(self.effect)
        if not self.level:
            self.level = confidence()

    @property
    def reversed(self) -> bool:
        """Refuted with the whole interval on the opposite side (below −margin)."""
        return self.outcome == REFUTED and self.effect.interval.high < -self.rule.margin

    def text(self, digits: int = 2) -> str:
        """"higher learning rates holds: 0.83 decades [0.51, 1.15] (threshold 0.4, margin 0.15; 6 seeds)"."""
        outcome = "is refuted (reversed)" if self.reversed else {
            HOLDS: "holds", REFUTED: "is refuted (absent)", UNDECIDED: "is undecided",
            NO_DATA: "has no verdict (too few finished seeds)"}[self.outcome]
        level = "" if self.level == CONFIDENCE else f", {percent(self.level)} interval"
        text = (f"{self.rule.name} {outcome}: {self.rule.effect} = {self.effect.interval.text(digits)} "
                f"(threshold {self.rule.threshold:g}, margin {self.rule.margin:g}; {self.effect.n} seeds{level})")
        if self.outcome == UNDECIDED:
            why, n = self.undecided_reason()
            text += {"seeds": f"; about {n} seeds would decide it at the observed spread",
                     "between": "; its mean lies between margin and threshold, so more seeds would not decide it",
                     "limit": f"; more than {SEEDS_LIMIT:,} seeds would be needed at the observed spread",
                     "unknown": ""}[why]
        return text

    def undecided_reason(self) -> tuple[str, Optional[int]]:
        """Why more seeds would or would not decide this part: ``("seeds", n)`` (about ``n`` seeds in all
        would), ``("between", None)`` (its mean lies between margin and threshold), ``("limit", None)`` (more
        than :data:`SEEDS_LIMIT` would be needed) or ``("unknown", None)`` (no finite mean or spread)."""
        n = seeds_to_decide(self.rule, self.effect, level=self.level)
        if n is not None:
            return "seeds", n
        if between(self.rule, self.effect):
            return "between", None
        if not (math.isfinite(self.effect.interval.mean) and math.isfinite(self.effect.sd)):
            return "unknown", None
        return "limit", None

    def to_dict(self) -> dict:
        return {"name": self.rule.name, "effect": self.rule.effect, "threshold": self.rule.threshold,
                "margin": self.rule.margin, "unit": self.rule.unit, "outcome": self.outcome, "confidence": self.level,
                "reversed": self.reversed, "interval": self.effect.interval.to_dict(), "n": self.effect.n,
                "values": [float(v) for v in self.effect.values],
                "seeds_to_decide": seeds_to_decide(self.rule, self.effect, level=self.level)
                if self.outcome == UNDECIDED else None}


def percent(level: float) -> str:
    """A confidence level in percent: 0.95 → "95%", 0.975 → "97.5%", 0.9875 → "98.75%"."""
    return f"{100 * level:.2f}".rstrip("0").rstrip(".") + "%"


@dataclass
class Across:
    """A part decided over every setting of a knob (:func:`across`)."""

    outcome: str
    index: Optional[int]   # the setting whose effect decides (and is shown); None: no setting has data
    effect: Optional[Effect]  # that setting's effect, at :attr:`level`
    level: float           # its interval's level: the current one, or the adjusted one of a refutation
    changes: bool          # the part holds at one setting and is refuted at another


def across(rule: Rule, effects: Sequence[Effect], bounds: Optional[tuple[float, float]] = None) -> Across:
    """Decide a part that claims an effect at *every* setting of a knob (claim 1: every probe step of its
    stable range) from the settings' paired effects, with the error of one interval:

    * it **holds** when it holds at every setting, each at the current level (:func:`confidence`): a false
      "holds" needs every one of the intervals to be wrong, so its rate stays that of one interval
      (an intersection-union test);
    * it is **refuted** when it holds at none and, at some setting, the interval at level
      ``1 − (1 − confidence()) / m`` (``m`` settings) lies below the margin: one clear counterexample refutes
      a claim made for every setting, and the Bonferroni level keeps a false "refuted" at any of the ``m``
      within one interval's error, whatever the correlation between settings (a plain 95% interval at each
      would give up to ``m`` times that);
    * otherwise it is **undecided** — also when it holds at one setting and is refuted at another (``changes``:
      the answer depends on the knob).

    The effect returned is the deciding setting's: the last that holds or is undecided, or the last refuted
    one (at its adjusted level). ``bounds``: the effect's range, as for :func:`paired_effect`.
    """
    level = confidence()
    with_data = [i for i, e in enumerate(effects) if rule.decide(e) != NO_DATA]
    if not with_data:
        return Across(NO_DATA, None, None, level, False)
    adjusted = 1.0 - (1.0 - level) / len(with_data)
    wide = {i: Effect(list(effects[i].values),
                      Interval.of(t_interval(effects[i].values, bounds, adjusted), effects[i].interval.unit),
                      list(effects[i].seeds)) for i in with_data}
    holds = [i for i in with_data if rule.decide(effects[i]) == HOLDS]
    refuted = [i for i in with_data if rule.decide(wide[i]) == REFUTED]
    if len(holds) == len(with_data):
        return Across(HOLDS, holds[-1], effects[holds[-1]], level, False)
    if refuted and not holds:
        return Across(REFUTED, refuted[-1], wide[refuted[-1]], adjusted, False)
    return Across(UNDECIDED, with_data[-1], effects[with_data[-1]], level, bool(holds and refuted))


def combine(outcomes: Sequence[str]) -> str:
    """The claim's verdict from its parts' outcomes (see the module docstring's table)."""
    if not outcomes:
        raise ValueError("combine: a claim needs at least one part")
    if any(o == NO_DATA for o in outcomes):
        return NO_VERDICT
    held, refuted = outcomes.count(HOLDS), outcomes.count(REFUTED)
    if held == len(outcomes):
        return SUPPORTED
    if refuted and held:
        return PARTLY
    if refuted:
        return NOT_SUPPORTED
    return INCONCLUSIVE


def combine_with_premise(outcomes: Sequence[str]) -> str:
    """For a claim "A, and that is why B" whose first part tests A: as :func:`combine`, except that A refuted
    makes the claim **not supported** whatever the other parts say (without A there is nothing for them to
    explain). Missing data still gives **no verdict**."""
    verdict = combine(outcomes)
    if verdict != NO_VERDICT and outcomes[0] == REFUTED:
        return NOT_SUPPORTED
    return verdict


def agrees(verdict: str, expected: str) -> Optional[bool]:
    """Whether our verdict agrees with the literature's (``None``: we reached no conclusion)."""
    if expected not in VERDICTS[:3]:
        raise ValueError(f"the literature's verdict must be one of {VERDICTS[:3]} (got {expected!r})")
    if verdict in (INCONCLUSIVE, NO_VERDICT):
        return None
    return verdict == expected


@dataclass
class Verdict:
    """A claim's answer: the verdict, its parts, its key number and a paragraph explaining it."""

    verdict: str
    key_number: str
    key_interval: Interval
    explanation: str
    parts: list[Part] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS} (got {self.verdict!r})")

    @classmethod
    def from_parts(cls, parts: Sequence[Part], key_number: str, explanation: str,
                   key: int = 0, rule=None) -> "Verdict":
        """The verdict ``rule`` (default :func:`combine`) gives ``parts``; the key interval is that of
        ``parts[key]``."""
        parts = list(parts)
        outcomes = [p.outcome for p in parts]
        return cls((rule or combine)(outcomes), key_number, parts[key].effect.interval, explanation, parts)


@dataclass
class ClaimResult:
    """What a claim module's ``render`` returns (from its findings) and the report writes out.

    The report's layout reads: ``answer``, one plain sentence from the measured numbers in plain units
    (the first screen and the top of the claim's section); ``paragraphs``, short paragraphs (≤ 80 words
    each) shown in the section after its first figure and the evidence table; ``details``, blocks folded
    under a ``<details>`` summary (``{"title", "paragraphs"}``); and a table with ``"details": True`` is
    folded too. A claim that sets no ``paragraphs`` has its ``verdict.explanation`` folded instead.
    ``differences`` are what this run measured that sets its setting apart from the papers' (a network
    that fails to fit, an effect that needs depth, a rate at the grid's end): where the verdict disagrees
    with the literature's, the section shows them right after the literature.
    """

    number: int
    title: str
    verdict: Verdict
    literature: str
    rule: str
    expected: str = SUPPORTED                           # the literature's verdict (declared in the claim module)
    caveats: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)    # {"title", "columns", "rows"}
    figures: list[dict] = field(default_factory=list)   # {"title", "name", "figure" (matplotlib), "caption"}
    finding: str = ""                                   # the literature's finding in one line (summary table)
    numbers: dict = field(default_factory=dict)         # raw numbers, saved as JSON beside the report
    error: Optional[str] = None                         # why the analysis failed, if it did
    failed_runs: int = 0                                # runs of this claim that failed (no verdict if > 0)
    scope: dict = field(default_factory=dict)           # the setting and look it was judged at (bnlab.study.scope)
    across: list[dict] = field(default_factory=list)    # one summary per setting, when the profile names several
    robust: dict = field(default_factory=dict)          # {"answer", "text"}: the verdict across the settings
    answer: str = ""                                    # one plain sentence: what was found, in plain units
    paragraphs: list[str] = field(default_factory=list)  # short prose shown in the section (≤ 80 words each)
    details: list[dict] = field(default_factory=list)   # {"title", "paragraphs"}: folded under <details>
    differences: list[str] = field(default_factory=list)  # measured differences of setting from the papers',
    #                                                       shown where the verdict disagrees with theirs

    @property
    def agrees_with_literature(self) -> Optional[bool]:
        return agrees(self.verdict.verdict, self.expected)
