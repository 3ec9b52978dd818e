"""Claim 4: "BN allows higher learning rates, and hence better models."

The learning-rate sweep of :mod:`bnlab.study.sweep`: a log-spaced grid × {BN, none, SkipInit, Fixup} ×
batch sizes × seeds (one-cycle schedule: 20% linear warm-up, then linear decay), the grid *extended*
upwards while an arm is stable at its top, up to ``max_extensions`` extra rates, so that each arm's
largest stable rate is interior; an arm still stable at the top is reported as censored. A run is
stable when it did not diverge, ended at ≤ half its initial training loss and reached validation
accuracy ≥ chance + 10 points (:func:`bnlab.study.metrics.is_stable`). The "better models" half compares
the test accuracy of each arm at the rate its *validation* accuracy chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from bnlab.study import answers, style, sweep
from bnlab.study.common import (DIFF_BOUNDS, Band, LaterRounds, arm_label, by_seed, ci, dataset_label, fmt, fmt_ci,
                                paper_table)
from bnlab.study.verdict import (HOLDS, NO_DATA, SUPPORTED, UNDECIDED, ClaimResult, Interval, Part, Rule, Verdict,
                                 paired_effect)

NUMBER = 4
SLUG = sweep.SECTION  # this claim's section holds the sweep's settings, which claims 2 and 5 read too
TITLE = "BN allows higher learning rates, and hence better models"
LITERATURE = ("Bjorck et al. 2018 (https://arxiv.org/abs/1806.02375): ResNet-110 on CIFAR-10 trains at lr 0.1 "
              "with BN (≈93%); without BN only ≈1e-4 was stable (≈81%). Both halves held there.")
FINDING = "Bjorck et al. 2018: lr 0.1 with BN vs ≈1e-4 without; 93% vs 81% (both halves supported)"
EXPECTED = SUPPORTED
RULES = [
    Rule("higher learning rates", "log10(largest stable lr with BN) − log10(largest stable lr without), "
         "mean over batch sizes", threshold=0.4, margin=0.15, unit="decades"),
    Rule("better models", "test accuracy with BN − without, each at the rate its validation accuracy chose",
         threshold=1.0, margin=0.5, unit="points", bounds=DIFF_BOUNDS),
]
RULE = ("Stable = not diverged, final training loss ≤ 0.5 × initial, and validation accuracy ≥ chance + 10 "
        "points. " + " ".join(f"Part {i + 1}, {r.text()}." for i, r in enumerate(RULES))
        + " A part whose largest stable rate is censored (stable at the top of the extended grid, or nothing "
          "stable) is undecided unless the censoring can only make the effect larger.")

ARMS = ("bn", "none", "skipinit", "fixup")
BJORCK = "Bjorck et al. 2018"
BJORCK_SETTING = ("ResNet-110 on CIFAR-10, batch 128, step-decayed rate, data augmentation, trained to convergence")
PAPER = [
    {"quantity": "test accuracy % with BN, at its rate", "paper": BJORCK, "value": "≈ 93 at lr 0.1",
     "setting": BJORCK_SETTING, "ours_key": "bn"},
    {"quantity": "test accuracy % without normalization, at its best rate", "paper": BJORCK,
     "value": "≈ 81 at lr 1e-4", "setting": BJORCK_SETTING, "ours_key": "none"},
    {"quantity": "log10(rate with BN / rate without), decades", "paper": BJORCK, "value": "3 (0.1 vs 1e-4)",
     "setting": BJORCK_SETTING + "; their rates are each arm's best, ours the largest stable ones",
     "ours_key": "decades"},
]


class Config(BaseModel):
    """The ``lr`` section of a profile (claims 2, 4 and 5 share this sweep)."""

    model_config = ConfigDict(extra="forbid")
    arms: list[Literal["bn", "none", "skipinit", "fixup"]] = Field(min_length=2)
    lrs: list[PositiveFloat] = Field(min_length=3)
    batch_sizes: list[PositiveInt] = Field(min_length=1)
    epochs: Optional[PositiveInt] = None
    max_steps: Optional[PositiveInt] = None
    max_extensions: int = Field(2, ge=0, le=6)
    weight_decay: NonNegativeFloat = 0.0
    momentum: float = Field(0.9, ge=0.0, lt=1.0)

    @field_validator("arms")
    @classmethod
    def _bn_and_none(cls, arms):
        if "bn" not in arms or "none" not in arms:
            raise ValueError(f"must include 'bn' and 'none' (got {arms})")
        if len(set(arms)) != len(arms):
            raise ValueError(f"arms repeat (got {arms})")
        return arms

    @field_validator("lrs")
    @classmethod
    def _increasing(cls, lrs):
        if any(b <= a for a, b in zip(lrs, lrs[1:])):
            raise ValueError(f"learning rates must be strictly increasing (got {lrs})")
        return lrs


PRESETS = {
    "tiny": {"arms": list(ARMS), "lrs": [0.01, 0.1, 1.0], "batch_sizes": [32], "max_steps": 6, "max_extensions": 1},
    # quick: the verdict's arms only (the budget); standard and full also sweep SkipInit and Fixup
    # 3 epochs: in 2, no rate let the unnormalized net halve its training loss (stable nowhere, a trial run)
    "quick": {"arms": ["bn", "none"], "lrs": [0.03, 0.1, 0.3, 1.0, 3.0], "batch_sizes": [64], "epochs": 3,
              "max_extensions": 2},
    # Bjorck et al.'s comparison: rates from 1e-5 (no BN's ≈1e-4 is interior) to 3 (BN's 0.1 is interior),
    # batch 128, He et al.'s weight decay 1e-4 and momentum 0.9
    "full": {"arms": list(ARMS), "lrs": [1e-5, 3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
             "batch_sizes": [128], "epochs": 20, "max_extensions": 1, "weight_decay": 1e-4, "momentum": 0.9},
}
# standard judges every claim in four settings (two datasets × two depths) at quick's budget per setting
PRESETS["standard"] = dict(PRESETS["quick"])

# what the registry, the plan and the profiles read (see bnlab.study.claims)
TUNED_ON_SEEDS = False  # every seed runs every rate of the grid
LATER_ROUNDS = LaterRounds(
    "grid extensions while an arm is stable at the top; bounded by lr.max_extensions",
    lambda profile: sweep.extension_runs(profile, sweep.settings(profile)["batch_sizes"]),
    none=" (its extensions at the first batch size are counted with claim 2).")
PROFILE_CHECKS = ()
DATASET_FIELDS = ()


# ------------------------------------------------------------------------------------------------ measure

def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    """The sweep: every arm, batch size and seed over the grid, extended while an arm is stable at its top."""
    cfg = sweep.settings(profile)
    return [sweep.spec(profile, norm, lr, b, seed) for b in cfg["batch_sizes"] for norm in cfg["arms"]
            for lr in sweep.grid(profile, results, b, norm)[0] for seed in profile["seeds"]]


# ------------------------------------------------------------------------------------------------ decide

@dataclass
class ArmSweep:
    """One arm's sweep at one batch size, with the intervals the report shows."""

    table: sweep.Table
    val: Interval            # validation accuracy % at the validated rate, over seeds
    test: Interval           # test accuracy % at the validated rate
    by_lr: Band              # validation accuracy % with its 95% CI at each rate of the final grid
    stable_pct: list[float]  # % of seeds stable at each rate of the final grid


