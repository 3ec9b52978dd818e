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
from dataclasses import dataclass
from typing import Optional

import numpy as np
from pydantic import ConfigDict, Field, PositiveFloat, PositiveInt, field_validator

from bnlab.study import style, sweep
from bnlab.study.common import (Band, OwnLooks, arm_label, by_seed, ci, data_fields, dataset_label, final_loss,
                                final_pct, fmt_ci, lookup, paper_table, resnet_depths, tuned, tuning_caveat)
from bnlab.study.kinds import SIGNAL
from bnlab.study.verdict import SUPPORTED, ClaimResult, Effect, Interval, Part, Rule, Verdict, paired_effect

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
    # The primary response is where "improves gradient flow" lives: how far each cell trains, log10 of its
    # final training loss (accuracy is secondary, and bounded: three of its four cells spread 9-11 points
    # between seeds in the first version of this study, so ±22 points at 6 seeds). Per seed, BN's reduction
    # of the log loss with residual connections minus without: 0.3 decades means BN lowers the loss of the
    # residual net by a factor of 2 more than that of the plain one — a complement worth the name; under 0.1
    # decades (26%) BN does about the same for both.
    Rule("BN × residual interaction", "(log10 L none+res − log10 L BN+res) − (log10 L none+plain − log10 L "
         "BN+plain), L the final training loss at the deepest trained depth, each cell at its validated rate",
         threshold=0.3, margin=0.1, unit="decades", bounds=(-20.0, 20.0)),
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


class Config(OwnLooks):
    """The ``residual`` section (its own ``looks`` may replace the profile's)."""

    model_config = ConfigDict(extra="forbid")
    signal_depths: list[PositiveInt] = Field(min_length=1)
    train_depths: list[PositiveInt] = Field(min_length=2)
    signal_batch: PositiveInt
    lrs: list[PositiveFloat] = Field(min_length=3)

    _check_signal = field_validator("signal_depths")(classmethod(lambda cls, v: resnet_depths(v)))
    _check_train = field_validator("train_depths")(classmethod(lambda cls, v: resnet_depths(v)))


PRESETS = {
    "tiny": {"signal_depths": [8, 14], "train_depths": [8, 14], "signal_batch": 64, "lrs": [0.01, 0.1, 1.0]},
    # 0.01 … 1: on Fashion-MNIST the unnormalized cells validated the lowest rate of 0.03 … 0.3 (censored).
    # Depths 8 and 44: pilots on seeds 100-105 put the interaction at 0.32 [0.16, 0.49] decades at depth 14,
    # 0.35 [0.11, 0.59] at 20 and 1.79 [0.53, 3.06] at 44, where the unnormalized ResNet no longer trains. At
    # 14 and 20 it lies between margin and threshold, where no number of seeds decides it (quick at depth 14:
    # undecided in all five seed sets 0-29); depth 44 costs ≈ 60 s more of quick's wall time (pilot: claim 5
    # alone 54 s → 116 s on 2 cores)
    "quick": {"signal_depths": [8, 20, 56], "train_depths": [8, 44], "signal_batch": 64,
              "lrs": [0.01, 0.03, 0.1, 0.3, 1.0]},
    # its own looks, 6, 10, 16, 24 (α 1/1/1/2%): the profile's 6/10/14 left the interaction on Fashion-MNIST at
    # 0.94 [0.30, 1.57] decades (14 seeds), its low end on the threshold; at that effect and spread (≈ 0.95)
    # the simulated power is 80% against 51% (bnlab.study.sequential.power), for ≈ 31 CPU-s a seed there
    "standard": {"signal_depths": [8, 20, 56, 110, 218], "train_depths": [8, 44], "signal_batch": 256,
                 "lrs": [0.01, 0.03, 0.1, 0.3, 1.0], "looks": [6, 10, 16, 24],
                 "look_alphas": [0.01, 0.01, 0.01, 0.02]},
    # He et al.'s CIFAR-10 depths; rates around their 0.1 (with claim 4's batch 128, weight decay and momentum)
    "full": {"signal_depths": [20, 56, 110, 218, 434], "train_depths": [20, 32, 44, 56, 110], "signal_batch": 256,
             "lrs": [0.03, 0.1, 0.3]},
}

