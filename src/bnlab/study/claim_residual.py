"""Claim 5: "BN complements residual connections."

Two looks. At initialization, for several depths × {BN, none} × {residual, plain} plus SkipInit and
Fixup: signal-propagation curves per block (Brock et al. 2021), the branch-to-skip variance ratio
(De & Smith 2020 predict ≈ 1/ℓ at block ℓ with BN: BN biases residual blocks toward the identity) and
per-layer gradient norms. Then short training runs show which combinations still train as depth grows
(Yang et al. 2019: deep BN networks without skips have exploding gradients).
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.study import claim_lr
from bnlab.study.common import ARM_COLORS, arm_label, figure, final_acc, fmt_ci, lookup
from bnlab.study.metrics import mean_ci
from bnlab.study.specs import make_spec
from bnlab.study.verdict import ClaimResult, Interval, Verdict, clears, combine

NUMBER = 5
SLUG = "residual"
TITLE = "BN complements residual connections"
LITERATURE = ("He et al. 2016 (https://arxiv.org/abs/1512.03385): CIFAR-10 errors of BN ResNet-20/32/44/56/110 "
              "8.75/7.51/7.17/6.97/6.43%, while plain BN nets get worse with depth. De & Smith 2020 "
              "(https://arxiv.org/abs/2002.10444): BN scales the branch down by ≈√depth, biasing blocks to the "
              "identity; SkipInit recovers this without BN. Yang et al. 2019 "
              "(https://arxiv.org/abs/1902.08129): deep BN nets without skips have exploding gradients.")
COMPLEMENT_POINTS = 2.0  # BN+residual must beat the better of BN-plain and none-residual by > 2 points
IDENTITY_EXPONENT = -0.5  # Var(branch)/Var(skip) ∝ ℓ^k with BN: k must lie below −0.5 (De & Smith: k ≈ −1)
HE_ET_AL_ERRORS = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}  # CIFAR-10 test error %, Table 6
ARMS = [("bn", False), ("bn", True), ("none", False), ("none", True), ("skipinit", False), ("fixup", False)]
FINDING = ("He et al. 2016, De & Smith 2020: BN ResNets train at depth, plain ones degrade; BN biases blocks "
           "to the identity (supported)")
RULE = (f"Part 1 (complement): at the deepest trained depth, each arm at its best learning rate, the 95% CI of "
        f"(test accuracy of BN+residual − the better of BN-plain and none-residual) lies above "
        f"{COMPLEMENT_POINTS} points. Part 2 (mechanism): at initialization in the deepest network, the slope k "
        f"of log(Var branch / Var skip) against log(block index) for BN+residual has its CI below "
        f"{IDENTITY_EXPONENT}. Both → supported; part 1 fails → not supported; otherwise supported with caveats.")


def _signal_spec(profile, depth, norm, plain, seed) -> dict:
    cfg = profile["residual"]
    return make_spec("signal", dataset=profile["dataset"], device=profile.get("device", "cpu"),
                     width=profile["width"], depth=depth, norm=norm, plain=plain,
                     batch_size=cfg["signal_batch"], seed=seed)


def _train_spec(profile, depth, norm, plain, lr, seed) -> dict:
    """Claim 4's sweep run at another depth and/or without shortcuts: at the profile's depth with
    shortcuts it *is* claim 4's run, so it runs once for both claims."""
    spec = claim_lr.sweep_spec(profile, norm, lr, profile["lr"]["batch_sizes"][0], seed)
    spec["depth"] = depth
    if plain:
        spec["plain"] = True
    return spec


def specs(profile: dict) -> list[dict]:
    cfg, seeds = profile["residual"], profile["seeds"]
    out = [_signal_spec(profile, d, n, p, s) for d in cfg["signal_depths"] for n, p in ARMS for s in seeds]
    out += [_train_spec(profile, d, n, p, lr, s) for d in cfg["train_depths"] for n, p in ARMS
            for lr in cfg["lrs"] for s in seeds]
    return out


def _exponent(blocks: list[dict]) -> float:
    """Least-squares slope of log(ratio) against log(block index ℓ = 1, 2, …)."""
    points = [(math.log(i + 1), math.log(b["ratio"])) for i, b in enumerate(blocks)
              if b.get("ratio") is not None and math.isfinite(b["ratio"]) and b["ratio"] > 0]
    if len(points) < 2:
        return math.nan
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def _trained(profile, results, depth, norm, plain) -> tuple[float, list[float]]:
    """(best lr, per-seed final accuracy at it) for one arm at one depth."""
    cfg, seeds = profile["residual"], profile["seeds"]
    per_lr = {lr: [final_acc(lookup(results, _train_spec(profile, depth, norm, plain, lr, s))) for s in seeds]
              for lr in cfg["lrs"]}
    best = max(cfg["lrs"], key=lambda lr: np.nanmean(per_lr[lr]) if not all(map(math.isnan, per_lr[lr])) else -1)
    return best, per_lr[best]


