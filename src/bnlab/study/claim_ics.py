"""Claim 1: "BN reduces internal covariate shift, and that is why it helps."

Arms: BN, no normalization (He init, its own learning rate) and noisy BN — BN followed by a random
per-channel scale and shift whose distribution changes every step, so layer inputs are deliberately
unstable (Santurkar et al. 2018, https://arxiv.org/abs/1805.11604). Each run is
:func:`bnlab.study.ics_loop.run_ics`: plain SGD measuring (a) distributional shift of a middle layer's
inputs, (b) gradient ICS, compared between arms at *matched training loss*, and (c) smoothness of the
loss along the gradient.
"""

from __future__ import annotations

import math

import numpy as np

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt

from bnlab.study import style
from bnlab.study.common import arm_label, by_seed, fmt_ci, lookup
from bnlab.study.metrics import first_index_at_or_below, log_mean_ci, mean_ci, step_changes
from bnlab.study.specs import make_spec
from bnlab.study.verdict import NOT_SUPPORTED, ClaimResult, Interval, Part, Rule, Verdict, paired_effect

NUMBER = 1
SLUG = "ics"
TITLE = "BN reduces internal covariate shift, and that is why it helps"
LITERATURE = ("Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604): noisy BN trains about as well as BN "
              "despite far larger distributional shift; BN does not reliably reduce gradient ICS (it can "
              "increase it); BN's real effect is a smoother loss landscape. Expected verdict: not supported.")
FINDING = ("Santurkar et al. 2018: noisy BN trains as well; BN does not reduce gradient ICS; smoothness is "
           "the real effect (not supported)")
EXPECTED = NOT_SUPPORTED
RULES = [
    Rule("BN reduces gradient ICS", "cos(G, G′) with BN − without, at matched training loss", threshold=0.05,
         margin=0.02),
    Rule("that is why it helps", "test accuracy BN − noisy BN", threshold=2.0, margin=1.0, unit="points",
         bounds=(-100.0, 100.0)),
]
RULE = " ".join(f"Part {i + 1}, {r.text()}." for i, r in enumerate(RULES))


class Config(BaseModel):
    """The ``ics`` section."""

    model_config = ConfigDict(extra="forbid")
    arms: dict[str, PositiveFloat] = Field(min_length=2)
    steps: PositiveInt
    batch_size: PositiveInt
    measure_every: PositiveInt
    step_sizes: list[PositiveFloat] = Field(min_length=1)
    noise_shift: NonNegativeFloat = 1.0
    noise_scale: float = Field(1.5, ge=1.0)


_ARMS = {"bn": 0.3, "none": 0.1, "noisy_bn": 0.3}
PRESETS = {
    "tiny": {"arms": {"bn": 0.1, "none": 0.05, "noisy_bn": 0.1}, "steps": 6, "batch_size": 32, "measure_every": 2,
             "step_sizes": [0.1, 0.4]},
    "quick": {"arms": _ARMS, "steps": 150, "batch_size": 64, "measure_every": 20, "step_sizes": [0.1, 0.2, 0.4]},
    "standard": {"arms": _ARMS, "steps": 400, "batch_size": 128, "measure_every": 20,
                 "step_sizes": [0.05, 0.1, 0.2, 0.4]},
    "full": {"arms": _ARMS, "steps": 2000, "batch_size": 128, "measure_every": 50,
             "step_sizes": [0.05, 0.1, 0.2, 0.4]},
}


def _spec(profile, norm, lr, seed) -> dict:
    cfg = profile["ics"]
    fields = {"dataset": profile["dataset"], "device": profile.get("device", "cpu"), "width": profile["width"],
              "depth": profile["depth"], "norm": norm, "lr": lr, "steps": cfg["steps"],
              "batch_size": cfg["batch_size"], "measure_every": cfg["measure_every"],
              "step_sizes": cfg["step_sizes"], "seed": seed}
    if norm == "noisy_bn":
        fields.update(noise_shift=cfg["noise_shift"], noise_scale=cfg["noise_scale"])
    return make_spec("ics", **fields)


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    return [_spec(profile, norm, lr, s) for norm, lr in profile["ics"]["arms"].items() for s in profile["seeds"]]


specs = measure


