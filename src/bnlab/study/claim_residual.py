"""Claim 5: "BN complements residual connections."

A 2×2 factorial, BN/none × residual/plain, trained at two or more depths with three or more learning
rates per cell (each cell at the rate its validation accuracy chose). "Complements" is the BN × residual
*interaction*: per seed, (BN+residual − none+residual) − (BN+plain − none+plain) in test accuracy, at
the deepest trained depth (where He et al. and Yang et al. see the effect). The mechanism part looks at
initialization (Brock et al. 2021, De & Smith 2020): with BN the branch-to-skip variance ratio falls
with block index ℓ roughly as 1/ℓ (blocks biased to the identity), without BN it does not; SkipInit
and Fixup are drawn beside them.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from bnlab.study import claim_lr, style
from bnlab.study.common import (analyze as _analyze, arm_label, by_seed, data_fields, dataset_label, final_pct,
                                fmt_ci, lookup, mean_ci, paper_table, tuned, tuning_caveat)
from bnlab.study.kinds import SIGNAL
from bnlab.study.verdict import SUPPORTED, ClaimResult, Part, Rule, Verdict, paired_effect

NUMBER = 5
SLUG = "residual"
TITLE = "BN complements residual connections"
LITERATURE = ("He et al. 2016 (https://arxiv.org/abs/1512.03385): CIFAR-10 errors of BN ResNet-20/32/44/56/110 "
              "8.75/7.51/7.17/6.97/6.43%, while plain BN nets get worse with depth. De & Smith 2020 "
              "(https://arxiv.org/abs/2002.10444): BN scales the branch down by ≈√depth, biasing blocks to the "
              "identity; SkipInit recovers this without BN. Yang et al. 2019 "
              "(https://arxiv.org/abs/1902.08129): deep BN nets without skips have exploding gradients.")
FINDING = ("He et al. 2016, De & Smith 2020: BN ResNets train at depth, plain ones degrade; BN biases blocks "
           "to the identity (supported)")
EXPECTED = SUPPORTED
RULES = [
    Rule("BN × residual interaction", "(BN+res − none+res) − (BN+plain − none+plain) in test accuracy at the "
         "deepest trained depth, each cell at its validated rate", threshold=2.0, margin=1.0, unit="points",
         bounds=(-200.0, 200.0)),
    Rule("blocks biased to the identity", "k(none) − k(BN), k the slope of log(Var branch / Var skip) against "
         "log(block index) at initialization in the deepest network", threshold=0.5, margin=0.2),
]
RULE = " ".join(f"Part {i + 1}, {r.text()}." for i, r in enumerate(RULES))
HE_ET_AL_ERRORS = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43}  # CIFAR-10 test error %, Table 6
HE_SETTING = ("CIFAR-10, 64k iterations (≈ 164 epochs; the stopping point chosen on a 45k/5k split), lr 0.1 "
              "divided by 10 at 32k and 48k, batch 128, weight decay 1e-4, momentum 0.9, flip-and-crop augmentation")
PAPER = [{"quantity": f"test error % of the BN ResNet-{d}", "paper": "He et al. 2016, Table 6", "value": f"{e:.2f}",
          "setting": HE_SETTING, "ours_key": f"error@{d}"} for d, e in HE_ET_AL_ERRORS.items()] + [
    {"quantity": "test error % of the deepest BN plain net − of the shallowest", "paper": "He et al. 2016, Fig. 6",
     "value": "> 0 (plain nets get worse with depth; plotted, no table)", "setting": HE_SETTING,
     "ours_key": "plain_degradation"}]
CELLS = [("bn", False), ("bn", True), ("none", False), ("none", True)]
SIGNAL_ARMS = CELLS + [("skipinit", False), ("fixup", False)]


def _depths(depths):
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ValueError(f"depths must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {bad}")
    return depths


class Config(BaseModel):
    """The ``residual`` section."""

    model_config = ConfigDict(extra="forbid")
    signal_depths: list[PositiveInt] = Field(min_length=1)
    train_depths: list[PositiveInt] = Field(min_length=2)
    signal_batch: PositiveInt
    lrs: list[PositiveFloat] = Field(min_length=3)

    _check_signal = field_validator("signal_depths")(classmethod(lambda cls, v: _depths(v)))
    _check_train = field_validator("train_depths")(classmethod(lambda cls, v: _depths(v)))


PRESETS = {
    "tiny": {"signal_depths": [8, 14], "train_depths": [8, 14], "signal_batch": 64, "lrs": [0.01, 0.1, 1.0]},
    "quick": {"signal_depths": [8, 20, 56], "train_depths": [8, 14], "signal_batch": 64,
              "lrs": [0.03, 0.1, 0.3]},
    "standard": {"signal_depths": [8, 20, 56, 110, 218], "train_depths": [8, 20, 44], "signal_batch": 256,
                 "lrs": [0.01, 0.03, 0.1, 0.3, 1.0]},
    # He et al.'s CIFAR-10 depths; rates around their 0.1 (with claim 4's batch 128, weight decay and momentum)
    "full": {"signal_depths": [20, 56, 110, 218, 434], "train_depths": [20, 32, 44, 56, 110], "signal_batch": 256,
             "lrs": [0.03, 0.1, 0.3]},
}


def _signal_spec(profile, depth, norm, plain, seed) -> dict:
    cfg = profile["residual"]
    return SIGNAL.spec(**data_fields(profile), device=profile.get("device", "cpu"), width=profile["width"],
                       depth=depth, norm=norm, plain=plain, batch_size=cfg["signal_batch"], seed=seed)


def _train_spec(profile, depth, norm, plain, lr, seed) -> dict:
    """Claim 4's sweep run at another depth and/or without shortcuts: at the profile's depth with
    shortcuts it *is* claim 4's run, so it runs once for both claims."""
    spec = claim_lr.sweep_spec(profile, norm, lr, profile["lr"]["batch_sizes"][0], seed)
    spec["depth"] = depth
    if plain:
        spec["plain"] = True
    return spec


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    cfg, seeds = profile["residual"], profile["seeds"]
    out = [_signal_spec(profile, d, n, p, s) for d in cfg["signal_depths"] for n, p in SIGNAL_ARMS for s in seeds]
    return out + [spec for d in cfg["train_depths"] for n, p in CELLS for spec in _tuned(profile, results, d, n, p)[0]]


