r"""Seeds added while a part is undecided, with an error rate that survives the looking.

A part of a claim is decided from the 95% t-interval of a paired per-seed effect: it **holds** when the
interval lies above the rule's threshold and is **refuted** when it lies below the margin
(:mod:`bnlab.study.verdict`). Looking at the interval, and running more seeds only while it is undecided,
is *optional stopping*: recomputing a 95% interval after each new block of seeds gives each look its own
2.5% chance of a false "holds" (and of a false "refuted"), and those chances add up.

This module's design is **group-sequential with a fixed error budget split over the looks**: a
:class:`Design` names the cumulative seed counts at which a claim may be looked at, ``looks = (n₁, …, n_K)``,
and the two-sided error spent at each, ``alphas = (α₁, …, α_K)`` with ``Σ α_k ≤ 0.05``. At look k the part
is judged on the ``1 − α_k`` t-interval of the seeds run so far; a claim with an undecided part runs the
next block of seeds, up to the last look. By the union bound, whatever the stopping rule and whatever
the correlation between looks,

.. math::
    P(\text{a false "holds" at any look}) \le \textstyle\sum_k \alpha_k / 2 \le 2.5\%,

and the same for a false "refuted" — at most 5% of studies reach a false decision, the error of one
fixed-size 95% interval. (A Bonferroni split is conservative: Pocock's or O'Brien–Fleming's boundaries spend
the budget more efficiently for normal data with known variance, but their small-sample t versions are
only approximately valid; this split needs no approximation, and :func:`simulate` measures its actual
rates.) A one-look design ``Design((n,), (0.05,))`` is the plain 95% interval.

:func:`simulate` draws many studies of one part with a chosen true effect and spread, runs the design
with optional stopping, and returns how often the part ends holding, refuted or undecided, and the mean
number of seeds used; :func:`false_decision_rate` takes the worst case over true effects between the margin
and the threshold (where any decision is wrong in one direction) and beyond.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import stats

__all__ = ["Design", "single", "repeated_95", "t_interval_at", "simulate", "false_decision_rate", "power",
           "TOTAL_ALPHA", "checked", "of_profile", "part_look", "every_look"]

TOTAL_ALPHA = 0.05   # the two-sided error of one fixed-size 95% interval: the budget the looks share


@dataclass(frozen=True)
class Design:
    """Looks at ``looks[k]`` seeds (cumulative, increasing), each judged at two-sided level ``alphas[k]``."""

    looks: tuple[int, ...]
    alphas: tuple[float, ...]

    def __post_init__(self) -> None:
        looks, alphas = tuple(self.looks), tuple(self.alphas)
        if not looks or len(looks) != len(alphas):
            raise ValueError(f"sequential design: need one alpha per look (got looks {looks}, alphas {alphas})")
        if any(n < 1 for n in looks) or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"sequential design: looks must be increasing positive seed counts (got {looks})")
        if any(not 0 < a < 1 for a in alphas):
            raise ValueError(f"sequential design: every alpha must lie in (0, 1) (got {alphas})")
        if sum(alphas) > TOTAL_ALPHA + 1e-12:
            raise ValueError(f"sequential design: the alphas spend {sum(alphas):g}, more than the {TOTAL_ALPHA} "
                             f"budget of one 95% interval (got {alphas})")
        object.__setattr__(self, "looks", looks)
        object.__setattr__(self, "alphas", alphas)

    @property
    def max_seeds(self) -> int:
        return self.looks[-1]

    def look(self, seeds_run: int) -> int:
        """The index of the last look reached with ``seeds_run`` seeds run (0 before the second look)."""
        reached = [k for k, n in enumerate(self.looks) if n <= seeds_run]
        return reached[-1] if reached else 0

    def confidence(self, seeds_run: int) -> float:
        """The interval's confidence level at the look ``seeds_run`` seeds reach."""
        return 1.0 - self.alphas[self.look(seeds_run)]

    def next_seeds(self, seeds_run: int) -> int:
        """The seed count of the next look, or ``seeds_run`` when the last one is reached."""
        later = [n for n in self.looks if n > seeds_run]
        return later[0] if later else seeds_run

    def reached(self, seeds_run: int) -> list[tuple[int, float]]:
        """(seeds, two-sided alpha) of every look reached with ``seeds_run`` seeds run, in order; a count
        below the first look stands for itself at the first look's alpha."""
        out = [(n, a) for n, a in zip(self.looks, self.alphas) if n <= seeds_run]
        return out or [(seeds_run, self.alphas[0])]

    def text(self) -> str:
        if len(self.looks) == 1:
            return f"one look at {self.looks[0]} seeds, {100 * (1 - self.alphas[0]):g}% intervals"
        parts = ", ".join(f"{n} seeds at {100 * (1 - a):g}%" for n, a in zip(self.looks, self.alphas))
        return f"{len(self.looks)} looks ({parts}); more seeds only while a part is undecided"


