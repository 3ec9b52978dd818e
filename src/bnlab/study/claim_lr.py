"""Claim 4: "BN allows higher learning rates, and hence better models."

A log-spaced learning-rate grid × {BN, none, SkipInit, Fixup} × batch sizes × seeds (one-cycle schedule:
20% linear warm-up, then linear decay). The grid is *extended* upwards while an arm is stable at its top
(the runner collects specs again after each round), up to ``max_extensions`` extra rates, so that each
arm's largest stable rate is interior; an arm still stable at the top is reported as censored. A run is
stable when it did not diverge, ended at ≤ half its initial training loss and reached validation
accuracy ≥ chance + 10 points (:func:`bnlab.study.metrics.is_stable`). The "better models" half compares
the test accuracy of each arm at the rate its *validation* accuracy chose.
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator

from bnlab.study import style
from bnlab.study.common import (DIFF_BOUNDS, analyze as _analyze, arm_label, by_seed, choose_lr, dataset_label,
                                final_pct, fmt, fmt_ci, lookup, mean_ci, paper_table, stable, train_spec)
from bnlab.study.verdict import HOLDS, NO_DATA, SUPPORTED, UNDECIDED, ClaimResult, Part, Rule, Verdict, paired_effect

NUMBER = 4
SLUG = "lr"
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
    "standard": {"arms": list(ARMS), "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0],
                 "batch_sizes": [64, 256], "epochs": 3, "max_extensions": 2},
    # Bjorck et al.'s comparison: rates from 1e-5 (no BN's ≈1e-4 is interior) to 3 (BN's 0.1 is interior),
    # batch 128, He et al.'s weight decay 1e-4 and momentum 0.9
    "full": {"arms": list(ARMS), "lrs": [1e-5, 3e-5, 1e-4, 3e-4, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
             "batch_sizes": [128], "epochs": 20, "max_extensions": 1, "weight_decay": 1e-4, "momentum": 0.9},
}


# ------------------------------------------------------------------------------------------------ measure

def sweep_spec(profile: dict, norm: str, lr: float, batch_size: int, seed: int) -> dict:
    """One run of the sweep (claims 2 and 5 reuse these exact specs, so they run once)."""
    cfg = profile["lr"]
    fields = {"norm": norm, "lr": lr, "batch_size": batch_size, "seed": seed,
              "eval_every": 0}  # every choice reads the final model only: no curve is evaluated
    if cfg.get("epochs") is not None:
        fields["epochs"] = cfg["epochs"]
    if cfg.get("max_steps") is not None:
        fields["max_steps"] = cfg["max_steps"]
    if cfg.get("weight_decay"):  # only when set, so profiles without it keep their runs' keys
        fields["weight_decay"] = cfg["weight_decay"]
    if cfg.get("momentum", 0.9) != 0.9:
        fields["momentum"] = cfg["momentum"]
    return train_spec(profile, **fields)


def grid(profile: dict, results: Optional[dict], batch_size: int, norm: str) -> tuple[list[float], bool]:
    """(the arm's learning rates, whether they are final): the profile's grid, extended by its top ratio
    while any seed is stable at the top, at most ``max_extensions`` times. Final means every run of the
    grid has finished and no extension is pending (so choices made on it will not change)."""
    cfg, seeds = profile["lr"], profile["seeds"]
    lrs = [float(v) for v in cfg["lrs"]]
    ratio = lrs[-1] / lrs[-2]

    def rows(lr):
        return [lookup(results, sweep_spec(profile, norm, lr, batch_size, s)) for s in seeds]
    complete = all(r is not None for lr in lrs for r in rows(lr))
    for _ in range(cfg.get("max_extensions", 0)):
        top = rows(lrs[-1])
        if not complete or not any(stable(r) for r in top):
            break
        lrs.append(float(f"{lrs[-1] * ratio:.3g}"))
        complete = all(r is not None for r in rows(lrs[-1]))
    return lrs, complete


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    cfg = profile["lr"]
    return [sweep_spec(profile, norm, lr, b, seed) for b in cfg["batch_sizes"] for norm in cfg["arms"]
            for lr in grid(profile, results, b, norm)[0] for seed in profile["seeds"]]


specs = measure


def sweep_table(profile: dict, results: dict, batch_size: int, norm: str) -> dict:
    """Per lr: per-seed validation/test accuracy and stability; the validated lr; per-seed largest stable lr
    with its censoring (``"above"``: stable at the top of the final grid; ``"below"``: nothing stable)."""
    seeds = profile["seeds"]
    lrs, complete = grid(profile, results, batch_size, norm)
    rows = {lr: [lookup(results, sweep_spec(profile, norm, lr, batch_size, s)) for s in seeds] for lr in lrs}
    val = {lr: [final_pct(r, "val_acc") for r in rows[lr]] for lr in lrs}
    test = {lr: [final_pct(r, "test_acc") for r in rows[lr]] for lr in lrs}
    ok = {lr: [stable(r) for r in rows[lr]] for lr in lrs}
    best = choose_lr(val)
    limits, censored = [], []
    for i in range(len(seeds)):
        good = [lr for lr in lrs if ok[lr][i]]
        finished = all(rows[lr][i] is not None for lr in lrs)
        limits.append(max(good) if good and finished else math.nan)
        censored.append("above" if good and max(good) == lrs[-1] else ("below" if finished and not good else ""))
    return {"lrs": lrs, "complete": complete, "val": val, "test": test, "stable": ok, "best_lr": best,
            "best_test": test[best] if best is not None else [math.nan] * len(seeds),
            "best_val": val[best] if best is not None else [math.nan] * len(seeds),
            "max_stable_lr": limits, "censored": censored}


# ------------------------------------------------------------------------------------------------ decide

def _log_limit(table: dict, i: int) -> float:
    """log10 of seed i's largest stable lr; "nothing stable" counts one grid step below the grid."""
    lrs = table["lrs"]
    if table["censored"][i] == "below":
        return math.log10(lrs[0] * lrs[0] / lrs[1])
    return math.log10(table["max_stable_lr"][i]) if math.isfinite(table["max_stable_lr"][i]) else math.nan


def decide(profile: dict, results: dict) -> tuple[list[Part], dict]:
    cfg, seeds = profile["lr"], profile["seeds"]
    tables = {(b, a): sweep_table(profile, results, b, a) for b in cfg["batch_sizes"] for a in cfg["arms"]}
    decades = {s: float(np.mean([_log_limit(tables[(b, "bn")], i) - _log_limit(tables[(b, "none")], i)
                                 for b in cfg["batch_sizes"]])) for i, s in enumerate(seeds)}
    higher = Part(RULES[0], paired_effect(decades, {s: 0.0 for s in seeds}, "decades"))
    censoring = {c for b in cfg["batch_sizes"] for a in ("bn", "none") for c in
                 (f"{a}:{x}" for x in tables[(b, a)]["censored"] if x)}
    if censoring and higher.outcome != NO_DATA:
        only_larger = censoring <= {"bn:above", "none:below"}  # the true effect can only be larger
        if not (only_larger and higher.outcome == HOLDS):
            higher = Part(RULES[0], higher.effect, UNDECIDED)
    b0 = cfg["batch_sizes"][0]
    better = Part(RULES[1], paired_effect(by_seed(seeds, tables[(b0, "bn")]["best_test"]),
                                          by_seed(seeds, tables[(b0, "none")]["best_test"]), "points", DIFF_BOUNDS))
    return [higher, better], {"tables": tables, "censoring": sorted(censoring)}


# ------------------------------------------------------------------------------------------------ render

def render(profile: dict, results: dict, parts: list[Part], facts: dict) -> ClaimResult:
    cfg = profile["lr"]
    tables, b0 = facts["tables"], cfg["batch_sizes"][0]
    higher, better = parts
    rows = []
    for (b, a), t in tables.items():
        rows.append([arm_label(a), b, f"{t['lrs'][0]:g}–{t['lrs'][-1]:g} ({len(t['lrs'])})",
                     _lr_text(t["max_stable_lr"], t["censored"]), fmt(t["best_lr"], 3),
                     fmt_ci(mean_ci(t["best_val"], (0, 100)), 1), fmt_ci(mean_ci(t["best_test"], (0, 100)), 1)])
    table = {"title": "Largest stable learning rate and validated accuracy per arm",
             "columns": ["arm", "batch size", "grid (rates)", "largest stable lr per seed (≥: censored above, "
                         "<: nothing stable)", "validated lr", "validation acc %", "test acc % [95% CI]"],
             "rows": rows}
    censor_text = (f" Censored limits: {', '.join(facts['censoring'])} (stable at the top of the extended grid, "
                   f"or nothing stable at its bottom)." if facts["censoring"] else
                   " Every arm's largest stable rate is interior to its grid.")
    explanation = (f"{higher.text()}.{censor_text} {better.text(1)}.")
    others = [a for a in ("skipinit", "fixup") if (b0, a) in tables]
    if others:
        explanation += " Without any normalization, " + "; ".join(
            f"{arm_label(a)} reaches {fmt_ci(mean_ci(tables[(b0, a)]['best_test'], (0, 100)), 1)}% at its validated "
            f"lr {fmt(tables[(b0, a)]['best_lr'], 3)}" for a in others) + (
            f" (BN: {fmt_ci(mean_ci(tables[(b0, 'bn')]['best_test'], (0, 100)), 1)}%).")
    verdict = Verdict.from_parts(parts, f"log10 max stable lr BN/none: {higher.effect.interval.text()}; "
                                        f"accuracy gain {better.effect.interval.text(1)}", explanation)
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        verdict=verdict,
        caveats=[f"We use {dataset_label(profile)} and a width-{profile['width']} ResNet-{profile['depth']} where "
                 f"Bjorck et al. use CIFAR-10 and ResNet-110, so that a grid wide enough to bracket every arm's limit, "
                 f"with {len(profile['seeds'])} seeds, fits the budget; their runs are far longer.",
                 "A largest stable rate is only known to within one grid step (a factor "
                 f"{cfg['lrs'][-1] / cfg['lrs'][-2]:.3g}).",
                 "Every arm warms up linearly over 20% of its steps (one-cycle); a schedule without warm-up or "
                 "gradient clipping would move the unnormalized arms' limits."],
        tables=[table, paper_table(PAPER, _ours(profile, tables, higher))],
        figures=[_accuracy_figure(profile, tables)],
        numbers={"log10_lr_ratio": higher.effect.interval.to_dict(), "accuracy_gain": better.effect.interval.to_dict(),
                 "parts": [p.to_dict() for p in parts], "censoring": facts["censoring"],
                 "validated_lr": {f"{a}@{b}": t["best_lr"] for (b, a), t in tables.items()}})