def analyze(profile: dict, results: dict) -> ClaimResult:
    cfg, seeds = profile["residual"], profile["seeds"]
    signal = {(d, n, p): [lookup(results, _signal_spec(profile, d, n, p, s)) for s in seeds]
              for d in cfg["signal_depths"] for n, p in ARMS}
    exponents = {(d, n, p): [_exponent(r["result"]["blocks"]) if r else math.nan for r in rows]
                 for (d, n, p), rows in signal.items() if not p}
    deepest_signal = max(cfg["signal_depths"])
    bn_exponent = Interval.of(mean_ci(exponents[(deepest_signal, "bn", False)]), "")
    trained = {(d, n, p): _trained(profile, results, d, n, p) for d in cfg["train_depths"] for n, p in ARMS}
    deepest = max(cfg["train_depths"])
    bn_res = trained[(deepest, "bn", False)][1]
    bn_plain, none_res = trained[(deepest, "bn", True)][1], trained[(deepest, "none", False)][1]
    rival = "BN-plain" if np.nanmean(bn_plain) >= np.nanmean(none_res) else "none-residual"
    rival_acc = bn_plain if rival == "BN-plain" else none_res
    complement = Interval.of(mean_ci([a - b for a, b in zip(bn_res, rival_acc)]), "points")
    part1 = clears(complement, COMPLEMENT_POINTS)
    part2 = None if not math.isfinite(bn_exponent.high) else (
        True if bn_exponent.high < IDENTITY_EXPONENT else (False if bn_exponent.low >= IDENTITY_EXPONENT else None))
    verdict = combine(part1, part2)

    acc_rows = []
    for n, p in ARMS:
        cells = [f"{fmt_ci(mean_ci(trained[(d, n, p)][1]), 1)} (lr {trained[(d, n, p)][0]:g})"
                 for d in cfg["train_depths"]]
        acc_rows.append([arm_label(n, p)] + cells)
    acc_table = {"title": "Final test accuracy (%) by depth, each arm at its best learning rate",
                 "columns": ["arm"] + [f"depth {d}" for d in cfg["train_depths"]], "rows": acc_rows}
    sig_rows = []
    for n, p in ARMS:
        row = [arm_label(n, p)]
        for d in cfg["signal_depths"]:
            rows = [r for r in signal[(d, n, p)] if r]
            last_var = [r["result"]["blocks"][-1].get("stream_var", math.nan) for r in rows]
            grads = [r["result"]["grad_norms"] for r in rows]
            spread = [g[0] / g[-2] if len(g) > 1 and g[-2] > 0 else math.nan for g in grads]
            row.append(f"{_g(last_var)} / {_g(spread)}")
        sig_rows.append(row)
    sig_table = {"title": "At initialization: variance of the residual stream after the last block / gradient "
                          "norm of the first conv ÷ the last conv (n/a: the last conv starts with zero gradient, "
                          "as in SkipInit and Fixup)",
                 "columns": ["arm"] + [f"depth {d}" for d in cfg["signal_depths"]], "rows": sig_rows}
    anchor_rows = []
    for depth in sorted(set(HE_ET_AL_ERRORS) | set(cfg["train_depths"])):
        ours = mean_ci([100 - a for a in trained[(depth, "bn", False)][1]]) if depth in cfg["train_depths"] else None
        anchor_rows.append([depth, f"{HE_ET_AL_ERRORS[depth]:.2f}" if depth in HE_ET_AL_ERRORS else "—",
                            fmt_ci(ours, 1) if ours else "—"])
    anchor_table = {"title": f"Anchor: test error (%) of BN ResNets, He et al. 2016 on CIFAR-10 (full training) vs "
                             f"ours on {profile['dataset']} (short training)",
                    "columns": ["depth", "He et al. 2016", "this run"], "rows": anchor_rows}
    other = {a: mean_ci(trained[(deepest, a, False)][1]) for a in ("skipinit", "fixup")}
    explanation = (
        f"At depth {deepest}, BN with residual connections reaches {fmt_ci(mean_ci(bn_res), 1)}% test accuracy, "
        f"BN without them {fmt_ci(mean_ci(bn_plain), 1)}% and residual without BN {fmt_ci(mean_ci(none_res), 1)}%: "
        f"BN+residual beats the better alternative ({rival}) by {complement.text(1)}. At initialization in "
        f"the {deepest_signal}-layer BN ResNet the branch-to-skip variance ratio falls as ℓ^k with k = "
        f"{bn_exponent.text()} (De & Smith predict k ≈ −1: blocks biased toward the identity); without BN k = "
        f"{fmt_ci(mean_ci(exponents[(deepest_signal, 'none', False)]), 2)}. SkipInit reaches "
        f"{fmt_ci(other['skipinit'], 1)}% and Fixup {fmt_ci(other['fixup'], 1)}% at depth {deepest} without "
        f"normalization — if they match BN, the residual connection needs a down-scaled branch, not BN as such.")
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING,
        verdict=Verdict(verdict, f"BN+residual − best alternative at depth {deepest}: {complement.text(1)}",
                        complement, explanation),
        agrees_with_literature=verdict == "supported",
        caveats=[f"Short training (claim 4's budget) at depths {cfg['train_depths']}, not CIFAR-10 to "
                 f"convergence; He et al.'s depth trend (8.75% → 6.43% error from 20 to 110 layers) needs far "
                 f"longer training to show.",
                 "The width is reduced; narrow networks propagate signals more noisily.",
                 f"One learning-rate grid ({cfg['lrs']}) for every arm: plain deep nets may train at rates "
                 f"outside it."],
        tables=[acc_table, sig_table, anchor_table],
        figures=[_signal_figure(profile, signal, deepest_signal), _depth_figure(profile, trained)],
        numbers={"complement": complement.to_dict(), "bn_ratio_exponent": bn_exponent.to_dict(),
                 "part1": part1, "part2": part2})


