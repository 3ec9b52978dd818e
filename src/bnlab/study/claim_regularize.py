"""Claim 3: "BN regularizes."

A small-data regime where overfitting shows (a 1,000-example training subset). Arms: BN whose
statistics come from ghost batches of several sizes (smaller → noisier statistics), BN whose statistics
are frozen after a warm-up (no batch noise at all), no normalization, and SkipInit with and without
weight decay (an unnormalized net with an explicit regularizer). The measure is the generalization gap
(train − test accuracy; test − train loss) at a *matched training loss*, so an arm that simply fits less
is not credited with regularizing.
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.study.common import ARM_COLORS, arm_label, figure, fmt_ci, lookup, train_spec
from bnlab.study.metrics import first_index_at_or_below, mean_ci
from bnlab.study.verdict import ClaimResult, Interval, Verdict, clears, combine

NUMBER = 3
SLUG = "regularize"
TITLE = "BN regularizes"
LITERATURE = ("Ioffe & Szegedy 2015 reduced dropout thanks to BN; Luo et al. 2019 "
              "(https://arxiv.org/abs/1809.00846) trace the effect to the noise of batch statistics, and "
              "Hoffer et al. 2017 (https://arxiv.org/abs/1705.08741) show smaller ghost batches generalize "
              "better. Zhang et al. 2019 (Fixup) match BN's test error only once extra regularization is added.")
GAP_REDUCTION = 1.0  # BN's accuracy gap must be > 1 point smaller than none's
FINDING = ("Luo et al. 2019, Hoffer et al. 2017: batch noise regularizes, smaller ghost batches generalize "
           "better (supported)")
RULE = (f"Two runs of one seed are compared at the lowest training loss both reach (measured on the whole "
        f"training subset in eval mode); the accuracy gap = train − test accuracy (points). Part 1 holds when "
        f"the 95% CI of (gap none − gap BN), with BN at the full batch, lies above {GAP_REDUCTION} point; "
        f"part 2 (the mechanism is batch noise) when the CI of (gap with the largest ghost batch − gap with the "
        f"smallest) lies above 0. Both → supported; part 1 fails → not supported; otherwise supported with "
        f"caveats.")


def arms(profile: dict) -> list[tuple[str, str, float]]:
    """(label key, norm, weight decay) per arm."""
    cfg = profile["regularize"]
    wd = cfg["weight_decay"]
    return ([(f"ghost:{g}", f"ghost:{g}", 0.0) for g in cfg["ghost_sizes"]]
            + [("frozen_bn", "frozen_bn", 0.0), ("none", "none", 0.0), ("skipinit", "skipinit", 0.0),
               ("skipinit+wd", "skipinit", wd)])


def _spec(profile, norm, weight_decay, seed) -> dict:
    cfg = profile["regularize"]
    fields = {"dataset": cfg.get("dataset") or profile["dataset"], "subset": cfg["subset"], "norm": norm,
              "lr": cfg["lr"], "batch_size": cfg["batch_size"], "max_steps": cfg["max_steps"],
              "epochs": 10 ** 6, "weight_decay": weight_decay, "seed": seed, "train_eval_size": cfg["subset"]}
    if norm == "frozen_bn":
        fields["freeze_after"] = cfg["freeze_after"]
    if cfg.get("eval_every"):  # both training-set and test-set evaluations: every few steps is plenty
        fields["eval_every"] = cfg["eval_every"]
    if cfg.get("test_eval_size"):
        fields["test_eval_size"] = cfg["test_eval_size"]
    return train_spec(profile, **fields)


def specs(profile: dict) -> list[dict]:
    return [_spec(profile, norm, wd, s) for _, norm, wd in arms(profile) for s in profile["seeds"]]


def _label(key: str) -> str:
    return "SkipInit + weight decay" if key == "skipinit+wd" else arm_label(key)


def analyze(profile: dict, results: dict) -> ClaimResult:
    cfg, seeds = profile["regularize"], profile["seeds"]
    rows = {key: [lookup(results, _spec(profile, norm, wd, s)) for s in seeds] for key, norm, wd in arms(profile)}
    curves = {key: [((r or {}).get("result") or {}).get("curve", {}) for r in rs] for key, rs in rows.items()}
    ghost = [f"ghost:{g}" for g in cfg["ghost_sizes"]]
    full = ghost[-1]
    paired = {key: _paired(curves[key], curves[full]) for key in curves}
    reduction = Interval.of(mean_ci(_differences(paired["none"])), "points")
    noise = Interval.of(mean_ci(_differences(_paired(curves[full], curves[ghost[0]]))), "points")
    frozen = Interval.of(mean_ci(_differences(paired["frozen_bn"])), "points")
    part1, part2 = clears(reduction, GAP_REDUCTION), clears(noise, 0.0)
    verdict = combine(part1, part2)
    final_gap = {key: [100 * (_num(c["train_acc"][-1]) - _num(c["test_acc"][-1])) if c.get("step") else math.nan
                       for c in cs] for key, cs in curves.items()}

    table_rows = [[_label(k), fmt_ci(mean_ci(p["level"]), 3), fmt_ci(mean_ci(p["acc_gap"]), 1),
                   fmt_ci(mean_ci(p["ref_gap"]), 1), fmt_ci(mean_ci(p["loss_gap"]), 3),
                   fmt_ci(mean_ci(p["test_acc"]), 1), fmt_ci(mean_ci(final_gap[k]), 1)] for k, p in paired.items()]
    table = {"title": f"Generalization gap, each arm at the training loss it and BN ({_label(full)}) both reach",
             "columns": ["arm", "matched training loss", "train − test acc (points)", "BN's gap at that loss",
                         "test − train loss", "test acc %", "gap at end of training (points)"],
             "rows": table_rows}
    wd_effect = mean_ci(_differences(_paired(curves["skipinit"], curves["skipinit+wd"])))
    explanation = (
        f"At the training loss both reach ({fmt_ci(mean_ci(paired['none']['level']), 3)}), the unnormalized "
        f"network's accuracy gap is {fmt_ci(mean_ci(paired['none']['acc_gap']), 1)} points and full-batch BN's "
        f"{fmt_ci(mean_ci(paired['none']['ref_gap']), 1)}: BN shrinks it by {reduction.text(1)}. Going from ghost "
        f"batches of {cfg['ghost_sizes'][-1]} to {cfg['ghost_sizes'][0]} (noisier statistics) shrinks the gap by "
        f"{noise.text(1)}; freezing the statistics after {cfg['freeze_after']} steps changes it by "
        f"{frozen.text(1)} relative to BN. Weight decay shrinks SkipInit's gap by {fmt_ci(wd_effect, 1)} points, "
        f"for comparison with an explicit regularizer. At the end of training the gaps are "
        f"{fmt_ci(mean_ci(final_gap[full]), 1)} (BN) and {fmt_ci(mean_ci(final_gap['none']), 1)} (none) points.")
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING,
        verdict=Verdict(verdict, f"gap reduction none − BN: {reduction.text(1)}", reduction, explanation),
        agrees_with_literature=verdict in ("supported", "supported with caveats"),
        caveats=[f"{cfg['subset']} training examples of {cfg.get('dataset') or profile['dataset']}, "
                 f"{cfg['max_steps']} steps at lr {cfg['lr']}, one learning rate for every arm: an arm tuned "
                 f"separately could fit differently.",
                 "Short runs stop before the strongest overfitting; the end-of-training gap is reported beside "
                 "the matched one.",
                 "Data augmentation, dropout or longer training would change the size of every gap."],
        tables=[table], figures=[_gap_figure(profile, paired, ghost), _curves_figure(curves)],
        numbers={"gap_reduction": reduction.to_dict(), "noise_effect": noise.to_dict(),
                 "frozen_minus_bn": frozen.to_dict()})


def _num(v) -> float:
    return math.nan if v is None else float(v)


def _lowest(curve: dict) -> float:
    values = [v for v in curve.get("train_loss", []) if v is not None]
    return min(values) if values else math.nan


def _gap_at(curve: dict, level: float) -> tuple[float, float, float]:
    """(train − test accuracy in points, test − train loss, test accuracy %) where the run first reaches
    training loss ``level`` (its last evaluation if it never does)."""
    if not curve.get("step") or not math.isfinite(level):
        return math.nan, math.nan, math.nan
    i = first_index_at_or_below(curve["train_loss"], level)
    i = len(curve["step"]) - 1 if i is None else i
    return (100 * (_num(curve["train_acc"][i]) - _num(curve["test_acc"][i])),
            _num(curve["test_loss"][i]) - _num(curve["train_loss"][i]), 100 * _num(curve["test_acc"][i]))


def _paired(curves: list[dict], reference: list[dict]) -> dict:
    """Per seed, both runs at the lowest training loss *both* reach (the higher of their two minima): an
    arm that fits less is compared with the reference where the reference had fitted as little."""
    out = {"level": [], "acc_gap": [], "loss_gap": [], "test_acc": [], "ref_gap": []}
    for curve, ref in zip(curves, reference):
        level = max(_lowest(curve), _lowest(ref))
        acc_gap, loss_gap, test_acc = _gap_at(curve, level)
        for key, value in (("level", level), ("acc_gap", acc_gap), ("loss_gap", loss_gap),
                           ("test_acc", test_acc), ("ref_gap", _gap_at(ref, level)[0])):
            out[key].append(value)
    return out


def _differences(pair: dict) -> list[float]:
    return [a - b for a, b in zip(pair["acc_gap"], pair["ref_gap"])]


def _gap_figure(profile, gaps, ghost) -> dict:
    """Gap against ghost batch size; each arm measured at the loss it and full-batch BN both reach."""
    sizes = profile["regularize"]["ghost_sizes"]
    fig, axes = figure()
    ax = axes[0]
    stats = [mean_ci(gaps[g]["acc_gap"]) for g in ghost]
    ax.errorbar(sizes, [m for m, _, _ in stats], yerr=[[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]],
                marker="o", capsize=3, color="tab:blue", label="BN, ghost batch size")
    for key, style in (("frozen_bn", ":"), ("none", "--"), ("skipinit", "-."), ("skipinit+wd", (0, (1, 3)))):
        m, lo, hi = mean_ci(gaps[key]["acc_gap"])
        if math.isfinite(m):
            color = ARM_COLORS.get(key.split("+")[0])
            ax.axhline(m, ls=style, color=color if key != "skipinit+wd" else "darkgreen", label=_label(key))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("ghost batch size (examples per statistics)")
    ax.set_ylabel("train − test accuracy (points)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return {"name": "claim3_gap_vs_ghost", "title": "Generalization gap at matched training loss",
            "figure": fig, "caption": "Each arm at the training loss it and full-batch BN both reach; mean over "
                                      "seeds with 95% CI; horizontal lines are the other arms' means."}


def _curves_figure(curves) -> dict:
    fig, (ax_train, ax_test) = figure(ncols=2)
    for key, cs in curves.items():
        cs = [c for c in cs if c.get("step")]
        if not cs:
            continue
        n = min(len(c["step"]) for c in cs)
        color = ARM_COLORS.get(key.split("+")[0]) if not key.startswith("ghost") else None
        for ax, name in ((ax_train, "train_loss"), (ax_test, "test_acc")):
            values = np.nanmean([[_num(v) for v in c[name][:n]] for c in cs], axis=0)
            ax.plot(cs[0]["step"][:n], values * (100 if name == "test_acc" else 1), label=_label(key), color=color,
                    ls="--" if key == "skipinit+wd" else "-")
    ax_train.set_yscale("log")
    ax_train.set_ylabel("training loss (full subset, eval mode)")
    ax_test.set_ylabel("test accuracy (%)")
    for ax in (ax_train, ax_test):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax_test.legend(fontsize=7)
    fig.tight_layout()
    return {"name": "claim3_curves", "title": "Training loss and test accuracy per arm", "figure": fig,
            "caption": "Mean over seeds."}
