"""Claim 2: "BN accelerates training."

Reuses claim 4's sweep at its first batch size: each arm (BN, none, SkipInit, Fixup) at its own best
learning rate. As Ioffe & Szegedy did, the target is the best test accuracy the unnormalized network
ever reaches (per seed); we count the steps (and training seconds) each arm needs to reach it, and the
area under the training-loss curve (the mean training loss over the run).
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.study import claim_lr
from bnlab.study.common import ARM_COLORS, arm_label, figure, fmt_ci, lookup
from bnlab.study.metrics import log_mean_ci, loss_curve_area, mean_ci, steps_to_target
from bnlab.study.verdict import ClaimResult, Interval, Verdict, clears, combine

NUMBER = 2
SLUG = "speed"
TITLE = "BN accelerates training"
LITERATURE = ("Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167): BN-Inception matched Inception's "
              "accuracy in 2.1M instead of 31.0M steps (≈14× fewer) at 5× the learning rate.")
SPEEDUP = 1.25   # BN must need ≥ 25% fewer steps than none to reach none's best accuracy
AREA_RATIO = 1.0  # and have a lower mean training loss over the run
FINDING = "Ioffe & Szegedy 2015: same accuracy in ≈14× fewer steps (supported)"
RULE = (f"Per seed, the target is the best test accuracy the unnormalized arm reaches at its best learning "
        f"rate; speed-up = steps none needs to first reach it / steps BN needs (a run that never reaches it "
        f"counts as needing all its steps). Part 1 holds when the 95% CI of the geometric-mean speed-up lies "
        f"above {SPEEDUP}; part 2 when the CI of (mean training loss none / BN) lies above {AREA_RATIO}. "
        f"Both → supported; part 1 fails → not supported; otherwise supported with caveats.")


def specs(profile: dict) -> list[dict]:
    cfg = profile["lr"]
    b0 = cfg["batch_sizes"][0]
    return [claim_lr.sweep_spec(profile, norm, lr, b0, seed)
            for norm in cfg["arms"] for lr in cfg["lrs"] for seed in profile["seeds"]]


def _curves(profile, results, norm):
    b0 = profile["lr"]["batch_sizes"][0]
    best_lr = claim_lr.sweep_table(profile, results, b0, norm)["best_lr"]
    rows = [lookup(results, claim_lr.sweep_spec(profile, norm, best_lr, b0, s)) for s in profile["seeds"]]
    return best_lr, rows


def analyze(profile: dict, results: dict) -> ClaimResult:
    arms = profile["lr"]["arms"]
    curves = {a: _curves(profile, results, a) for a in arms}
    none_rows = curves["none"][1]
    targets = []
    for row in none_rows:
        accs = [v for v in ((row or {}).get("result") or {}).get("curve", {}).get("test_acc", []) if v is not None]
        targets.append(max(accs) if accs else math.nan)
    per_arm = {}
    for a in arms:
        steps, seconds, areas = [], [], []
        for row, target in zip(curves[a][1], targets):
            result = (row or {}).get("result") or {}
            curve = result.get("curve", {})
            if not curve.get("step") or not math.isfinite(target):
                steps.append(math.nan), seconds.append(math.nan), areas.append(math.nan)
                continue
            reached = steps_to_target(curve["step"], curve["test_acc"], target)
            index = curve["step"].index(reached) if reached is not None else len(curve["step"]) - 1
            steps.append(float(curve["step"][index]))
            seconds.append(float(curve["seconds"][index]))
            losses = [v for v in result.get("losses", []) if v is not None]
            areas.append(loss_curve_area(range(len(losses)), losses) if row["status"] == "done" else math.nan)
        per_arm[a] = {"steps": steps, "seconds": seconds, "area": areas, "lr": curves[a][0]}

    def ratio(a, key):
        return [n / b if b and math.isfinite(n) and math.isfinite(b) else math.nan
                for n, b in zip(per_arm["none"][key], per_arm[a][key])]
    speedup = Interval.of(log_mean_ci(ratio("bn", "steps")), "×")
    time_speedup = Interval.of(log_mean_ci(ratio("bn", "seconds")), "×")
    area = Interval.of(log_mean_ci(ratio("bn", "area")), "×")
    part1, part2 = clears(speedup, SPEEDUP), clears(area, AREA_RATIO)
    verdict = combine(part1, part2)

    rows = []
    for a in arms:
        p = per_arm[a]
        rows.append([arm_label(a), f"{p['lr']:g}", fmt_ci(mean_ci(p["steps"]), 0), fmt_ci(mean_ci(p["seconds"]), 2),
                     fmt_ci(log_mean_ci(ratio(a, "steps")), 2), fmt_ci(mean_ci(p["area"]), 3)])
    table = {"title": "Steps and training seconds to reach the unnormalized arm's best test accuracy",
             "columns": ["arm", "lr", "steps to target", "seconds to target", "speed-up vs none (×)",
                         "mean training loss"],
             "rows": rows}
    others = [a for a in ("skipinit", "fixup") if a in arms]
    explanation = (
        f"The unnormalized network's best test accuracy (per seed) was "
        f"{fmt_ci(mean_ci([100 * t for t in targets]), 1)}%. BN reached it in "
        f"{fmt_ci(mean_ci(per_arm['bn']['steps']), 0)} steps against "
        f"{fmt_ci(mean_ci(per_arm['none']['steps']), 0)} for no normalization: a speed-up of {speedup.text()} in "
        f"steps and {time_speedup.text()} in training seconds (BN costs more per step). Its mean training "
        f"loss over the run is {area.text()} times lower. ")
    explanation += " ".join(f"{arm_label(a)} has a speed-up of {fmt_ci(log_mean_ci(ratio(a, 'steps')), 2)}×."
                            for a in others)
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING,
        verdict=Verdict(verdict, f"steps to none's best accuracy: {speedup.text()} fewer with BN", speedup,
                        explanation),
        agrees_with_literature=verdict == "supported",
        caveats=["Targets come from short one-cycle schedules: an arm whose schedule ends before it peaks "
                 "is penalized; a longer budget could change the speed-up either way.",
                 "Test accuracy is evaluated every few steps, so steps-to-target are rounded up to that grid.",
                 "Wall time is measured on this machine with one thread per run; BN's extra cost per step "
                 "differs on a GPU."],
        tables=[table], figures=[_curve_figure(profile, curves, targets)],
        numbers={"speedup_steps": speedup.to_dict(), "speedup_seconds": time_speedup.to_dict(),
                 "loss_area_ratio": area.to_dict(), "target": mean_ci(targets)})


def _curve_figure(profile, curves, targets) -> dict:
    fig, (ax_acc, ax_loss) = figure(ncols=2)
    for a, (lr, rows) in curves.items():
        rows = [r for r in rows if r is not None and (r["result"] or {}).get("curve", {}).get("step")]
        if not rows:
            continue
        steps = rows[0]["result"]["curve"]["step"]
        accs = [[100 * (v if v is not None else math.nan) for v in r["result"]["curve"]["test_acc"]] for r in rows]
        n = min(len(s) for s in accs)
        mean = np.nanmean([s[:n] for s in accs], axis=0)
        ax_acc.plot(steps[:n], mean, label=f"{arm_label(a)} (lr {lr:g})", color=ARM_COLORS.get(a))
        losses = [[v if v is not None else math.nan for v in r["result"]["losses"]] for r in rows]
        m = min(len(s) for s in losses)
        smooth = np.convolve(np.nanmean([s[:m] for s in losses], axis=0), np.ones(5) / 5, mode="valid")
        ax_loss.plot(np.arange(len(smooth)) + 2, smooth, color=ARM_COLORS.get(a))
    if targets and any(math.isfinite(t) for t in targets):
        ax_acc.axhline(100 * float(np.nanmean(targets)), ls="--", color="k", lw=0.8, label="target (none's best)")
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("test accuracy (%)")
    ax_acc.legend(fontsize=7)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (5-step mean)")
    ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return {"name": "claim2_curves", "title": "Test accuracy and training loss, each arm at its best lr",
            "figure": fig, "caption": "Mean over seeds; the dashed line is the target accuracy."}