@dataclass(frozen=True)
class _Repeated:
    """Looks that each recompute a 95% interval — the invalid design :func:`repeated_95` stands for."""

    looks: tuple[int, ...]
    alphas: tuple[float, ...]

    @property
    def max_seeds(self) -> int:
        return self.looks[-1]


def repeated_95(looks: Sequence[int]) -> _Repeated:
    """The naive design — a fresh 95% interval at every look — for comparison in simulations only: its
    false-decision rate grows with the number of looks, which is what :class:`Design` avoids."""
    return _Repeated(tuple(looks), (TOTAL_ALPHA,) * len(looks))


def single(seeds: int) -> Design:
    """The fixed-size design: one look at ``seeds`` seeds with the 95% interval."""
    return Design((seeds,), (TOTAL_ALPHA,))


def checked(looks: Optional[Sequence[int]], alphas: Optional[Sequence[float]]) -> Optional[Design]:
    """The design ``looks``/``look_alphas`` give (``None`` when both are unset); a ``ValueError`` naming what is
    wrong when only one is set or the pair is no valid :class:`Design` (what the profile schema reports)."""
    if (looks is None) != (alphas is None):
        raise ValueError("looks and look_alphas go together: give both or neither")
    return None if looks is None else Design(tuple(looks), tuple(alphas))


def of_profile(profile: dict, section: Optional[str] = None) -> Design:
    """The design a claim is judged under: its own section's ``looks``/``look_alphas`` when ``section`` names a
    profile section that sets them, else the profile's, else one look at every seed (the plain 95% interval)."""
    own = (profile.get(section) or {}) if section else {}
    for where in (own, profile):
        if where.get("looks"):
            return Design(tuple(where["looks"]), tuple(where["look_alphas"]))
    return single(len(profile["seeds"]))


_EVERY_LOOK = contextvars.ContextVar("bnlab_every_look", default=False)


@contextlib.contextmanager
def every_look():
    """Inside the block no part stops at an earlier look (:func:`part_look` gives the current one): what a
    plan counting the most runs every look may ask for needs."""
    token = _EVERY_LOOK.set(True)
    try:
        yield
    finally:
        _EVERY_LOOK.reset(token)


def part_look(plan: Design, seeds_run: int, judge: Callable[[int, float], Optional[bool]]) -> tuple[int, float]:
    """``(seeds, confidence level)`` one part of a claim is judged at, when parts stop separately: the first
    look reached (:meth:`Design.reached`) at which ``judge(seeds, level)`` says the part is decided (``True``)
    or its runs have not all finished (``None``); else the last look reached. A part decided at a look keeps
    that decision at later looks, and only the parts still undecided run more seeds — each part is one
    sequence of looks under the design's error split, so the union bound holds for it as for a whole claim."""
    reached = plan.reached(seeds_run)
    if _EVERY_LOOK.get():
        n, alpha = reached[-1]
        return n, 1.0 - alpha
    for n, alpha in reached:
        verdict = judge(n, 1.0 - alpha)
        if verdict is None or verdict:
            return n, 1.0 - alpha
    n, alpha = reached[-1]
    return n, 1.0 - alpha


