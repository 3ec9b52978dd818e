"""Plain answers: a claim's decided parts as one sentence, in plain units.

Every claim module ends with ``answer(findings) -> str``, which its ``render`` puts in
:attr:`~bnlab.study.verdict.ClaimResult.answer`: the first screen of the report shows the five answers.
They are built here from the parts, so that every answer reads alike:

* a part that **holds** says what was measured, in plain units: "about 4×" for a log10 ratio (unit
  ``decades``), "about 37 points" for accuracy, the number itself otherwise;
* a **refuted** part says the effect was absent (or reversed), with the measured value;
* an **undecided** part says "we could not tell whether …" with the value so far and roughly how many more
  seeds would decide it at the observed spread (:func:`bnlab.study.verdict.seeds_to_decide`);
* a part with **no data** says too few seeds finished.

A claim gives one :class:`Phrase` per part; :func:`sentence` joins the clauses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from bnlab.study.verdict import HOLDS, MIN_SEEDS, NO_DATA, REFUTED, SEEDS_LIMIT, UNDECIDED, Part, seeds_to_decide

__all__ = ["Phrase", "factor", "magnitude", "signed", "more_seeds", "clause", "sentence", "generic"]


@dataclass(frozen=True)
class Phrase:
    """How one part is said. ``{x}`` is the effect's size in plain units ("about 4×", "about 37 points"),
    ``{s}`` its signed value; ``question`` completes "we could not tell whether …"."""

    holds: str        # "BN reached the target accuracy in {x} fewer steps"
    refuted: str      # "BN did not reach the target in clearly fewer steps ({s})"
    question: str     # "BN reaches the target accuracy in fewer steps"
    reversed: str = ""  # the whole interval on the other side: "BN needed {x} more steps" (unset: ``refuted``)
    undecided: str = ""  # the whole clause of an undecided part, when the generic one would mislead (unset: generic)


def _round_factor(value: float) -> str:
    if value < 1.95:
        return f"{value:.1f}"
    if value < 100:
        return f"{value:.0f}"
    return f"{float(f'{value:.2g}'):,.0f}"


def factor(decades: float) -> str:
    """A log10 ratio as a plain factor of its size: 0.62 → "4×", −0.62 → "4×" (the phrase gives the
    direction), 1.43 → "27×"."""
    if not math.isfinite(decades):
        return "n/a"
    return _round_factor(10 ** abs(decades)) + "×"


def _points(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 9.95 else f"{value:.1f}"


def magnitude(part: Part) -> str:
    """The size of the part's mean effect in plain units, without its sign: "about 4×", "about 37 points",
    "0.25"."""
    mean, unit = part.effect.interval.mean, part.rule.unit
    if not math.isfinite(mean):
        return "n/a"
    if unit == "decades":
        return f"about {factor(mean)}"
    if unit == "points":
        return f"about {_points(abs(mean))} points"
    return f"{abs(mean):.2g}"


def signed(part: Part) -> str:
    """The part's mean effect with its sign, in plain units: "about 4×", "about 0.5×", "−1.8 points"."""
    mean, unit = part.effect.interval.mean, part.rule.unit
    if not math.isfinite(mean):
        return "n/a"
    if unit == "decades":
        value = 10 ** mean
        return f"about {_round_factor(value) if value >= 1 else f'{value:.2g}'}×"
    text = f"{_points(mean)} points" if unit == "points" else f"{mean:.2g}"
    return text.replace("-", "−")


def more_seeds(part: Part) -> Optional[int]:
    """How many seeds beyond those measured would decide an undecided part at its observed spread (``None``:
    its mean lies between margin and threshold, where more seeds would not decide it, or so near one of them
    that more than :data:`~bnlab.study.verdict.SEEDS_LIMIT` would be needed)."""
    total = seeds_to_decide(part.rule, part.effect, level=part.level)
    return None if total is None else max(1, total - part.effect.n)


def _why_undecided(part: Part) -> str:
    """What more seeds would do for an undecided part, in words."""
    why, _ = part.undecided_reason()
    if why == "seeds":
        n = more_seeds(part)
        return f"about {n} more seed{'s' if n != 1 else ''} would decide it"
    if why == "between":
        return "more seeds would not decide it, as it lies between its margin and its threshold"
    if why == "unknown":
        return "its spread is unknown"
    edge = "threshold" if part.effect.interval.mean > part.rule.threshold else "margin"
    return f"it lies so near its {edge} that more than {SEEDS_LIMIT:,} seeds would be needed"


def clause(part: Part, phrase: Phrase) -> str:
    """The part as a clause of the answer, by its outcome."""
    x, s = magnitude(part), signed(part)
    if part.outcome == HOLDS:
        return phrase.holds.format(x=x, s=s)
    if part.outcome == REFUTED:
        return (phrase.reversed if part.reversed and phrase.reversed else phrase.refuted).format(x=x, s=s)
    if part.outcome == UNDECIDED:
        if phrase.undecided:
            return phrase.undecided.format(x=x, s=s)
        return f"we could not tell whether {phrase.question} ({s} so far; {_why_undecided(part)})"
    return f"too few seeds finished to tell whether {phrase.question}"


def sentence(parts: Sequence[Part], phrases: Sequence[Phrase]) -> str:
    """One sentence from every part: clauses of the same outcome joined by "and" (two undecided ones: "we
    could not tell whether A, or whether B"), of different ones by "but"; parts without data said once."""
    if not parts:
        return ""
    if all(p.outcome == NO_DATA for p in parts):
        questions = [ph.question for ph in phrases[:len(parts)]]
        finished = min(p.effect.n for p in parts)
        return _capital(f"too few seeds finished ({finished}; at least {MIN_SEEDS} are needed) to tell whether "
                        + ", or whether ".join(questions)) + "."
    clauses = [clause(p, ph) for p, ph in zip(parts, phrases)]
    text = clauses[0]
    for previous, part, words in zip(parts, parts[1:], clauses[1:]):
        if part.outcome == previous.outcome == UNDECIDED:  # "we could not tell whether A (…), or whether B (…)"
            text += ", or" + words[len("we could not tell"):]
        else:
            text += (", and " if part.outcome == previous.outcome else ", but ") + words
    return _capital(text) + "."


def generic(parts: Sequence[Part]) -> str:
    """An answer for a claim that writes none: each part by its rule's name."""
    phrases = [Phrase(holds=f"{p.rule.name}: yes ({{s}})", refuted=f"{p.rule.name}: no ({{s}})",
                      question=f"“{p.rule.name}” holds") for p in parts]
    return sentence(parts, phrases)


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