@dataclass
class Findings:
    """Everything claim 4's report shows."""

    parts: list[Part]                         # higher learning rates, better models
    arms: dict[tuple[int, str], ArmSweep]     # (batch size, arm) → its sweep, in the profile's order
    censoring: list[str]                      # "bn:above", "none:below", …: censored limits of BN and none


def _log_limit(table: sweep.Table, i: int) -> float:
    """log10 of seed i's largest stable lr; "nothing stable" counts one grid step below the grid."""
    lrs = table.lrs
    if table.censored[i] == "below":
        return math.log10(lrs[0] * lrs[0] / lrs[1])
    return math.log10(table.max_stable_lr[i]) if math.isfinite(table.max_stable_lr[i]) else math.nan


def _arm(table: sweep.Table) -> ArmSweep:
    return ArmSweep(table, ci(table.best_val, (0, 100)), ci(table.best_test, (0, 100)),
                    Band.of(table.lrs, [ci(table.val[lr], (0, 100)) for lr in table.lrs]),
                    [100 * np.mean(table.stable[lr]) for lr in table.lrs])


def decide(profile: dict, results: dict) -> Findings:
    cfg, seeds = sweep.settings(profile), profile["seeds"]
    tables = {(b, a): sweep.table(profile, results, b, a) for b in cfg["batch_sizes"] for a in cfg["arms"]}
    decades = {s: float(np.mean([_log_limit(tables[(b, "bn")], i) - _log_limit(tables[(b, "none")], i)
                                 for b in cfg["batch_sizes"]])) for i, s in enumerate(seeds)}
    higher = Part(RULES[0], paired_effect(decades, {s: 0.0 for s in seeds}, "decades"))
    censoring = {c for b in cfg["batch_sizes"] for a in ("bn", "none") for c in
                 (f"{a}:{x}" for x in tables[(b, a)].censored if x)}
    if censoring and higher.outcome != NO_DATA:
        only_larger = censoring <= {"bn:above", "none:below"}  # the true effect can only be larger
        if not (only_larger and higher.outcome == HOLDS):
            higher = Part(RULES[0], higher.effect, UNDECIDED)
    b0 = cfg["batch_sizes"][0]
    better = Part(RULES[1], paired_effect(by_seed(seeds, tables[(b0, "bn")].best_test),
                                          by_seed(seeds, tables[(b0, "none")].best_test), "points", DIFF_BOUNDS))
    return Findings([higher, better], {key: _arm(t) for key, t in tables.items()}, sorted(censoring))