# what the registry, the plan and the profiles read (see bnlab.study.claims)
TUNED_ON_SEEDS = True  # every rate on the tuning seeds, then the other seeds at each cell's choice
LATER_ROUNDS = None    # nothing more once the tuning seeds have chosen
PROFILE_CHECKS = ()
DATASET_FIELDS = ()


def _signal_spec(profile, depth, norm, plain, seed) -> dict:
    cfg = profile["residual"]
    return SIGNAL.spec(**data_fields(profile), device=profile.get("device", "cpu"), width=profile["width"],
                       depth=depth, norm=norm, plain=plain, batch_size=cfg["signal_batch"], seed=seed)


def _train_spec(profile, depth, norm, plain, lr, seed) -> dict:
    """Claim 4's sweep run at another depth and/or without shortcuts: at the profile's depth with
    shortcuts it *is* claim 4's run, so it runs once for both claims."""
    spec = sweep.spec(profile, norm, lr, sweep.first_batch_size(profile), seed)
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


@dataclass
class Cell:
    """One cell of the factorial at one depth, at its validated rate."""

    lr: Optional[float]
    test: list[float]      # per seed: test accuracy %
    test_ci: Interval      # over seeds
    error_ci: Interval     # test error % (100 − test accuracy), over seeds
    log_loss: list[float]  # per seed: log10 of the final training loss (a diverged run: its initial loss)
    log_loss_ci: Interval  # over seeds


@dataclass
class Signal:
    """One arm at initialization at one depth, averaged over seeds (the seeds whose run finished)."""

    last_var: float                # variance of the residual stream after the last block (NaN: no run)
    exponents: Optional[list]      # per seed: the slope k (None for plain nets: no shortcut, no ratio)
    exponent_ci: Optional[Interval]
    stream_sq_mean: Optional[list]  # per block (the figure's depth only; None: no finished run)
    stream_var: Optional[list]
    ratio: Optional[list]          # per block: Var(branch) / Var(skip); None for plain nets
    grad_norms: Optional[list]     # per layer, forward order


@dataclass
class Findings:
    """Everything claim 5's report shows."""

    parts: list[Part]                             # BN × residual interaction, blocks biased to the identity
    cells: dict[tuple[int, str, bool], Cell]      # (depth, norm, plain) → the cell, every trained depth
    deepest: int                                  # the deepest trained depth: where the interaction is taken
    signal: dict[tuple[int, str, bool], Signal]   # (depth, norm, plain) → at initialization, every signal depth
    deepest_signal: int                           # the signal figure's depth
    depth_curves: dict[tuple[str, bool], Band]    # (norm, plain) → test accuracy % against depth
    loss_curves: dict[tuple[str, bool], Band]     # (norm, plain) → log10 training loss against depth
    plain_degradation: Interval                   # BN plain nets: deepest − shallowest test error (paired)
    accuracy_interaction: Interval                # the interaction in test accuracy (points): secondary
    by_depth: dict[int, Part]                     # the interaction rule at every trained depth (the verdict: deepest)
    censored: list[tuple[int, str, bool]]         # cells whose validated rate is an end of the grid


def _cell(profile, results, depth, norm, plain) -> Cell:
    """The cell's validated lr and per-seed final test accuracy at it."""
    lr = _tuned(profile, results, depth, norm, plain)[1]
    rows = [lookup(results, _train_spec(profile, depth, norm, plain, lr, s)) if lr is not None else None
            for s in profile["seeds"]]
    test = [final_pct(row, "test_acc") for row in rows]
    log_loss = [_log_loss(row) for row in rows]
    return Cell(lr, test, ci(test, (0, 100)), ci([100 - a for a in test], (0, 100)), log_loss, ci(log_loss))