def _tuned(profile: dict, results: Optional[dict], depth: int, norm: str, plain: bool):
    """A cell's rates on the tuning seeds, then its validated rate on the other seeds."""
    return tuned(profile, results, profile["residual"]["lrs"],
                 lambda lr, s: _train_spec(profile, depth, norm, plain, lr, s))


specs = measure


def _exponent(blocks: list[dict]) -> float:
    """Least-squares slope of log(ratio) against log(block index ℓ = 1, 2, …)."""
    points = [(math.log(i + 1), math.log(b["ratio"])) for i, b in enumerate(blocks)
              if b.get("ratio") is not None and math.isfinite(b["ratio"]) and b["ratio"] > 0]
    if len(points) < 2:
        return math.nan
    x, y = np.array(points).T
    return float(np.polyfit(x, y, 1)[0])


def _cell(profile, results, depth, norm, plain) -> tuple[Optional[float], list[float]]:
    """(validated lr, per-seed final test accuracy at it) for one cell at one depth."""
    lr = _tuned(profile, results, depth, norm, plain)[1]
    return lr, [final_pct(lookup(results, _train_spec(profile, depth, norm, plain, lr, s)), "test_acc")
                if lr is not None else math.nan for s in profile["seeds"]]


def decide(profile: dict, results: dict) -> tuple[list[Part], dict]:
    cfg, seeds = profile["residual"], profile["seeds"]
    trained = {(d, n, p): _cell(profile, results, d, n, p) for d in cfg["train_depths"] for n, p in CELLS}
    deepest = max(cfg["train_depths"])
    acc = {(n, p): trained[(deepest, n, p)][1] for n, p in CELLS}
    with_res = by_seed(seeds, [a - b for a, b in zip(acc[("bn", False)], acc[("none", False)])])
    plain = by_seed(seeds, [a - b for a, b in zip(acc[("bn", True)], acc[("none", True)])])
    signal = {(d, n, p): [lookup(results, _signal_spec(profile, d, n, p, s)) for s in seeds]
              for d in cfg["signal_depths"] for n, p in SIGNAL_ARMS}
    deepest_signal = max(cfg["signal_depths"])
    exponents = {(d, n): [_exponent(r["result"]["blocks"]) if r else math.nan for r in signal[(d, n, False)]]
                 for d in cfg["signal_depths"] for n, _ in SIGNAL_ARMS}
    parts = [Part(RULES[0], paired_effect(with_res, plain, "points", RULES[0].bounds)),
             Part(RULES[1], paired_effect(by_seed(seeds, exponents[(deepest_signal, "none")]),
                                          by_seed(seeds, exponents[(deepest_signal, "bn")])))]
    return parts, {"trained": trained, "deepest": deepest, "signal": signal, "deepest_signal": deepest_signal,
                   "exponents": exponents}