def _loss_levels(runs: list[dict]) -> list[float]:
    """Three training-loss levels every run reaches (between the highest start and the highest floor)."""
    firsts = [r["ics"]["ema_loss"][0] for r in runs if r["ics"]["ema_loss"]]
    floors = [min(r["ics"]["ema_loss"]) for r in runs if r["ics"]["ema_loss"]]
    if not firsts:
        return []
    start, floor = min(firsts), max(floors)
    if floor >= start:
        return [floor]
    return list(np.linspace(start, floor, 4)[1:])


def _at_levels(run: dict, section: str, name: str, levels: list[float]) -> float:
    """A measurement averaged over loss levels (and layers), each taken where the run first reaches it."""
    values = []
    for level in levels:
        i = first_index_at_or_below(run[section]["ema_loss"], level)
        i = len(run[section]["ema_loss"]) - 1 if i is None else i
        v = run[section][name][i]
        values.append(float(np.mean(v)) if isinstance(v, list) else float(v))
    return float(np.mean(values)) if values else math.nan


def analyze(profile: dict, results: dict) -> ClaimResult:
    cfg, seeds = profile["ics"], profile["seeds"]
    arms = list(cfg["arms"])
    rows = {a: [lookup(results, _spec(profile, a, cfg["arms"][a], s)) for s in seeds] for a in arms}
    runs = {a: [r["result"] if r and r["status"] == "done" else None for r in rs] for a, rs in rows.items()}
    usable = [r for rs in runs.values() for r in rs if r and r["ics"]["ema_loss"]]
    levels = _loss_levels(usable)

    def per_seed(a, fn):
        return [fn(r) if r else math.nan for r in runs[a]]
    shift = {a: per_seed(a, lambda r: _mean_change(r["dist"]["mean"])) for a in arms}
    shift_std = {a: per_seed(a, lambda r: _mean_change(r["dist"]["std"])) for a in arms}
    cosine = {a: per_seed(a, lambda r: _at_levels(r, "ics", "cosine", levels)) for a in arms}
    distance = {a: per_seed(a, lambda r: _at_levels(r, "ics", "distance", levels)) for a in arms}
    loss_range = {a: per_seed(a, lambda r: _at_levels(r, "smooth", "loss_range", levels)) for a in arms}
    beta = {a: per_seed(a, lambda r: _at_levels(r, "smooth", "beta", levels)) for a in arms}
    acc = {a: [100 * r["final"]["test_acc"] if r else math.nan for r in runs[a]] for a in arms}

    parts = [Part(RULES[0], paired_effect(by_seed(seeds, cosine["bn"]), by_seed(seeds, cosine["none"]))),
             Part(RULES[1], paired_effect(by_seed(seeds, acc["bn"]), by_seed(seeds, acc["noisy_bn"]), "points",
                                          RULES[1].bounds))]
    ics_gain, noise_cost = parts[0].effect.interval, parts[1].effect.interval
    smoother = Interval.of(log_mean_ci([n / b if b else math.nan
                                        for n, b in zip(loss_range["none"], loss_range["bn"])]), "×")

    table_rows = [[arm_label(a), f"{cfg['arms'][a]:g}", fmt_ci(mean_ci(acc[a]), 1), fmt_ci(mean_ci(shift[a]), 4),
                   fmt_ci(mean_ci(shift_std[a]), 4), fmt_ci(mean_ci(cosine[a]), 3), fmt_ci(mean_ci(distance[a]), 4),
                   fmt_ci(mean_ci(loss_range[a]), 4), fmt_ci(mean_ci(beta[a]), 2)] for a in arms]
    table = {"title": "Shift, gradient ICS and smoothness (ICS and smoothness at matched training loss)",
             "columns": ["arm", "lr", "test acc %", "|Δ mean| per step", "|Δ std| per step", "cos(G, G′)",
                         "‖G − G′‖", "loss range along −g", "effective β"],
             "rows": table_rows}
    explanation = (
        f"Distributional shift: the middle layer's input mean moves {fmt_ci(mean_ci(shift['noisy_bn']), 4)} per step "
        f"with noisy BN against {fmt_ci(mean_ci(shift['bn']), 4)} with BN, yet noisy BN reaches "
        f"{fmt_ci(mean_ci(acc['noisy_bn']), 1)}% test accuracy against BN's {fmt_ci(mean_ci(acc['bn']), 1)}% "
        f"(a cost of {noise_cost.text(1)}). Gradient ICS at matched training loss "
        f"({', '.join(f'{v:.3f}' for v in levels)}): cos(G, G′) is {fmt_ci(mean_ci(cosine['bn']), 3)} with BN and "
        f"{fmt_ci(mean_ci(cosine['none']), 3)} without (difference {ics_gain.text(3)}; higher means less ICS). "
        f"Smoothness: along the gradient the loss varies {smoother.text()} times more without BN than with it. "
        f"The literature expects BN not to reduce gradient ICS reliably, noisy BN to train about as well, and "
        f"smoothness to be the real difference.")
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING,
        verdict=Verdict.from_parts(parts, f"Δcos(G, G′) BN − none: {ics_gain.text(3)}; noisy-BN cost "
                                          f"{noise_cost.text(1)}", explanation), expected=EXPECTED,
        caveats=[f"{cfg['steps']} SGD steps of a width-{profile['width']} ResNet-{profile['depth']} on "
                 f"{profile['dataset']}; Santurkar et al. used VGG and deep linear nets on CIFAR-10.",
                 f"Gradient ICS is measured at {len(runs['bn'][0]['layers']) if runs['bn'] and runs['bn'][0] else 3} "
                 f"convolutions every {cfg['measure_every']} steps; other layers may behave differently.",
                 "The noise strength (shift, scale) is one choice; much stronger noise would eventually hurt."],
        tables=[table], figures=[_percentile_figure(runs), _ics_figure(runs)],
        numbers={"cos_gain": ics_gain.to_dict(), "noise_cost": noise_cost.to_dict(),
                 "smoothness_ratio": smoother.to_dict(), "levels": levels,
                 "parts": [p.to_dict() for p in parts]})