def _log_loss(row: Optional[dict]) -> float:
    """log10 of the run's final training loss; a diverged run did not train: its loss at initialization."""
    if row is None:
        return math.nan
    result = row["result"]
    loss = final_loss(result) if row["status"] == "done" else math.nan
    if not (math.isfinite(loss) and loss > 0):
        loss = result.get("initial_loss") or math.nan
    return math.log10(loss) if loss and math.isfinite(loss) and loss > 0 else math.nan


def _signal(rows: list, exponents: Optional[list], drawn: bool) -> Signal:
    """An arm's signal runs (None: not finished) summarized; ``drawn``: with the per-block means the figure
    draws."""
    rows = [r for r in rows if r]
    last = [r["result"]["blocks"][-1].get("stream_var", math.nan) for r in rows]
    last_var = float(np.mean([v for v in last if v is not None and math.isfinite(v)] or [math.nan]))
    out = Signal(last_var, exponents, ci(exponents) if exponents else None, None, None, None, None)
    if drawn and rows:
        blocks = [r["result"]["blocks"] for r in rows]
        out.stream_var = np.nanmean([[b.get("stream_var", math.nan) for b in bl] for bl in blocks], axis=0).tolist()
        out.stream_sq_mean = np.nanmean([[b.get("stream_sq_mean", math.nan) for b in bl] for bl in blocks],
                                        axis=0).tolist()
        if exponents is not None:
            out.ratio = np.nanmean([[b["ratio"] if b.get("ratio") is not None else math.nan for b in bl]
                                    for bl in blocks], axis=0).tolist()
        out.grad_norms = np.nanmean([r["result"]["grad_norms"] for r in rows], axis=0).tolist()
    return out


def _interaction(seeds, loss: dict) -> Effect:
    """BN's reduction of the log loss with residual connections minus without, paired by seed (positive: BN
    trains the residual net further than the plain one)."""
    with_res = by_seed(seeds, [b - a for a, b in zip(loss[("bn", False)], loss[("none", False)])])
    plain = by_seed(seeds, [b - a for a, b in zip(loss[("bn", True)], loss[("none", True)])])
    return paired_effect(with_res, plain, "decades", RULES[0].bounds)


def decide(profile: dict, results: dict) -> Findings:
    cfg, seeds = profile["residual"], profile["seeds"]
    cells = {(d, n, p): _cell(profile, results, d, n, p) for d in cfg["train_depths"] for n, p in CELLS}
    deepest = max(cfg["train_depths"])
    acc = {(n, p): cells[(deepest, n, p)].test for n, p in CELLS}
    by_depth = {d: Part(RULES[0], _interaction(seeds, {(n, p): cells[(d, n, p)].log_loss for n, p in CELLS}))
                for d in cfg["train_depths"]}
    acc_res = by_seed(seeds, [a - b for a, b in zip(acc[("bn", False)], acc[("none", False)])])
    acc_plain = by_seed(seeds, [a - b for a, b in zip(acc[("bn", True)], acc[("none", True)])])
    signal = {(d, n, p): [lookup(results, _signal_spec(profile, d, n, p, s)) for s in seeds]
              for d in cfg["signal_depths"] for n, p in SIGNAL_ARMS}
    deepest_signal = max(cfg["signal_depths"])
    exponents = {(d, n): [_exponent(r["result"]["blocks"]) if r else math.nan for r in signal[(d, n, False)]]
                 for d in cfg["signal_depths"] for n, _ in SIGNAL_ARMS}
    parts = [by_depth[deepest],
             Part(RULES[1], paired_effect(by_seed(seeds, exponents[(deepest_signal, "none")]),
                                          by_seed(seeds, exponents[(deepest_signal, "bn")])))]
    shallow = min(cfg["train_depths"])
    degradation = ci([(100 - d) - (100 - s) for d, s in zip(cells[(deepest, "bn", True)].test,
                                                              cells[(shallow, "bn", True)].test)], (-100, 100))
    return Findings(parts, cells, deepest,
                    {(d, n, p): _signal(rows, None if p else exponents.get((d, n), []), d == deepest_signal)
                     for (d, n, p), rows in signal.items()}, deepest_signal,
                    {(n, p): Band.of(cfg["train_depths"], [cells[(d, n, p)].test_ci for d in cfg["train_depths"]])
                     for n, p in CELLS},
                    {(n, p): Band.of(cfg["train_depths"], [cells[(d, n, p)].log_loss_ci for d in cfg["train_depths"]])
                     for n, p in CELLS}, degradation,
                    accuracy_interaction=paired_effect(acc_res, acc_plain, "points", (-200.0, 200.0)).interval,
                    by_depth=by_depth,
                    censored=[key for key, cell in cells.items()
                              if cell.lr is not None and cell.lr in (min(cfg["lrs"]), max(cfg["lrs"]))])


