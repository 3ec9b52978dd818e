"""Claim 2: "BN accelerates training."

Each arm (BN, none, SkipInit, Fixup) trains at the learning rate its *validation* accuracy chose in
claim 4's sweep (first batch size), now with a longer budget and a constant rate after a linear warm-up
of the same number of steps for every arm, so an arm's curve is not shaped by where a decaying schedule
ends. As Ioffe & Szegedy did, the target is set by the unnormalized network trained to its plateau: that
arm runs ``plateau_epochs`` (the others ``epochs``), and the target is a fixed fraction of the best
validation accuracy it reaches (per seed). We count the steps each arm needs to first reach it on
validation (an arm that has not reached it after ``epochs`` runs again for the plateau budget, in a later
round; one that never does counts as needing that whole budget, which can only shrink BN's advantage),
and the mean training loss over the steps every arm ran. SkipInit and Fixup (both with warm-up) are
reported as the fraction of BN's speed-up (in log steps) they recover, with a paired bootstrap interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
from scipy import stats
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from bnlab.study import answers, style, sweep
from bnlab.study.common import (Band, LaterRounds, arm_label, by_seed, ci, dataset_label, fmt_ci, lookup,
                                paper_table, train_spec)
from bnlab.study.metrics import loss_curve_area, steps_to_target
from bnlab.study.verdict import SUPPORTED, ClaimResult, Interval, Part, Rule, Verdict, paired_effect

NUMBER = 2
SLUG = "speed"
TITLE = "BN accelerates training"
LITERATURE = ("Ioffe & Szegedy 2015 (https://arxiv.org/abs/1502.03167): BN-Inception matched Inception's "
              "accuracy in 2.1M instead of 31.0M steps (≈14× fewer) at 5× the learning rate.")
FINDING = "Ioffe & Szegedy 2015: same accuracy in ≈14× fewer steps (supported)"
EXPECTED = SUPPORTED
RULES = [
    Rule("fewer steps", "log10(steps without BN to the target) − log10(steps with BN)", threshold=0.1,
         margin=0.04, unit="decades"),  # ≈ 1.26× and 1.1× fewer steps
    Rule("lower training loss", "log10(mean training loss without BN) − log10(mean training loss with BN)",
         threshold=0.05, margin=0.02, unit="decades"),
]
IOFFE = "Ioffe & Szegedy 2015, Table 2"
IOFFE_SETTING = "Inception on ImageNet; the target is Inception's best validation accuracy (72.2%)"
PAPER = [
    {"quantity": "steps without BN / steps with BN to the target", "paper": IOFFE,
     "value": "31.0M / 13.3M ≈ 2.3× (BN-Baseline, same rate); 31.0M / 2.1M ≈ 14.8× (BN-x5, 5× the rate)",
     "setting": IOFFE_SETTING + "; BN-x5 also changes other training settings (their §4.2.1)", "ours_key": "speedup"},
]
RULE = ("Per seed, the target is a fixed fraction of the unnormalized arm's plateau (its best validation "
        "accuracy over the longer run); every arm at its validated learning rate (the next lower rate of the grid "
        "if a seed diverges at it without the sweep's decay). "
        + " ".join(f"Part {i + 1}, {r.text()}." for i, r in enumerate(RULES))
        + " An arm that has not reached the target after its epochs is run again for the unnormalized arm's "
          "(longer) budget; one that never reaches it counts as needing that whole budget, which can only shrink "
          "BN's advantage. The loss part averages over the steps every arm ran.")


class Config(BaseModel):
    """The ``speed`` section: the longer runs at each arm's validated rate."""

    model_config = ConfigDict(extra="forbid")
    arms: Optional[list[Literal["bn", "none", "skipinit", "fixup"]]] = Field(
        None, description="the arms of the longer runs, among the sweep's (unset: all of the sweep's arms)")
    epochs: PositiveInt
    plateau_epochs: Optional[PositiveInt] = Field(
        None, description="the unnormalized arm's run, long enough to reach its plateau (unset: epochs)")
    target_fraction: float = Field(0.97, gt=0.5, le=1.0)
    warmup_fraction: float = Field(0.05, ge=0.0, lt=0.5, description="of epochs; the same steps for every arm")

    @field_validator("arms")
    @classmethod
    def _bn_and_none(cls, arms):
        if arms is not None and ("bn" not in arms or "none" not in arms or len(set(arms)) != len(arms)):
            raise ValueError(f"must hold 'bn' and 'none', each once (got {arms})")
        return arms

    @model_validator(mode="after")
    def _plateau_at_least_epochs(self):
        if self.plateau_epochs is not None and self.plateau_epochs < self.epochs:
            raise ValueError(f"plateau_epochs ({self.plateau_epochs}) must be at least epochs ({self.epochs})")
        return self