# ------------------------------------------------------------------------------------------------ render

def render(profile: dict, findings: Findings) -> ClaimResult:
    cfg, arms, b0 = sweep.settings(profile), findings.arms, sweep.first_batch_size(profile)
    higher, better = parts = findings.parts
    rows = []
    for (b, a), arm in arms.items():
        t = arm.table
        rows.append([arm_label(a), b, f"{t.lrs[0]:g}–{t.lrs[-1]:g} ({len(t.lrs)})",
                     _lr_text(t.max_stable_lr, t.censored), fmt(t.best_lr, 3), fmt_ci(arm.val, 1), fmt_ci(arm.test, 1)])
    table = {"title": "Largest stable learning rate and validated accuracy per arm",
             "columns": ["arm", "batch size", "grid (rates)", "largest stable lr per seed (≥: censored above, "
                         "<: nothing stable)", "validated lr", "validation acc %", "test acc % [95% CI]"],
             "rows": rows}
    others = [a for a in ("skipinit", "fixup") if (b0, a) in arms]
    paragraphs = [
        f"Each arm trained at every learning rate of a grid from {cfg['lrs'][0]:g} to {cfg['lrs'][-1]:g}, extended "
        f"upwards while it was still stable at the top. Stable means it did not diverge, halved its training loss "
        f"and reached at least chance + 10 points on validation. Part 1 compares the largest stable rates, seed by "
        f"seed.",
        "Part 2 trains each arm at its validated learning rate, the one its validation accuracy chose, and compares "
        "their test accuracy, measured once at the end.",
        (f"Some limits are censored ({', '.join(findings.censoring)}): the arm was stable at the top of the "
         f"extended grid, or nowhere. Part 1 is then undecided unless the censoring can only make the effect "
         f"larger." if findings.censoring else "Every arm's largest stable rate lies inside its grid."),
    ]
    if others:
        paragraphs.append(f"{' and '.join(arm_label(a) for a in others)} train without normalization; the table "
                          f"shows how close they come to BN.")
    explanation = " ".join(paragraphs + [f"{higher.text()}.", f"{better.text(1)}."])
    verdict = Verdict.from_parts(parts, f"largest stable lr {_factor(higher.effect.interval)} larger (log10 BN/none: "
                                        f"{higher.effect.interval.text()}); accuracy gain "
                                        f"{better.effect.interval.text(1)}", explanation)
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        verdict=verdict, answer=answer(findings), paragraphs=paragraphs,
        caveats=[f"We use {dataset_label(profile)} and a width-{profile['width']} ResNet-{profile['depth']} where "
                 f"Bjorck et al. use CIFAR-10 and ResNet-110, so that a grid wide enough to bracket every arm's limit, "
                 f"with {len(profile['seeds'])} seeds, fits the budget; their runs are far longer.",
                 "A largest stable rate is only known to within one grid step (a factor "
                 f"{cfg['lrs'][-1] / cfg['lrs'][-2]:.3g}).",
                 "Every arm warms up linearly over 20% of its steps (one-cycle); a schedule without warm-up or "
                 "gradient clipping would move the unnormalized arms' limits."],
        tables=[table, {**paper_table(PAPER, _ours(profile, findings)), "details": True}],
        figures=[_accuracy_figure(profile, arms)],
        numbers={"log10_lr_ratio": higher.effect.interval.to_dict(), "accuracy_gain": better.effect.interval.to_dict(),
                 "parts": [p.to_dict() for p in parts], "censoring": findings.censoring,
                 "validated_lr": {f"{a}@{b}": arm.table.best_lr for (b, a), arm in arms.items()}})