def render(profile: dict, results: dict, parts: list[Part], facts: dict) -> ClaimResult:
    cfg = profile["residual"]
    trained, deepest, signal = facts["trained"], facts["deepest"], facts["signal"]
    acc_rows = [[arm_label(n, p)] + [f"{fmt_ci(mean_ci(trained[(d, n, p)][1], (0, 100)), 1)} (lr "
                                     f"{trained[(d, n, p)][0] if trained[(d, n, p)][0] is not None else 'n/a'})"
                                     for d in cfg["train_depths"]] for n, p in CELLS]
    acc_table = {"title": "Test accuracy (%) by depth, each cell at its validated learning rate",
                 "columns": ["cell"] + [f"depth {d}" for d in cfg["train_depths"]], "rows": acc_rows}
    sig_rows = []
    for n, p in SIGNAL_ARMS:
        row = [arm_label(n, p)]
        for d in cfg["signal_depths"]:
            rows = [r for r in signal[(d, n, p)] if r]
            last_var = [r["result"]["blocks"][-1].get("stream_var", math.nan) for r in rows]
            k = facts["exponents"].get((d, n), []) if not p else []
            row.append(f"{_g(last_var)} / " + (fmt_ci(mean_ci(k), 2) if k else "—"))
        sig_rows.append(row)
    sig_table = {"title": "At initialization: variance of the residual stream after the last block / slope k of "
                          "log(Var branch / Var skip) against log(block index)",
                 "columns": ["arm"] + [f"depth {d}" for d in cfg["signal_depths"]], "rows": sig_rows}
    edge = [f"{arm_label(n, p)} at depth {d} ({lr:g})" for (d, n, p), (lr, _) in trained.items()
            if lr is not None and lr in (min(cfg["lrs"]), max(cfg["lrs"]))]
    explanation = (f"{parts[0].text(1)}. {parts[1].text()}. " + (
        f"Validated rates at the edge of the grid (a wider grid might move them): {', '.join(edge)}. " if edge else "")
        + f"We take the interaction at the deepest trained depth "
                   f"({deepest}), where the literature says the complement matters most; the table shows every "
                   f"depth. De & Smith predict k ≈ −1 with BN and k ≈ 0 without.")
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        verdict=Verdict.from_parts(parts, f"BN × residual interaction at depth {deepest}: "
                                          f"{parts[0].effect.interval.text(1)}", explanation),
        caveats=[tuning_caveat(profile),
                 f"Depths {cfg['train_depths']} of a width-{profile['width']} ResNet on {dataset_label(profile)} "
                 f"trained with claim 4's budget, where He et al. train CIFAR ResNets to depth 110 to convergence: the "
                 f"2×2 factorial needs every cell at several rates, which at full depth would not fit the budget.",
                 "The width is reduced; narrow networks propagate signals more noisily.",
                 f"Each cell chooses among {len(cfg['lrs'])} rates ({cfg['lrs']}); a plain deep net might prefer a "
                 f"rate outside them."],
        tables=[acc_table, sig_table, paper_table(PAPER, _ours(profile, trained))],
        figures=[_signal_figure(profile, signal, facts["deepest_signal"]), _depth_figure(profile, trained)],
        numbers={"interaction": parts[0].effect.interval.to_dict(), "exponent_gap": parts[1].effect.interval.to_dict(),
                 "parts": [p.to_dict() for p in parts]})