PRESETS = {
    "tiny": {"epochs": 1, "plateau_epochs": 2, "target_fraction": 0.9},
    # quick: the verdict's two arms only (within 8 epochs, at their validated rates, Fixup reached the target in
    # none of 12 seeds of trial runs and SkipInit in 3: their recovery is measured by standard and full)
    "quick": {"arms": ["bn", "none"], "epochs": 8, "plateau_epochs": 24, "target_fraction": 0.97},
    "full": {"epochs": 30, "plateau_epochs": 90, "target_fraction": 0.97},
}
# standard judges every claim in four settings (two datasets × two depths) at quick's budget per setting
PRESETS["standard"] = dict(PRESETS["quick"])


def _arms_are_swept(profile) -> None:
    """The longer runs' arms are among the sweep's (``profile``: the profile being validated)."""
    speed, swept = getattr(profile, SLUG, None), getattr(profile, sweep.SECTION, None)
    if speed is not None and swept is not None and speed.arms and not set(speed.arms) <= set(swept.arms):
        raise ValueError(f"speed.arms {speed.arms} must be among lr.arms {swept.arms} (claim 2 trains each arm "
                         f"at the rate claim 4's sweep validated)")


def _later_runs(profile: dict) -> dict[str, int]:
    """The sweep's extensions at the first batch size, and the longer runs: at worst every rate of the
    extended grid, and every arm but none run again for the plateau budget in every seed."""
    cfg, seeds = sweep.settings(profile), len(profile["seeds"])
    again = (len(arms(profile)) - 1) * seeds if plateau_epochs(profile) > profile["speed"]["epochs"] else 0
    longer = len(arms(profile)) * (len(cfg["lrs"]) + cfg.get("max_extensions", 0)) * seeds + again
    return {**sweep.extension_runs(profile, [sweep.first_batch_size(profile)]), "claim 2's longer runs": longer}


# what the registry, the plan and the profiles read (see bnlab.study.claims)
TUNED_ON_SEEDS = False  # each arm's rate comes from claim 4's sweep, where every seed ran every rate
LATER_ROUNDS = LaterRounds("claim 4's grid extensions at the first batch size, the longer runs at each arm's "
                           "validated rate, and the reruns for the plateau budget; bounded by lr.max_extensions",
                           _later_runs)
PROFILE_CHECKS = (_arms_are_swept,)
DATASET_FIELDS = ()


# ------------------------------------------------------------------------------------------------ measure

def arms(profile: dict) -> list[str]:
    return list(profile["speed"].get("arms") or sweep.settings(profile)["arms"])


def plateau_epochs(profile: dict) -> int:
    return profile["speed"].get("plateau_epochs") or profile["speed"]["epochs"]


def _epochs(profile: dict, norm: str) -> int:
    return plateau_epochs(profile) if norm == "none" else profile["speed"]["epochs"]


def _spec(profile: dict, norm: str, lr: float, seed: int, epochs: Optional[int] = None) -> dict:
    """One longer run: the unnormalized arm for ``plateau_epochs``, the others for ``epochs`` (or the given
    ``epochs``); the warm-up is ``warmup_fraction`` of ``epochs`` in every run (the same steps), then the
    rate stays constant."""
    cfg = profile["speed"]
    epochs = epochs or _epochs(profile, norm)
    return train_spec(profile, norm=norm, lr=lr, batch_size=sweep.first_batch_size(profile), seed=seed,
                      epochs=epochs, schedule="constant",
                      warmup_fraction=cfg["warmup_fraction"] * cfg["epochs"] / epochs)