def t_interval_at(values: Sequence[float], confidence: float) -> tuple[float, float, float]:
    """(mean, low, high) of the two-sided Student-t interval of ``values`` at ``confidence``."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean())
    if x.size < 2:
        return mean, mean, mean
    half = float(stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


_NOISE = {
    "normal": lambda rng, shape: rng.standard_normal(shape),
    # heavy tails (Student t with 3 degrees of freedom, scaled to unit variance)
    "t3": lambda rng, shape: rng.standard_t(3, shape) / math.sqrt(3.0),
    # skewed (a centred, unit-variance exponential): per-seed effects with occasional large values
    "skewed": lambda rng, shape: rng.exponential(1.0, shape) - 1.0,
}


def simulate(design, threshold: float, margin: float, effect: float, sd: float = 1.0,
             noise: str = "normal", studies: int = 20_000, seed: int = 0, stop_early: bool = True) -> dict:
    """Run ``studies`` simulated studies of one part under ``design``.

    Each seed's effect is ``effect + sd·ε`` with ε drawn from ``noise`` (``"normal"``, ``"t3"``,
    ``"skewed"``; unit variance). At each look the part is judged on that look's interval; with
    ``stop_early`` a study stops at the first look that decides it (the study's rule), otherwise it is
    judged at every look with no stopping. Returns the fractions ``holds``, ``refuted``, ``undecided`` and
    ``mean_seeds``.
    """
    if noise not in _NOISE:
        raise ValueError(f"simulate: noise must be one of {sorted(_NOISE)} (got {noise!r})")
    rng = np.random.default_rng(seed)
    values = effect + sd * _NOISE[noise](rng, (studies, design.max_seeds))
    outcome = np.zeros(studies, dtype=np.int8)          # 0 undecided, 1 holds, −1 refuted
    seeds_used = np.full(studies, design.looks[-1], dtype=np.int64)
    open_ = np.ones(studies, dtype=bool)
    for n, alpha in zip(design.looks, design.alphas):
        x = values[:, :n]
        mean, spread = x.mean(axis=1), x.std(axis=1, ddof=1)
        half = float(stats.t.ppf(1 - alpha / 2, df=n - 1)) * spread / math.sqrt(n)
        holds, refuted = mean - half > threshold, mean + half < margin
        decided = open_ & (holds | refuted)
        outcome[decided & holds] = 1
        outcome[decided & refuted] = -1
        seeds_used[decided] = n
        if stop_early:
            open_ &= ~decided
    return {"holds": float(np.mean(outcome == 1)), "refuted": float(np.mean(outcome == -1)),
            "undecided": float(np.mean(outcome == 0)), "mean_seeds": float(seeds_used.mean())}


def false_decision_rate(design, threshold: float, margin: float, sd: float = 1.0, noise: str = "normal",
                        studies: int = 20_000, seed: int = 0, points: int = 5) -> dict:
    """The worst false-decision rates of ``design`` for a rule (threshold, margin) over true effects.

    A "holds" is false when the true effect is at most the threshold; a "refuted" is false when it is at
    least the margin; for a true effect between the two, both are false. ``points`` true effects from the
    margin to the threshold are tried (the worst cases sit at the two ends), each with its own random draws.
    Returns ``false_holds`` and ``false_refuted`` (the maxima over those effects), ``false_decision`` (the
    largest rate of either false decision for one true effect: holds + refuted) and the rows.
    """
    effects = np.linspace(margin, threshold, points) if threshold > margin else np.array([threshold])
    rows = []
    for i, effect in enumerate(effects):
        r = simulate(design, threshold, margin, float(effect), sd, noise, studies, seed + i)
        rows.append({"effect": float(effect), **r})
    false_holds = max(r["holds"] for r in rows)           # every effect here is ≤ threshold
    false_refuted = max(r["refuted"] for r in rows)       # every effect here is ≥ margin
    false_decision = max(r["holds"] + r["refuted"] for r in rows)
    return {"false_holds": false_holds, "false_refuted": false_refuted, "false_decision": false_decision,
            "rows": rows}


def power(design, threshold: float, margin: float, effect: float, sd: float, studies: int = 20_000,
          seed: int = 0) -> dict:
    """How often ``design`` reaches the right decision for a true ``effect`` with per-seed spread ``sd``
    (``holds`` when the effect exceeds the threshold, ``refuted`` when it lies below the margin; between the
    two no decision is right, and ``power`` is how often it stays undecided), with the mean seeds used —
    the calculation that sizes a profile's seeds."""
    r = simulate(design, threshold, margin, effect, sd, studies=studies, seed=seed)
    right = r["holds"] if effect > threshold else r["refuted"] if effect < margin else r["undecided"]
    return {"power": right, **r}