def differences(profile: dict, findings: Findings) -> list[str]:
    """What this run measured that sets its setting apart from He et al.'s and De & Smith's (shown where the
    verdict disagrees with theirs)."""
    cells, deepest = findings.cells, findings.deepest
    losses = ", ".join(f"{arm_label(n, p)} {fmt_ci(cells[(deepest, n, p)].log_loss_ci, 2)}" for n, p in CELLS)
    out = [f"log10 final training loss at depth {deepest}, each cell at its validated rate: {losses}. He et al. "
           f"find plain nets degrading from 20 to 56 layers on CIFAR-10; the deepest net trained here has {deepest}."]
    if len(findings.by_depth) > 1:
        out.append("The interaction by depth: " + "; ".join(f"depth {d}: {part.effect.interval.text(2)} ({part.outcome})"
                                                           for d, part in findings.by_depth.items()) + ".")
    if findings.censored:
        out.append("Cells whose validated rate is an end of the grid (a rate outside it might serve them better): "
                   + ", ".join(f"{arm_label(n, p)} at depth {d}" for d, n, p in findings.censored) + ".")
    return out


def render(profile: dict, findings: Findings) -> ClaimResult:
    cfg, parts = profile["residual"], findings.parts
    cells, deepest, signal = findings.cells, findings.deepest, findings.signal
    acc_rows = [[arm_label(n, p)] + [f"{fmt_ci(cells[(d, n, p)].test_ci, 1)} (lr "
                                     f"{cells[(d, n, p)].lr if cells[(d, n, p)].lr is not None else 'n/a'})"
                                     for d in cfg["train_depths"]] for n, p in CELLS]
    acc_table = {"title": "Test accuracy (%) by depth, each cell at its validated learning rate",
                 "columns": ["cell"] + [f"depth {d}" for d in cfg["train_depths"]], "rows": acc_rows}
    depth_table = {"title": "The BN × residual interaction at each trained depth (the verdict reads the deepest, "
                            "fixed before the data)",
                   "columns": ["depth", "interaction (decades of training loss)", "outcome at this depth"],
                   "rows": [[str(d), part.effect.interval.text(2), part.outcome]
                            for d, part in findings.by_depth.items()]}
    loss_table = {"title": "log10 final training loss by depth (the verdict's scale), each cell at its validated rate",
                  "columns": ["cell"] + [f"depth {d}" for d in cfg["train_depths"]],
                  "rows": [[arm_label(n, p)] + [fmt_ci(cells[(d, n, p)].log_loss_ci, 2) for d in cfg["train_depths"]]
                           for n, p in CELLS]}
    sig_rows = []
    for n, p in SIGNAL_ARMS:
        row = [arm_label(n, p)]
        for d in cfg["signal_depths"]:
            arm = signal[(d, n, p)]
            var = f"{arm.last_var:.3g}" if math.isfinite(arm.last_var) else "n/a"
            row.append(f"{var} / " + (fmt_ci(arm.exponent_ci, 2) if arm.exponents else "—"))
        sig_rows.append(row)
    sig_table = {"title": "At initialization: variance of the residual stream after the last block / slope k of "
                          "log(Var branch / Var skip) against log(block index)",
                 "columns": ["arm"] + [f"depth {d}" for d in cfg["signal_depths"]], "rows": sig_rows}
    edge = [f"{arm_label(n, p)} at depth {d} ({cells[(d, n, p)].lr:g})" for d, n, p in findings.censored]
    def cut(d, norm, plain):   # how many times lower BN's training loss is than the unnormalized cell's
        gap = cells[(d, "none", plain)].log_loss_ci.mean - cells[(d, norm, plain)].log_loss_ci.mean
        return f"{10 ** gap:.1f}×" if math.isfinite(gap) else "n/a"
    changes = len({part.outcome for part in findings.by_depth.values()}) > 1
    paragraphs = [
        f"A 2×2 design: BN or no normalization, with residual connections or without (the plain twin), at depths "
        f"{', '.join(map(str, cfg['train_depths']))}, each cell at its validated rate. We compare how far each cell "
        f"trains: its final training loss, on a log scale.",
        f"At depth {deepest}, BN lowered the residual net's training loss {cut(deepest, 'bn', False)} and the plain "
        f"net's {cut(deepest, 'bn', True)}: an interaction of {parts[0].effect.interval.text(2)} decades."
        + (" The answer changes with depth: " + "; ".join(f"depth {d}: {part.effect.interval.text(2)} ({part.outcome})"
                                                          for d, part in findings.by_depth.items()) + "."
           if changes else ""),
        f"At initialization, with BN each block's branch is smaller against its skip path the deeper the block: "
        f"the slope of log(Var branch / Var skip) is {parts[1].effect.interval.text(2)} steeper with BN than without "
        f"(De & Smith predict −1 with BN, 0 without).",
    ]
    if edge:
        paragraphs.append(f"Censored: {', '.join(edge)} validated an end of the rate grid, so its best rate may lie "
                          f"beyond it.")
    details = [{"title": "Secondary numbers", "paragraphs": [
        f"In test accuracy (secondary, not a rule) the interaction at depth {deepest} is "
        f"{findings.accuracy_interaction.text(1)} points. The first version of this study decided on accuracy, "
        f"where three of the four cells spread 9-11 points between seeds.",
        f"The interaction is read at the deepest trained depth ({deepest}), fixed before the data, where the "
        f"literature says the complement matters most; the tables show every depth."]}]
    explanation = " ".join(paragraphs + [f"{parts[0].text(2)}.", f"{parts[1].text()}."])
    return ClaimResult(
        answer=answer(findings), paragraphs=paragraphs, details=details, differences=differences(profile, findings),
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        verdict=Verdict.from_parts(parts, f"BN × residual interaction at depth {deepest}: "
                                          f"{parts[0].effect.interval.text(2)} in log10 training loss", explanation),
        caveats=[tuning_caveat(profile),
                 f"Depths {cfg['train_depths']} of a width-{profile['width']} ResNet on {dataset_label(profile)} "
                 f"trained with claim 4's budget, where He et al. train CIFAR ResNets to depth 110 to convergence: the "
                 f"2×2 factorial needs every cell at several rates, which at full depth would not fit the budget.",
                 "The width is reduced; narrow networks propagate signals more noisily.",
                 f"Each cell chooses among {len(cfg['lrs'])} rates ({cfg['lrs']}); a plain deep net might prefer a "
                 f"rate outside them."],
        tables=[depth_table, loss_table, {**acc_table, "details": True}, {**sig_table, "details": True},
                paper_table(PAPER, _ours(profile, findings))],
        figures=[_depth_figure(profile, findings), _signal_figure(findings)],
        numbers={"interaction": parts[0].effect.interval.to_dict(), "exponent_gap": parts[1].effect.interval.to_dict(),
                 "accuracy_interaction": findings.accuracy_interaction.to_dict(),
                 "censored": [f"{n}{'+plain' if p else ''}@{d}" for d, n, p in findings.censored],
                 "by_depth": {str(d): {"interval": part.effect.interval.to_dict(), "outcome": part.outcome}
                              for d, part in findings.by_depth.items()},
                 "parts": [p.to_dict() for p in parts]})