def _ours(profile: dict, trained: dict) -> dict:
    """Our numbers for :data:`PAPER`'s quantities (test error = 100 − test accuracy, mean [95% CI] over
    seeds, each cell at its validated rate), each with our setting in words."""
    cfg, sweep = profile["residual"], profile["lr"]
    budget = f"{sweep['epochs']} epochs" if sweep.get("epochs") else f"{sweep.get('max_steps')} steps"
    setting = (f"{dataset_label(profile)}, width {profile['width']:g}, {budget} one-cycle at the validated rate among "
               f"{cfg['lrs']}, batch {sweep['batch_sizes'][0]}, weight decay {sweep.get('weight_decay', 0.0):g}, "
               f"Nesterov momentum {sweep.get('momentum', 0.9):g}, {profile['val_size']} held out, no augmentation")

    def error(depth, plain):
        lr, acc = trained[(depth, "bn", plain)]
        return [100 - a for a in acc], lr
    out = {}
    for depth in cfg["train_depths"]:
        values, lr = error(depth, False)
        out[f"error@{depth}"] = (f"{fmt_ci(mean_ci(values, (0, 100)), 2)} at lr {lr if lr is not None else 'n/a'}",
                                 setting)
    deep, shallow = max(cfg["train_depths"]), min(cfg["train_depths"])
    gap = mean_ci([d - s for d, s in zip(error(deep, True)[0], error(shallow, True)[0])], (-100, 100))
    out["plain_degradation"] = (f"{fmt_ci(gap, 2)} (depth {deep} − depth {shallow}, paired by seed)", setting)
    return out


def analyze(profile: dict, results: dict) -> ClaimResult:
    import sys
    return _analyze(sys.modules[__name__], profile, results)


def _g(values) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return f"{float(np.mean(finite)):.3g}" if finite else "n/a"


def _signal_figure(profile, signal, depth) -> dict:
    fig, axes = style.figure(ncols=4, width=3.4)
    ax_mean, ax_var, ax_ratio, ax_grad = axes
    idx = np.arange(1, 2)
    for n, p in SIGNAL_ARMS:
        rows = [r for r in signal[(depth, n, p)] if r]
        if not rows:
            continue
        color, ls = style.arm_color(n), style.LINESTYLES[1 if p else 0]
        blocks = [r["result"]["blocks"] for r in rows]
        idx = np.arange(1, len(blocks[0]) + 1)
        var = np.nanmean([[b.get("stream_var", math.nan) for b in bl] for bl in blocks], axis=0)
        sq_mean = np.nanmean([[b.get("stream_sq_mean", math.nan) for b in bl] for bl in blocks], axis=0)
        ax_mean.plot(idx, sq_mean, color=color, ls=ls, label=arm_label(n, p))
        ax_var.plot(idx, var, color=color, ls=ls, label=arm_label(n, p))
        if not p:
            ratio = np.nanmean([[b["ratio"] if b.get("ratio") is not None else math.nan for b in bl]
                                for bl in blocks], axis=0)
            ax_ratio.plot(idx, ratio, color=color, label=arm_label(n, p))
        grads = np.nanmean([r["result"]["grad_norms"] for r in rows], axis=0)
        ax_grad.plot(np.arange(1, len(grads) + 1), grads, color=color, ls=ls, label=arm_label(n, p))
    ax_ratio.plot(idx, 1 / idx, color="k", lw=0.8, ls=":", label="1/ℓ (De & Smith)")
    for ax, title, ylabel in ((ax_mean, "Stream: squared channel mean", "avg channel squared mean"),
                              (ax_var, "Stream: channel variance", "avg channel variance"),
                              (ax_ratio, "Branch / skip variance", "Var(branch)/Var(skip)"),
                              (ax_grad, "Gradient norm per layer", "‖∂L/∂W‖")):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xlabel("block ℓ" if ax is not ax_grad else "layer (forward order)")
        ax.grid(alpha=0.3)
    style.legend_outside(fig, axes)
    return {"name": "claim5_signal_propagation", "title": f"Signal propagation at initialization, depth {depth}",
            "figure": fig, "caption": "Mean over seeds of one training-mode batch; dashed lines are plain networks. "
                       "SkipInit and Fixup start with zero branches: their ratio and most branch gradients are 0 "
                       "and do not show on the log scales."}


def _depth_figure(profile, trained) -> dict:
    depths = profile["residual"]["train_depths"]
    fig, axes = style.figure()
    ax = axes[0]
    for n, p in CELLS:
        stats = [mean_ci(trained[(d, n, p)][1], (0, 100)) for d in depths]
        style.band(ax, depths, *zip(*stats), color=style.arm_color(n), label=arm_label(n, p),
                   linestyle=style.LINESTYLES[1 if p else 0])
    ax.set(xlabel="depth", ylabel="test accuracy (%)", title="Accuracy against depth")
    ax.grid(alpha=0.3)
    style.legend_outside(fig, axes)
    return {"name": "claim5_depth", "title": "The 2×2 factorial across depth", "figure": fig,
            "caption": "Each cell at its validated learning rate; mean over seeds with 95% CI."}
