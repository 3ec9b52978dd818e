"""Where and on how many seeds each claim is judged: the profile's settings and the current look.

A profile may name several **settings** (``settings: [{"dataset": …, "depth": …}, …]``): every claim is
measured and judged in each, as if the profile had that dataset and depth (:func:`settings` gives each
setting's profile). Runs two settings share (a claim that sets its own depths, say) are one run. The
report gives a verdict per setting and a **robust answer** per claim (:func:`robust`): the same verdict in
every setting is that verdict; otherwise the answer is "depends on the setting", naming where each
verdict was reached.

Within a setting a claim is judged at its current **look** (:mod:`bnlab.study.sequential`): with
``looks: [n₁, …, n_K]`` it first runs the first n₁ seeds; once those runs have finished, a claim with an
undecided part runs the seeds up to n₂, and so on up to the last look. A claim whose parts are all decided
(or have no data) stops there. Every interval is computed at its look's level (``look_alphas``), which keeps
a false decision under 5% whatever the stopping. Without ``looks`` there is one look: every seed at 95%.
A claim's section may set looks of its own (:func:`design`); a claim may also let its parts stop separately
(claim 3: :func:`bnlab.study.sequential.part_look`), each part then one sequence of looks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from types import ModuleType
from typing import Optional, Sequence

from bnlab.study.claims import CLAIMS
from bnlab.study.common import all_finished, dataset_label, narrowed
from bnlab.study.profiles import with_dataset
from bnlab.study.sequential import Design, of_profile
from bnlab.study.specs import unique_specs
from bnlab.study.verdict import UNDECIDED, at_confidence

__all__ = ["Setting", "Look", "settings", "design", "at_look", "collect", "robust", "DEPENDS"]

DEPENDS = "depends on the setting"


@dataclass(frozen=True)
class Setting:
    """One setting: its label in the report, its dataset and depth, and the profile narrowed to it."""

    label: str
    dataset: str
    depth: int
    profile: dict


@dataclass(frozen=True)
class Look:
    """A claim's current look in one setting: the profile with that look's seeds, and the look's level."""

    profile: dict
    index: int          # 0-based
    count: int          # how many looks the design has
    level: float        # two-sided confidence level of its intervals

    @property
    def seeds(self) -> list:
        return self.profile["seeds"]


def settings(profile: dict) -> list[Setting]:
    """The settings ``profile`` judges every claim in, in its order (one: its own dataset and depth)."""
    wanted = profile.get("settings") or [{}]
    out = []
    for item in wanted:
        dataset = item.get("dataset") or profile["dataset"]
        depth = item.get("depth") or profile["depth"]
        narrowed = with_dataset(profile, dataset) if dataset != profile["dataset"] else copy.deepcopy(profile)
        narrowed["depth"] = depth
        narrowed["settings"] = []
        out.append(Setting(f"{dataset_label(narrowed)}, ResNet-{depth}", dataset, depth, narrowed))
    return out


def design(profile: dict, claim: Optional[ModuleType] = None) -> Design:
    """The sequential design ``claim`` is judged under: its section's own ``looks`` if it sets them, else the
    profile's (one look at every seed when neither does)."""
    return of_profile(profile, getattr(claim, "SLUG", None))


def at_look(claim: ModuleType, profile: dict, results: Optional[dict]) -> Look:
    """The look ``claim`` has reached in ``profile`` (one setting's profile) given ``results``: the first
    look whose runs have not all finished, or whose decision leaves no part undecided, or the last."""
    plan = design(profile, claim)
    for index, (count, alpha) in enumerate(zip(plan.looks, plan.alphas)):
        look = Look(narrowed(profile, count), index, len(plan.looks), 1.0 - alpha)
        if index == len(plan.looks) - 1 or not results:
            return look
        with at_confidence(look.level):
            if not all_finished(results, claim.measure(look.profile, results)):
                return look
            findings = claim.decide(look.profile, results)
        if not any(p.outcome == UNDECIDED for p in findings.parts):
            return look
    raise AssertionError("unreachable: the last look returns")


def collect(profile: dict, numbers: Sequence[int], results: Optional[dict] = None) -> dict[str, dict]:
    """Key → spec of every run the chosen claims declare, in every setting, at each claim's current look;
    shared runs appear once. The runner calls it after each round until nothing is new."""
    specs = []
    for setting in settings(profile):
        for n in numbers:
            look = at_look(CLAIMS[n], setting.profile, results)
            with at_confidence(look.level):
                specs += CLAIMS[n].measure(look.profile, results)
    return unique_specs(specs)


def robust(verdicts: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """``(answer, text)`` across settings from ``[(setting label, verdict), …]``: the common verdict, or
    :data:`DEPENDS` with each verdict and where it was reached."""
    distinct = list(dict.fromkeys(v for _, v in verdicts))
    if len(distinct) == 1:
        where = "the one setting" if len(verdicts) == 1 else f"all {len(verdicts)} settings"
        return distinct[0], f"{distinct[0]} in {where}"
    text = "; ".join(f"{v} in {', '.join(label for label, w in verdicts if w == v)}" for v in distinct)
    return DEPENDS, text