def _ours(profile: dict, findings: Findings) -> dict:
    """Our numbers for :data:`PAPER`'s quantities (test error = 100 − test accuracy, mean [95% CI] over
    seeds, each cell at its validated rate), each with our setting in words."""
    cfg, settings = profile["residual"], sweep.settings(profile)
    budget = f"{settings['epochs']} epochs" if settings.get("epochs") else f"{settings.get('max_steps')} steps"
    setting = (f"{dataset_label(profile)}, width {profile['width']:g}, {budget} one-cycle at the validated rate among "
               f"{cfg['lrs']}, batch {settings['batch_sizes'][0]}, weight decay {settings.get('weight_decay', 0.0):g}, "
               f"Nesterov momentum {settings.get('momentum', 0.9):g}, {profile['val_size']} held out, no augmentation")
    out = {}
    for depth in cfg["train_depths"]:
        cell = findings.cells[(depth, "bn", False)]
        out[f"error@{depth}"] = (f"{fmt_ci(cell.error_ci, 2)} at lr {cell.lr if cell.lr is not None else 'n/a'}",
                                 setting)
    deep, shallow = max(cfg["train_depths"]), min(cfg["train_depths"])
    out["plain_degradation"] = (f"{fmt_ci(findings.plain_degradation, 2)} (depth {deep} − depth {shallow}, paired "
                                f"by seed)", setting)
    return out