def _validated(profile: dict, results: Optional[dict], norm: str) -> Optional[float]:
    """The arm's validated lr from claim 4's sweep, once that arm's grid is final (else ``None``)."""
    b0 = sweep.first_batch_size(profile)
    if not sweep.grid(profile, results, b0, norm)[1]:
        return None
    return sweep.table(profile, results, b0, norm).best_lr


def _rates(profile: dict, results: Optional[dict], norm: str) -> list[float]:
    """The rates tried for the arm's longer runs, the one used last: its validated rate, then — while a
    seed diverges at a constant rate (the sweep's schedule decayed) — the next lower rate of the grid."""
    best = _validated(profile, results, norm)
    if best is None:
        return []
    grid = [lr for lr in sweep.grid(profile, results, sweep.first_batch_size(profile), norm)[0] if lr <= best]
    tried = []
    for lr in reversed(grid):
        tried.append(lr)
        rows = [lookup(results, _spec(profile, norm, lr, s)) for s in profile["seeds"]]
        if any(r is None for r in rows) or not any(r["status"] == "diverged" for r in rows):
            break
    return tried


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    """Claim 4's sweep at the first batch size, then (in later rounds) the longer runs."""
    b0 = sweep.first_batch_size(profile)
    out = [sweep.spec(profile, a, lr, b0, s) for a in sweep.settings(profile)["arms"]
           for lr in sweep.grid(profile, results, b0, a)[0] for s in profile["seeds"]]
    for a in arms(profile):
        out += [_spec(profile, a, lr, s) for lr in _rates(profile, results, a) for s in profile["seeds"]]
    return out + [spec for a in arms(profile) if a != "none" for spec in _extensions(profile, results, a).values()]


def _target(profile: dict, row: Optional[dict]) -> float:
    """The target a seed's unnormalized plateau run sets (NaN until it finished)."""
    accs = [v for v in _curve(row).get("val_acc", []) if v is not None]
    return profile["speed"]["target_fraction"] * max(accs) if accs and row["status"] == "done" else math.nan


def _extensions(profile: dict, results: Optional[dict], arm: str) -> dict:
    """seed → the plateau-length run of ``arm`` for each seed whose ``epochs`` run finished without reaching
    its target: a later round runs the arm as long as the unnormalized one, so that a slower arm is
    measured rather than censored."""
    lr, rows = _runs(profile, results, arm)
    none_rows = _runs(profile, results, "none")[1]
    out = {}
    if lr is None or plateau_epochs(profile) == profile["speed"]["epochs"]:
        return out
    for seed, row, none_row in zip(profile["seeds"], rows, none_rows):
        target = _target(profile, none_row)
        if (row is not None and row["status"] == "done" and math.isfinite(target)
                and steps_to_target(_curve(row)["step"], _curve(row)["val_acc"], target) is None):
            out[seed] = _spec(profile, arm, lr, seed, epochs=plateau_epochs(profile))
    return out


# ------------------------------------------------------------------------------------------------ decide

def _runs(profile, results, arm) -> tuple[Optional[float], list]:
    rates = _rates(profile, results, arm)
    lr = rates[-1] if rates else None
    return lr, [lookup(results, _spec(profile, arm, lr, s)) if lr is not None else None for s in profile["seeds"]]


def _curve(row) -> dict:
    return ((row or {}).get("result") or {}).get("curve", {})


@dataclass
class Curves:
    """One arm's longer runs at its rate, averaged over seeds, as the figure draws them."""

    lr: float
    val: Band          # validation accuracy % with its 95% CI at each evaluated step
    loss_steps: list   # steps of the training loss below
    loss: list         # training loss: mean over seeds, then a running mean over ≈ 1/50 of the steps