def _ours(profile: dict, tables: dict, higher: Part) -> dict:
    """Our numbers for :data:`PAPER`'s quantities, each with our setting in words."""
    cfg, b0 = profile["lr"], profile["lr"]["batch_sizes"][0]
    setting = (f"width-{profile['width']:g} ResNet-{profile['depth']} on {dataset_label(profile)}, batch {b0}, "
               f"{cfg.get('epochs') or cfg.get('max_steps')} {'epochs' if cfg.get('epochs') else 'steps'} "
               f"one-cycle, Nesterov momentum {cfg.get('momentum', 0.9):g}, weight decay "
               f"{cfg.get('weight_decay', 0.0):g}, no augmentation; each arm at the rate its validation accuracy "
               f"chose on a grid {cfg['lrs'][0]:g}–{cfg['lrs'][-1]:g}")
    out = {a: (f"{fmt_ci(mean_ci(tables[(b0, a)]['best_test'], (0, 100)), 1)} at lr {tables[(b0, a)]['best_lr']:g}"
               if tables[(b0, a)]["best_lr"] is not None else "n/a", setting) for a in ("bn", "none")}
    out["decades"] = (f"{higher.effect.interval.text(2)} (largest stable rates, mean over batch sizes)", setting)
    return out


def analyze(profile: dict, results: dict) -> ClaimResult:
    import sys
    return _analyze(sys.modules[__name__], profile, results)


def _lr_text(values, censored) -> str:
    out = []
    for v, c in zip(values, censored):
        out.append("—" if not math.isfinite(v) and c != "below" else
                   ("<" if c == "below" else ("≥" if c == "above" else "")) + (f"{v:g}" if math.isfinite(v) else "grid"))
    return ", ".join(out)


def _accuracy_figure(profile, tables) -> dict:
    cfg = profile["lr"]
    fig, axes = style.figure(ncols=2)
    ax_val, ax_ok = axes
    for j, b in enumerate(cfg["batch_sizes"]):
        ls = style.LINESTYLES[j % len(style.LINESTYLES)]
        for a in cfg["arms"]:
            t = tables[(b, a)]
            stats = [mean_ci(t["val"][lr], (0, 100)) for lr in t["lrs"]]
            style.band(ax_val, t["lrs"], [s[0] for s in stats], [s[1] for s in stats], [s[2] for s in stats],
                       style.arm_color(a), f"{arm_label(a)}, batch {b}", linestyle=ls)
            ax_ok.plot(t["lrs"], [100 * np.mean(t["stable"][lr]) for lr in t["lrs"]], color=style.arm_color(a),
                       linestyle=ls, marker="o", ms=3, label=f"{arm_label(a)}, batch {b}")
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