def _factor(interval) -> str:
    """A log10 ratio interval as a factor: "27× [6.3×, 112×]"."""
    if not interval.finite:
        return "n/a"
    return f"{10 ** interval.mean:.3g}× [{10 ** interval.low:.3g}×, {10 ** interval.high:.3g}×]"


def _ours(profile: dict, findings: Findings) -> dict:
    """Our numbers for :data:`PAPER`'s quantities, each with our setting in words."""
    cfg, b0 = sweep.settings(profile), sweep.first_batch_size(profile)
    setting = (f"width-{profile['width']:g} ResNet-{profile['depth']} on {dataset_label(profile)}, batch {b0}, "
               f"{cfg.get('epochs') or cfg.get('max_steps')} {'epochs' if cfg.get('epochs') else 'steps'} "
               f"one-cycle, Nesterov momentum {cfg.get('momentum', 0.9):g}, weight decay "
               f"{cfg.get('weight_decay', 0.0):g}, no augmentation; each arm at the rate its validation accuracy "
               f"chose on a grid {cfg['lrs'][0]:g}–{cfg['lrs'][-1]:g}")
    arms = {a: findings.arms[(b0, a)] for a in ("bn", "none")}
    out = {a: (f"{fmt_ci(arm.test, 1)} at lr {arm.table.best_lr:g}" if arm.table.best_lr is not None else "n/a",
               setting) for a, arm in arms.items()}
    out["decades"] = (f"{findings.parts[0].effect.interval.text(2)} (largest stable rates, mean over batch sizes)",
                      setting)
    return out


def _lr_text(values, censored) -> str:
    out = []
    for v, c in zip(values, censored):
        out.append("—" if not math.isfinite(v) and c != "below" else
                   ("<" if c == "below" else ("≥" if c == "above" else "")) + (f"{v:g}" if math.isfinite(v) else "grid"))
    return ", ".join(out)


def _accuracy_figure(profile, arms: dict) -> dict:
    cfg = sweep.settings(profile)
    fig, axes = style.figure(ncols=2)
    ax_val, ax_ok = axes
    for j, b in enumerate(cfg["batch_sizes"]):
        ls = style.LINESTYLES[j % len(style.LINESTYLES)]
        for a in cfg["arms"]:
            arm = arms[(b, a)]
            style.band(ax_val, *arm.by_lr, style.arm_color(a), f"{arm_label(a)}, batch {b}", linestyle=ls)
            ax_ok.plot(arm.table.lrs, arm.stable_pct, color=style.arm_color(a), linestyle=ls, marker="o", ms=3,
                       label=f"{arm_label(a)}, batch {b}")
    for ax, ylabel, title in ((ax_val, "final validation accuracy (%)", "Validation accuracy by rate"),
                              (ax_ok, "stable runs (% of seeds)", "Stability by rate")):
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    style.legend_outside(fig, axes)
    return {"name": "claim4_lr_sweep", "title": "Validation accuracy and stability against learning rate",
            "figure": fig, "caption": "Mean over seeds with 95% CI (clipped to 0–100%); a diverged run counts as "
                                      "chance level. Stable: not diverged, loss halved, ≥ chance + 10 points."}


# ------------------------------------------------------------------------------------------------ answer

def answer(findings: Findings) -> str:
    """The claim's answer in one plain sentence (the report's first screen), from its parts."""
    return answers.sentence(findings.parts, [
        answers.Phrase(holds="BN trained stably at learning rates {x} larger",
                       refuted="BN did not train stably at clearly larger learning rates ({s})",
                       reversed="BN trained stably only at learning rates {x} smaller",
                       question="BN trains stably at larger learning rates"),
        answers.Phrase(holds="its test accuracy was {x} higher", refuted="its test accuracy was not clearly higher ({s})",
                       reversed="its test accuracy was {x} lower", question="BN gives more accurate models"),
    ])
