"""Claim 4: "BN allows higher learning rates, and hence better models."

A log-spaced learning-rate grid × {BN, none, SkipInit, Fixup} × two batch sizes × seeds. Two numbers per
arm: the largest *stable* learning rate (did not diverge, and ended with a lower training loss than it
started with) and the best final test accuracy over the grid (with the rate that gives it). The verdict
keeps the two halves of the claim apart: BN may well allow higher rates without giving a better model.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.study.common import (ARM_COLORS, arm_label, figure, final_acc, final_loss, fmt, fmt_ci, lookup,
                                train_spec)
from bnlab.study.metrics import is_stable, max_stable_lr, mean_ci
from bnlab.study.verdict import ClaimResult, Interval, Verdict, clears, combine

NUMBER = 4
SLUG = "lr"
TITLE = "BN allows higher learning rates, and hence better models"
LITERATURE = ("Bjorck et al. 2018 (https://arxiv.org/abs/1806.02375): ResNet-110 on CIFAR-10 trains at lr 0.1 "
              "with BN (≈93%); without BN only ≈1e-4 was stable (≈81%). Both halves held there.")
HIGHER_LR_DECADES = 0.4  # BN's max stable lr must exceed none's by > 0.4 decades (≈2.5×)
BETTER_MODEL_POINTS = 1.0  # BN's best accuracy must exceed none's by > 1 percentage point
FINDING = "Bjorck et al. 2018: lr 0.1 with BN vs ≈1e-4 without; 93% vs 81% (both halves supported)"
RULE = (f"Per seed, the largest stable learning rate (no divergence, final training loss below the initial "
        f"loss) and the best final test accuracy over the grid. Half A (higher rates) holds when the 95% CI "
        f"of log10(max stable lr BN / none), averaged over batch sizes, lies above {HIGHER_LR_DECADES} "
        f"decades; half B (better models) holds when the CI of (best accuracy BN − best accuracy none) at "
        f"each arm's own best rate lies above {BETTER_MODEL_POINTS} percentage point. Both → supported; "
        f"A fails → not supported; otherwise supported with caveats.")


def specs(profile: dict) -> list[dict]:
    cfg = profile["lr"]
    out = []
    for batch_size in cfg["batch_sizes"]:
        for norm in cfg["arms"]:
            for lr in cfg["lrs"]:
                for seed in profile["seeds"]:
                    out.append(sweep_spec(profile, norm, lr, batch_size, seed))
    return out


def sweep_spec(profile: dict, norm: str, lr: float, batch_size: int, seed: int) -> dict:
    """One run of the sweep (claim 2 reuses these exact specs, so they run once)."""
    cfg = profile["lr"]
    fields = {"norm": norm, "lr": lr, "batch_size": batch_size, "seed": seed}
    if cfg.get("epochs") is not None:
        fields["epochs"] = cfg["epochs"]
    if cfg.get("max_steps") is not None:
        fields["max_steps"] = cfg["max_steps"]
    return train_spec(profile, **fields)


def stable(row) -> bool:
    if row is None:
        return False
    result = row["result"] or {}
    initial = result.get("initial_loss")
    return is_stable(row["status"], initial if initial is not None else math.nan, final_loss(result))


def sweep_table(profile: dict, results: dict, batch_size: int, norm: str) -> dict:
    """Per lr: per-seed final accuracy and stability; plus the best lr and per-seed max stable lr."""
    cfg, seeds = profile["lr"], profile["seeds"]
    acc = {lr: [final_acc(lookup(results, sweep_spec(profile, norm, lr, batch_size, s))) for s in seeds]
           for lr in cfg["lrs"]}
    ok = {lr: [stable(lookup(results, sweep_spec(profile, norm, lr, batch_size, s))) for s in seeds]
          for lr in cfg["lrs"]}
    mean_acc = {lr: float(np.nanmean(v)) if not all(math.isnan(a) for a in v) else -1.0 for lr, v in acc.items()}
    best_lr = max(cfg["lrs"], key=lambda lr: mean_acc[lr])
    max_lr = [max_stable_lr(cfg["lrs"], [ok[lr][i] for lr in cfg["lrs"]]) for i in range(len(seeds))]
    return {"acc": acc, "stable": ok, "best_lr": best_lr, "best_acc": acc[best_lr], "max_stable_lr": max_lr}


def _log10(v):
    return math.log10(v) if v else math.nan


def analyze(profile: dict, results: dict) -> ClaimResult:
    cfg, seeds = profile["lr"], profile["seeds"]
    tables = {(b, a): sweep_table(profile, results, b, a) for b in cfg["batch_sizes"] for a in cfg["arms"]}
    lowest = min(cfg["lrs"]) / 10  # "nothing stable" counts one grid decade below the grid
    decades, gains = [], []
    for i in range(len(seeds)):
        per_batch = []
        for b in cfg["batch_sizes"]:
            bn, none = tables[(b, "bn")]["max_stable_lr"][i], tables[(b, "none")]["max_stable_lr"][i]
            per_batch.append(_log10(bn or lowest) - _log10(none or lowest))
        decades.append(float(np.mean(per_batch)))
    b0 = cfg["batch_sizes"][0]
    gains = [bn - none for bn, none in zip(tables[(b0, "bn")]["best_acc"], tables[(b0, "none")]["best_acc"])]
    higher = Interval.of(mean_ci(decades), "decades")
    better = Interval.of(mean_ci(gains), "points")
    half_a, half_b = clears(higher, HIGHER_LR_DECADES), clears(better, BETTER_MODEL_POINTS)
    verdict = combine(half_a, half_b)

    rows = []
    for (b, a), t in tables.items():
        lrs = [v for v in t["max_stable_lr"]]
        rows.append([arm_label(a), b, _lr_text(lrs), fmt(t["best_lr"], 3),
                     fmt_ci(mean_ci(t["best_acc"]), 1)])
    table = {"title": "Largest stable learning rate and best accuracy per arm",
             "columns": ["arm", "batch size", "max stable lr (per seed)", "best lr", "best test acc % [95% CI]"],
             "rows": rows}

    def word(v):
        return {True: "holds", False: "does not hold", None: "is undecided at this number of seeds"}[v]
    explanation = (
        f"Half A (higher rates) {word(half_a)}: BN's largest stable learning rate is "
        f"{10 ** higher.mean:.3g}× that without normalization (log10 ratio {higher.text()}), averaged over "
        f"batch sizes {', '.join(map(str, cfg['batch_sizes']))}. Half B (better models) {word(half_b)}: at "
        f"each arm's own best rate (BN {tables[(b0, 'bn')]['best_lr']}, none {tables[(b0, 'none')]['best_lr']}, "
        f"batch {b0}) BN's final test accuracy is {better.text(1)} above no normalization.")
    if (b0, "skipinit") in tables and (b0, "fixup") in tables:
        explanation += (
            f" SkipInit reaches {fmt_ci(mean_ci(tables[(b0, 'skipinit')]['best_acc']), 1)}% and Fixup "
            f"{fmt_ci(mean_ci(tables[(b0, 'fixup')]['best_acc']), 1)}% without any normalization (BN: "
            f"{fmt_ci(mean_ci(tables[(b0, 'bn')]['best_acc']), 1)}%), which shows how much an initialization "
            f"alone recovers.")
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING,
        verdict=Verdict(verdict, f"max stable lr BN/none: {10 ** higher.mean:.3g}× "
                                 f"(log10 {higher.text()}); accuracy gain {better.text(1)}", higher, explanation),
        agrees_with_literature=verdict == "supported",
        caveats=[f"Dataset {profile['dataset']} and a width-{profile['width']} ResNet-{profile['depth']}, far "
                 f"smaller than CIFAR-10/ResNet-110; short schedules favour arms that learn fast.",
                 "The grid is coarse: a max stable rate is only known to within one grid step.",
                 "A different schedule (warm-up, no momentum) or gradient clipping would move the stability "
                 "boundary of the unnormalized arms."],
        tables=[table], figures=[_accuracy_figure(profile, tables), _stability_figure(profile, tables)],
        numbers={"log10_lr_ratio": higher.to_dict(), "accuracy_gain": better.to_dict(),
                 "half_a": half_a, "half_b": half_b})


def _lr_text(values) -> str:
    return ", ".join("none" if v is None else f"{v:g}" for v in values)


def _accuracy_figure(profile, tables) -> dict:
    cfg = profile["lr"]
    fig, axes = figure(ncols=len(cfg["batch_sizes"]))
    for ax, b in zip(axes, cfg["batch_sizes"]):
        for a in cfg["arms"]:
            t = tables[(b, a)]
            stats = [mean_ci(t["acc"][lr]) for lr in cfg["lrs"]]
            means = [s[0] for s in stats]
            errs = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
            ax.errorbar(cfg["lrs"], means, yerr=errs, marker="o", ms=3, capsize=2, label=arm_label(a),
                        color=ARM_COLORS.get(a))
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"batch size {b}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return {"name": "claim4_accuracy_vs_lr", "title": "Final test accuracy against learning rate",
            "figure": fig, "caption": "Mean over seeds with 95% CI; a diverged run counts as chance level."}


def _stability_figure(profile, tables) -> dict:
    cfg = profile["lr"]
    fig, axes = figure()
    ax = axes[0]
    width = 0.8 / len(cfg["batch_sizes"])
    for j, b in enumerate(cfg["batch_sizes"]):
        values = []
        for a in cfg["arms"]:
            lrs = [v if v else min(cfg["lrs"]) / 10 for v in tables[(b, a)]["max_stable_lr"]]
            values.append(mean_ci([math.log10(v) for v in lrs]))
        x = np.arange(len(cfg["arms"])) + j * width
        ax.bar(x, [10 ** m for m, _, _ in values], width, label=f"batch {b}",
               yerr=[[10 ** m - 10 ** lo for m, lo, _ in values], [10 ** hi - 10 ** m for m, _, hi in values]],
               capsize=2)
    ax.set_yscale("log")
    ax.set_xticks(np.arange(len(cfg["arms"])) + width * (len(cfg["batch_sizes"]) - 1) / 2)
    ax.set_xticklabels([arm_label(a) for a in cfg["arms"]], fontsize=8)
    ax.set_ylabel("largest stable lr (geometric mean)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return {"name": "claim4_max_stable_lr", "title": "Largest stable learning rate per arm",
            "figure": fig, "caption": "Geometric mean over seeds with 95% CI; 'nothing stable' is drawn one "
                                      "decade below the grid."}