def _mean_change(values: list[float]) -> float:
    """Mean |step-to-step change| of a statistic recorded every step."""
    return float(np.mean(step_changes(values))) if len(values) > 1 else math.nan


def _percentile_figure(runs) -> dict:
    arms = list(runs)
    fig, axes = style.figure(ncols=len(arms))
    for ax, a in zip(axes, arms):
        rs = [r for r in runs[a] if r]
        if rs:
            n = min(len(r["dist"]["p50"]) for r in rs)
            for key, ls in (("p15", ":"), ("p50", "-"), ("p85", ":")):
                ax.plot(np.mean([r["dist"][key][:n] for r in rs], axis=0), ls=ls, color=style.arm_color(a),
                        label=f"{key[1:]}th percentile")
        ax.set_title(arm_label(a), fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("middle layer input")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return {"name": "claim1_percentiles", "title": "Distribution of a middle layer's inputs during training",
            "figure": fig, "caption": "15/50/85th percentiles at every step, mean over seeds."}


def _ics_figure(runs) -> dict:
    fig, (ax_cos, ax_dist, ax_range) = style.figure(ncols=3)
    for a, rs in runs.items():
        for j, r in enumerate(r for r in rs if r):
            label = arm_label(a) if j == 0 else None
            kw = dict(color=style.arm_color(a), marker="o", ms=2, lw=0.8, alpha=0.8, label=label)
            ax_cos.plot(r["ics"]["ema_loss"], [np.mean(c) for c in r["ics"]["cosine"]], **kw)
            ax_dist.plot(r["ics"]["ema_loss"], [np.mean(d) for d in r["ics"]["distance"]], **kw)
            ax_range.plot(r["smooth"]["ema_loss"], r["smooth"]["loss_range"], **kw)
    for ax, ylabel in ((ax_cos, "cos(G, G′)"), (ax_dist, "‖G − G′‖"), (ax_range, "loss range along −η·g")):
        ax.set_xlabel("training loss (EMA)")
        ax.set_ylabel(ylabel)
        ax.invert_xaxis()  # training proceeds left to right
        ax.grid(alpha=0.3)
    ax_dist.set_yscale("log")
    ax_range.set_yscale("log")
    ax_cos.legend(fontsize=7)
    fig.tight_layout()
    return {"name": "claim1_gradient_ics", "title": "Gradient ICS and smoothness against training loss",
            "figure": fig, "caption": "One line per seed; compare arms at the same training loss (x)."}