def _signal_figure(findings: Findings) -> dict:
    depth = findings.deepest_signal
    fig, axes = style.figure(ncols=4, width=3.4)
    ax_mean, ax_var, ax_ratio, ax_grad = axes
    idx = np.arange(1, 2)
    for n, p in SIGNAL_ARMS:
        arm = findings.signal[(depth, n, p)]
        if arm.stream_var is None:
            continue
        color, ls = style.arm_color(n), style.LINESTYLES[1 if p else 0]
        idx = np.arange(1, len(arm.stream_var) + 1)
        ax_mean.plot(idx, arm.stream_sq_mean, color=color, ls=ls, label=arm_label(n, p))
        ax_var.plot(idx, arm.stream_var, color=color, ls=ls, label=arm_label(n, p))
        if not p:
            ax_ratio.plot(idx, arm.ratio, color=color, label=arm_label(n, p))
        ax_grad.plot(np.arange(1, len(arm.grad_norms) + 1), arm.grad_norms, color=color, ls=ls, label=arm_label(n, p))
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


def _depth_figure(profile, findings: Findings) -> dict:
    fig, (ax_loss, ax_acc) = style.figure(ncols=2)
    for n, p in CELLS:
        for ax, curves in ((ax_loss, findings.loss_curves), (ax_acc, findings.depth_curves)):
            style.band(ax, *curves[(n, p)], color=style.arm_color(n), label=arm_label(n, p),
                       linestyle=style.LINESTYLES[1 if p else 0])
    ax_loss.set(xlabel="depth", ylabel="log10 final training loss", title="How far each cell trains (the verdict)")
    ax_acc.set(xlabel="depth", ylabel="test accuracy (%)", title="Accuracy against depth (secondary)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    style.legend_outside(fig, [ax_loss, ax_acc])
    return {"name": "claim5_depth", "title": "The 2×2 factorial across depth", "figure": fig,
            "caption": "Each cell at its validated learning rate; mean over seeds with 95% CI. Dashed: the plain "
                       "twins without residual connections."}


# ------------------------------------------------------------------------------------------------ answer

def answer(findings: Findings) -> str:
    """The claim's answer in one plain sentence (the report's first screen), from its parts."""
    from bnlab.study import answers  # only the answer reads the shared phrasing
    at = f"at depth {findings.deepest}"
    return answers.sentence(findings.parts, [
        answers.Phrase(holds=f"{at}, BN lowered the training loss of residual networks {{x}} more than that of plain "
                             f"ones",
                       refuted=f"{at}, BN did not help residual networks clearly more than plain ones ({{s}})",
                       reversed=f"{at}, BN lowered the training loss of plain networks {{x}} more than that of "
                                f"residual ones",
                       question=f"BN helps residual networks more than plain ones {at}"),
        answers.Phrase(holds="at initialization BN biased residual blocks towards the identity",
                       refuted="at initialization BN did not clearly bias blocks towards the identity ({s})",
                       reversed="at initialization blocks were less biased towards the identity with BN",
                       question="BN biases residual blocks towards the identity"),
    ])