@dataclass
class Findings:
    """Everything claim 2's report shows. Per-seed lists follow the profile's seeds."""

    parts: list[Part]                       # fewer steps, lower training loss
    lrs: dict[str, Optional[float]]         # arm → its longer runs' rate (validated; lower if it diverged)
    targets: list[float]                    # per seed: the target validation accuracy (a fraction)
    steps: dict[str, list[float]]           # arm → per seed: steps to the target (never reached: the budget)
    areas: dict[str, list[float]]           # arm → per seed: mean training loss over the first common_steps
    censored: dict[str, int]                # arm → runs that never reached the target, even run longer
    extended: dict[str, list]               # arm → the seeds that ran again for the plateau budget
    recovery: dict[str, tuple[float, float, float]]  # SkipInit, Fixup → fraction of BN's speed-up, 95% CI
    common_steps: int                       # steps every finished run has
    target_pct: Interval                    # the target in %, over seeds
    steps_ci: dict[str, Interval]           # arm → steps to the target, over seeds
    areas_ci: dict[str, Interval]           # arm → mean training loss, over seeds
    curves: dict[str, Curves]               # arm → its curves (arms with any)
    target_line: Optional[float]            # the mean target in % (None: no seed has one)


def decide(profile: dict, results: dict) -> Findings:
    seeds, arms_ = profile["seeds"], arms(profile)
    runs = {a: _runs(profile, results, a) for a in arms_}
    targets = [_target(profile, row) for row in runs["none"][1]]
    extended = {a: {seed: lookup(results, spec) for seed, spec in _extensions(profile, results, a).items()}
                for a in arms_ if a != "none"}
    budgets = [float(row["result"]["steps"]) if row is not None and row["status"] == "done" else math.nan
               for row in runs["none"][1]]  # the plateau run's length: what a run that never reached counts as
    common = min((len((r or {}).get("result", {}).get("losses") or []) for a in arms_ for r in runs[a][1]
                  if r is not None and r["status"] == "done"), default=0)  # steps every finished run has
    steps, areas, censored = {}, {}, {}
    for a in arms_:
        steps[a], areas[a], censored[a] = [], [], 0
        for seed, row, target, budget in zip(seeds, runs[a][1], targets, budgets):
            curve = _curve(row)
            if row is None or not curve.get("step") or not math.isfinite(target):
                steps[a].append(math.nan), areas[a].append(math.nan)
                continue
            reached = steps_to_target(curve["step"], curve["val_acc"], target) if row["status"] == "done" else None
            longer = extended.get(a, {}).get(seed)
            if reached is None and longer is not None and longer["status"] == "done":
                reached = steps_to_target(_curve(longer)["step"], _curve(longer)["val_acc"], target)
            if reached is None:
                censored[a] += 1
            steps[a].append(float(reached if reached is not None else max(budget, row["result"]["steps"])))
            losses = [v for v in row["result"].get("losses", [])[:common] if v is not None]
            areas[a].append(loss_curve_area(range(len(losses)), losses) if row["status"] == "done" else math.nan)

    def logs(values):
        return by_seed(seeds, [math.log10(v) if v and math.isfinite(v) and v > 0 else math.nan for v in values])
    parts = [Part(RULES[0], paired_effect(logs(steps["none"]), logs(steps["bn"]), "decades")),
             Part(RULES[1], paired_effect(logs(areas["none"]), logs(areas["bn"]), "decades"))]
    none_l, bn_l = logs(steps["none"]), logs(steps["bn"])
    recovery = {a: _recovery(none_l, logs(steps[a]), bn_l) for a in ("skipinit", "fixup") if a in arms_}
    finite = [t for t in targets if math.isfinite(t)]
    curves = {a: _curves(lr, rows) for a, (lr, rows) in runs.items()}
    return Findings(parts, {a: lr for a, (lr, _) in runs.items()}, targets, steps, areas, censored,
                    {a: sorted(e) for a, e in extended.items()}, recovery, common,
                    target_pct=ci([100 * t for t in targets], (0, 100)),
                    steps_ci={a: ci(v) for a, v in steps.items()}, areas_ci={a: ci(v) for a, v in areas.items()},
                    curves={a: c for a, c in curves.items() if c is not None},
                    target_line=100 * float(np.mean(finite)) if finite else None)


