"""Claim 6, a toy for the tests: "BN's network validates better after a few steps than the unnormalized one".

``test_claims.py`` copies this file into a copy of the package as ``bnlab/study/claim_toy.py`` and adds its
one line to ``bnlab.study.claims.MODULES``; nothing else changes. It declares everything a claim module
provides (see :mod:`bnlab.study.claims`) and imports only the pieces claims share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from bnlab.study import style
from bnlab.study.common import ci, final_pct, fmt_ci, lookup, paper_table, train_spec
from bnlab.study.verdict import SUPPORTED, ClaimResult, Interval, Part, Rule, Verdict, paired_effect

NUMBER = 6
SLUG = "toy"
TITLE = "BN validates better after a few steps"
LITERATURE = "None: a toy claim that exercises the study's pipeline."
FINDING = "a toy (supported)"
EXPECTED = SUPPORTED
RULES = [Rule("higher validation accuracy", "validation accuracy with BN − without", threshold=1.0, margin=0.5,
              unit="points", bounds=(-100.0, 100.0))]
RULE = f"Part 1, {RULES[0].text()}."
PAPER = [{"quantity": "validation accuracy with BN − without (points)", "paper": "none", "value": "—",
          "setting": "a toy", "ours_key": "gain"}]


class Config(BaseModel):
    """The ``toy`` section."""

    model_config = ConfigDict(extra="forbid")
    lr: PositiveFloat
    steps: PositiveInt = Field(description="optimizer steps per run")


PRESETS = {size: {"lr": 0.1, "steps": 4} for size in ("tiny", "quick", "standard", "full")}
TUNED_ON_SEEDS = False
LATER_ROUNDS = None
PROFILE_CHECKS = ()
DATASET_FIELDS = ()
ARMS = ("bn", "none")


def _spec(profile: dict, norm: str, seed: int) -> dict:
    cfg = profile[SLUG]
    return train_spec(profile, norm=norm, lr=cfg["lr"], batch_size=32, seed=seed, max_steps=cfg["steps"],
                      eval_every=0)


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    return [_spec(profile, norm, seed) for norm in ARMS for seed in profile["seeds"]]


@dataclass
class Findings:
    parts: list[Part]
    val: dict[str, dict]         # arm → seed → validation accuracy %
    val_ci: dict[str, Interval]  # arm → over seeds


def decide(profile: dict, results: dict) -> Findings:
    val = {a: {s: final_pct(lookup(results, _spec(profile, a, s))) for s in profile["seeds"]} for a in ARMS}
    gain = paired_effect(val["bn"], val["none"], "points", RULES[0].bounds)
    return Findings([Part(RULES[0], gain)], val, {a: ci(v.values(), (0, 100)) for a, v in val.items()})


def render(profile: dict, findings: Findings) -> ClaimResult:
    part = findings.parts[0]
    fig, axes = style.figure()
    axes[0].bar(list(ARMS), [findings.val_ci[a].mean for a in ARMS], color=[style.arm_color(a) for a in ARMS])
    return ClaimResult(
        NUMBER, TITLE, Verdict.from_parts(findings.parts, f"gain {part.effect.interval.text(1)}", f"{part.text(1)}."),
        LITERATURE, RULE, expected=EXPECTED, finding=FINDING,
        tables=[{"title": "Validation accuracy per arm", "columns": ["arm", "validation acc %"],
                 "rows": [[a, fmt_ci(findings.val_ci[a], 1)] for a in ARMS]},
                paper_table(PAPER, {"gain": (part.effect.interval.text(1), f"{profile[SLUG]['steps']} steps")})],
        figures=[{"name": "claim6_toy", "title": "Validation accuracy per arm", "figure": fig,
                  "caption": "Mean over seeds."}],
        numbers={"parts": [p.to_dict() for p in findings.parts]})