def _g(values) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return f"{float(np.mean(finite)):.3g}" if finite else "n/a"


def _signal_figure(profile, signal, depth) -> dict:
    fig, (ax_mean, ax_var, ax_ratio, ax_grad) = figure(width=3.6, ncols=4)
    for n, p in ARMS:
        rows = [r for r in signal[(depth, n, p)] if r]
        if not rows:
            continue
        color, ls = ARM_COLORS.get(n), "--" if p else "-"
        blocks = [r["result"]["blocks"] for r in rows]
        idx = np.arange(1, len(blocks[0]) + 1)
        var = np.nanmean([[b.get("stream_var", math.nan) for b in bl] for bl in blocks], axis=0)
        sq_mean = np.nanmean([[b.get("stream_sq_mean", math.nan) for b in bl] for bl in blocks], axis=0)
        ax_mean.plot(idx, sq_mean, color=color, ls=ls, label=arm_label(n, p))
        ax_var.plot(idx, var, color=color, ls=ls)
        if not p:
            ratio = np.nanmean([[b["ratio"] if b.get("ratio") is not None else math.nan for b in bl]
                                for bl in blocks], axis=0)
            ax_ratio.plot(idx, ratio, color=color, label=arm_label(n, p))
        grads = np.nanmean([r["result"]["grad_norms"] for r in rows], axis=0)
        ax_grad.plot(np.arange(1, len(grads) + 1), grads, color=color, ls=ls)
    ax_ratio.plot(idx, 1 / idx, color="k", lw=0.8, ls=":", label="1/ℓ (De & Smith)")
    for ax, title, ylabel in ((ax_mean, "residual stream", "avg channel squared mean"),
                              (ax_var, "residual stream", "avg channel variance"),
                              (ax_ratio, "branch / skip", "Var(branch)/Var(skip)"),
                              (ax_grad, "gradients", "‖∂L/∂W‖ per layer")):
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("block ℓ" if ax is not ax_grad else "layer (forward order)")
        ax.grid(alpha=0.3)
    ax_mean.legend(fontsize=6)
    ax_ratio.legend(fontsize=6)
    fig.tight_layout()
    return {"name": "claim5_signal_propagation", "title": f"Signal propagation at initialization, depth {depth}",
            "figure": fig, "caption": "Mean over seeds of one training-mode batch; dashed lines are plain networks. "
                       "SkipInit and Fixup start with zero branches: their ratio and most branch "
                       "gradients are 0 and do not show on the log scales."}


def _depth_figure(profile, trained) -> dict:
    depths = profile["residual"]["train_depths"]
    fig, axes = figure()
    ax = axes[0]
    for n, p in ARMS:
        stats = [mean_ci(trained[(d, n, p)][1]) for d in depths]
        errors = [[m - lo for m, lo, _ in stats], [hi - m for m, _, hi in stats]]
        ax.errorbar(depths, [m for m, _, _ in stats], yerr=errors,
                    marker="o", ms=3, capsize=2, color=ARM_COLORS.get(n), ls="--" if p else "-", label=arm_label(n, p))
    ax.set_xlabel("depth")
    ax.set_ylabel("final test accuracy (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return {"name": "claim5_depth", "title": "Which combinations still train as depth grows", "figure": fig,
            "caption": "Each arm at its best learning rate from the grid; mean over seeds with 95% CI."}