def _curves(lr: Optional[float], rows: list) -> Optional[Curves]:
    """The arm's validation curve over seeds (to the steps every run evaluated), and its smoothed training loss."""
    rows = [r for r in rows if r is not None and _curve(r).get("step")]
    if not rows:
        return None
    n = min(len(_curve(r)["step"]) for r in rows)
    val = Band.of(_curve(rows[0])["step"][:n],
                  [ci([100 * (_curve(r)["val_acc"][i] or math.nan) for r in rows], (0, 100)) for i in range(n)])
    m = min(len(r["result"]["losses"]) for r in rows)
    mean = np.nanmean([[v if v is not None else math.nan for v in r["result"]["losses"][:m]] for r in rows], axis=0)
    k = max(1, m // 50)
    smooth = np.convolve(mean, np.ones(k) / k, mode="valid")
    return Curves(lr, val, (np.arange(len(smooth)) + k).tolist(), smooth.tolist())


def _recovery(none_l: dict, arm_l: dict, bn_l: dict) -> tuple[float, float, float]:
    """(estimate, low, high): the fraction of BN's gain in log steps an arm recovers, mean(gain arm) /
    mean(gain BN) over the seeds all three finished, with a paired percentile-bootstrap 95% interval
    (``scipy.stats.bootstrap``; a per-seed ratio would explode on seeds where BN gained little)."""
    seeds = [s for s in none_l if all(math.isfinite(d[s]) for d in (none_l, arm_l, bn_l))]
    gain = np.array([none_l[s] - arm_l[s] for s in seeds])
    bn_gain = np.array([none_l[s] - bn_l[s] for s in seeds])
    if len(seeds) < 3 or bn_gain.mean() <= 0:
        return (math.nan,) * 3

    def ratio(a, b, axis=-1):
        return a.mean(axis=axis) / b.mean(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        ci = stats.bootstrap((gain, bn_gain), ratio, paired=True, vectorized=True, n_resamples=2000,
                             method="percentile", random_state=0).confidence_interval
    return float(ratio(gain, bn_gain)), float(ci.low), float(ci.high)


# ------------------------------------------------------------------------------------------------ render

def render(profile: dict, findings: Findings) -> ClaimResult:
    f, cfg = findings, profile["speed"]
    speed, area = parts = f.parts
    rows = []
    for a in arms(profile):
        lr = f.lrs[a]
        rows.append([arm_label(a), "n/a" if lr is None else f"{lr:g}", fmt_ci(f.steps_ci[a], 0),
                     str(f.censored[a]), fmt_ci(f.areas_ci[a], 3),
                     fmt_ci(f.recovery[a], 2) if a in f.recovery else "—"])
    table = {"title": "Steps to the target, per arm (mean over seeds [95% CI])",
             "columns": ["arm", "validated lr (lower if it diverged)", "steps to the target",
                         "runs that never reached it (even run longer)",
                         f"mean training loss (first {f.common_steps} steps)",
                         "share of BN's speed-up recovered (1: all)"], "rows": rows}
    others = [a for a in ("skipinit", "fixup") if a in arms(profile)]
    paragraphs = [
        f"Each arm trained at the validated learning rate claim 4's sweep chose for it, held constant after the "
        f"same warm-up for every arm. The target is {cfg['target_fraction']:g} × the best validation accuracy the "
        f"network without normalization reached in a {plateau_epochs(profile)}-epoch run (its plateau): "
        f"{fmt_ci(f.target_pct, 1)}%. We count the steps each arm took to first reach it.",
        ("SkipInit and Fixup train without normalization; the table's last column is the share of BN's "
         "speed-up (in log steps) each recovers." if others else
         "This profile's longer runs are BN and no normalization only (`speed.arms`); `standard` and `full` add "
         "SkipInit and Fixup and measure how much of BN's speed-up they recover."),
    ]
    paragraphs += [f"{arm_label(a)} had not reached the target after {cfg['epochs']} epochs in seed(s) "
                   f"{', '.join(map(str, e))}; those runs went on for {plateau_epochs(profile)} epochs."
                   for a, e in f.extended.items() if e]
    details = [{"title": "How steps and loss are counted", "paragraphs": [
        f"The unnormalized network runs {plateau_epochs(profile)} epochs, long enough to reach its plateau, which "
        f"sets each seed's target; the other arms run {cfg['epochs']}. An arm that has not reached the target "
        f"by then runs again for the longer budget.",
        "A run that never reaches the target counts the whole of that budget, which can only shrink BN's "
        "advantage.",
        f"The loss part compares the mean training loss over the first {f.common_steps} steps, which every arm "
        f"ran, on a log scale (decades).",
        "The share of the speed-up an arm recovers is the mean of its gain in log steps over the mean of BN's, with "
        "a paired bootstrap interval: a ratio per seed would explode where BN gained little."]}]
    explanation = " ".join(paragraphs + [f"{p.text(3)}." for p in parts])
    return ClaimResult(
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        answer=answer(findings), paragraphs=paragraphs, details=details,
        verdict=Verdict.from_parts(parts, f"{_times(speed.effect.interval)} fewer steps to the target (log10 steps "
                                          f"none − BN: {speed.effect.interval.text()})", explanation),
        caveats=[f"We use {dataset_label(profile)} and a small ResNet where Ioffe & Szegedy use ImageNet and "
                 "Inception; like them we set the target by the unnormalized network, from its plateau in a "
                 f"{plateau_epochs(profile)}-epoch run at a constant rate "
                 f"(the other arms run {cfg['epochs']} epochs), so the target does not depend on where "
                 "a decaying schedule ends.",
                 f"Validation accuracy is evaluated every {profile['eval_every']} steps, so steps-to-target are "
                 "rounded up to that grid.",
                 "SkipInit and Fixup warm up linearly like every arm; without warm-up Fixup needs a much lower rate."],
        tables=[table, {**paper_table(PAPER, {"speedup": (
            f"{_times(speed.effect.interval)} (each arm at its own validated rate)",
            f"width-{profile['width']:g} ResNet-{profile['depth']} on {dataset_label(profile)}, target "
            f"{cfg['target_fraction']:g} × the unnormalized net's plateau in a "
            f"{plateau_epochs(profile)}-epoch constant-rate run, batch {sweep.first_batch_size(profile)}")}),
            "details": True}],
        figures=[_curve_figure(f)],
        numbers={"log10_speedup": speed.effect.interval.to_dict(), "log10_loss_ratio": area.effect.interval.to_dict(),
                 "parts": [p.to_dict() for p in parts],
                 "recovery": {a: dict(zip(("mean", "low", "high"), map(_clean, v))) for a, v in f.recovery.items()},
                 "target_pct": [_clean(100 * t) for t in f.targets]})


def _times(interval) -> str:
    """A log10 ratio interval as a factor: "2.3× [1.8×, 2.9×]"."""
    if not interval.finite:
        return "n/a"
    return f"{10 ** interval.mean:.3g}× [{10 ** interval.low:.3g}×, {10 ** interval.high:.3g}×]"


def _clean(v):
    return float(v) if v is not None and math.isfinite(v) else None


def _curve_figure(findings: Findings) -> dict:
    fig, (ax_acc, ax_loss) = style.figure(ncols=2)
    for a, curves in findings.curves.items():
        style.band(ax_acc, *curves.val, color=style.arm_color(a), label=f"{arm_label(a)} (lr {curves.lr:g})")
        ax_loss.plot(curves.loss_steps, curves.loss, color=style.arm_color(a))
    if findings.target_line is not None:
        ax_acc.axhline(findings.target_line, ls=":", color="k", lw=0.8, label="target (mean over seeds)")
    ax_acc.set(xlabel="step", ylabel="validation accuracy (%)", title="Validation accuracy")
    ax_loss.set(xlabel="step", ylabel="training loss (running mean)", title="Training loss", yscale="log")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
    style.legend_outside(fig, [ax_acc, ax_loss])
    return {"name": "claim2_curves", "title": "Each arm at its validated rate, constant after warm-up",
            "figure": fig, "caption": "Mean over seeds with 95% CI; the dotted line is the target."}


# ------------------------------------------------------------------------------------------------ answer

def answer(findings: Findings) -> str:
    """The claim's answer in one plain sentence (the report's first screen), from its parts."""
    return answers.sentence(findings.parts, [
        answers.Phrase(holds="BN reached the target accuracy in {x} fewer steps",
                       refuted="BN did not reach the target accuracy in clearly fewer steps ({s})",
                       reversed="BN needed {x} more steps to reach the target accuracy",
                       question="BN reaches the target accuracy in fewer steps"),
        answers.Phrase(holds="its training loss was {x} lower", refuted="its training loss was not clearly lower ({s})",
                       reversed="its training loss was {x} higher", question="BN lowers the training loss"),
    ])
