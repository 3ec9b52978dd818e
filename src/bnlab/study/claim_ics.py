"""Claim 1: "BN reduces internal covariate shift, and that is why it helps."

Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604) adapted to residual nets. Arms: BN, no
normalization (He init) and *noisy BN* at several noise strengths — per-activation noise whose mean and
variance are redrawn every step (:class:`bnlab.study.ics_loop.NoisyBatchNorm`), injected only after each
residual branch's first BN, where the branch's second BN renormalizes it. Every run is
:func:`bnlab.study.ics_loop.run_ics` (plain SGD); every BN arm is evaluated with statistics re-estimated
on clean batches. Two parts, each a :class:`~bnlab.study.verdict.Rule` fixed here before any data:

1. *BN reduces gradient ICS* — how much a layer's gradient G changes when every earlier layer takes its step
   −η·G first (G′), relative to G: log10 of ‖G − G′‖/‖G‖ without BN over with BN, both trained at the same
   rate (``ics_lr``), at the same steps, averaged over early/middle/late layers and the measurement steps,
   paired by seed. The probe step η is not the training rate alone: the part is measured at every η of
   ``probe_steps`` on the same checkpoints, and decided over the *stable range* — the η at which the probe step
   is a descent step (it lowers the batch's loss) in at least 95% of the measurements of both arms, at steps
   where both arms' training is stable (:data:`STABLE_RISE`, :data:`STABLE_SPIKE`). An overshooting probe step
   measures instability, not the shift of a layer's inputs: that share is reported on its own, as the
   stability effect it is. The claim is made for every η of the stable range, so the part holds when it holds
   at every one of them, and is refuted when it is refuted at one (its interval at the Bonferroni level over
   the stable range) and holds at none (:func:`bnlab.study.verdict.across`); one that holds at some η and is
   refuted at another is undecided, and the report says where;
2. *that is why it helps* — test accuracy of BN minus noisy BN (the middle noise strength), each arm at the
   learning rate its validation accuracy chose: if shift were why BN helps, injecting it would cost accuracy.

The module has three parts: :func:`measure` (the runs), :func:`decide` (the rule calls, and every number
the report shows, as :class:`Findings`) and :func:`render` (tables, figures, prose).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bnlab.study.common import (Band, data_fields, dataset_label, fmt_ci, lookup, paper_table, seed_list, tuned,
                                tuning_caveat, tuning_seeds)
from bnlab.study.kinds import ICS
from bnlab.study.metrics import log_mean_ci, step_changes
from bnlab.study.specs import spec_key, unique_specs
from bnlab.study.style import LINESTYLES, arm_color, band, figure, legend_outside
from bnlab.study.verdict import (HOLDS, NO_DATA, NO_VERDICT, NOT_SUPPORTED, REFUTED, UNDECIDED, ClaimResult, Effect,
                                 Interval, Part, Rule, Verdict, across, combine_with_premise, confidence,
                                 paired_effect, percent, t_interval)

NUMBER = 1
SLUG = "ics"
TITLE = "BN reduces internal covariate shift, and that is why it helps"
LITERATURE = ("Santurkar et al. 2018 (https://arxiv.org/abs/1805.11604): BN with injected non-stationary noise "
              "trains about as well as BN despite far larger distributional shift; BN does not reliably reduce "
              "gradient ICS (it can increase it); its real effect is a smoother loss landscape.")
FINDING = ("Santurkar et al. 2018: noisy BN trains as well; BN does not reduce gradient ICS; smoothness is "
           "the real effect (not supported)")
EXPECTED = NOT_SUPPORTED

RULES = [
    # log10 of the ratio of relative gradient changes ‖G − G′‖/‖G‖ without BN to with BN: 0.3 decades is a
    # factor of 2 (half the gradient change with BN: a reduction of ICS worth the name); under 0.1 decades
    # (≈ 26%) the two arms' gradients move alike. The ratio is scale-free (BN and no normalization have
    # gradients of different sizes) and, to first order in η, independent of the probe step; cos(G, G′) is
    # not: it tends to 1 for both arms as η → 0, so its difference would read "no reduction" at any small η.
    Rule("BN reduces gradient ICS", "log10(‖G − G′‖/‖G‖ none ÷ with BN) at every probe step of the stable range "
         "(same checkpoints, same training lr; mean over layers and stable steps)",
         threshold=0.3, margin=0.1, unit="decades", bounds=(-20.0, 20.0)),
    # 2 points is twice the usual seed-to-seed spread of test accuracy here and a large share of what BN
    # gains over no normalization; a cost under 1 point is within what a rerun moves.
    Rule("injected shift costs accuracy", "test accuracy BN − noisy BN (middle strength, validated lrs, clean "
         "statistics)", threshold=2.0, margin=1.0, unit="points", bounds=(-100.0, 100.0)),
]
# Fixed before any data: a measurement step counts when both arms of the seed are *stable* there — the
# training loss's moving average is within STABLE_RISE of its lowest value so far (not climbing out of a
# minimum) and the step's batch loss under STABLE_SPIKE times that average (no spike); a probe step η is in
# the *stable range* when it lowers the batch's loss in at least DESCENT_SHARE of each arm's counted
# measurements.
STABLE_RISE = 1.1
STABLE_SPIKE = 2.0
DESCENT_SHARE = 0.95
RULE = (f"Part 1 — {RULES[0].text()}; decided at each probe step η of the stable range (η at which the probe "
        f"step lowers the batch loss in ≥ {DESCENT_SHARE:.0%} of both arms' measurements, at steps where both arms' "
        f"loss average is within {STABLE_RISE - 1:.0%} of its minimum so far and the batch loss under "
        f"{STABLE_SPIKE:g}× that average): it holds if it holds at every such η, and is refuted if at some such η "
        f"its interval at the Bonferroni level (1 − 0.05/m for m probe steps in the range) lies below the margin "
        f"and it holds at none; holding at one η and refuted at another is undecided. Part 2 — "
        f"{RULES[1].text()}. The claim is a premise and an explanation: part 1 refuted → not supported, whatever "
        f"part 2 says (if BN does not reduce ICS, ICS cannot be why it helps); otherwise both hold → supported, "
        f"one holds and the other is refuted → partly supported, a part refuted and none holding → not supported, "
        f"else inconclusive; any failed run, or fewer than 3 finished seeds → no verdict. Thresholds: half the relative gradient change (0.3 decades) is a visible "
        f"reduction of ICS, under 0.1 decades none; an accuracy cost of 2 points is about twice the seed-to-seed "
        f"spread, under 1 point is what a rerun moves.")

SANTURKAR_SETTING = "a VGG network on CIFAR-10 (and a 25-layer deep linear network for ICS), noise after every BN"
PAPER = [
    {"quantity": "gradient ICS with BN against without (their Fig. 5: ‖G − G′‖ and cos(G, G′))",
     "paper": "Santurkar et al. 2018",
     "value": "not reduced by BN, often increased (plotted, no table)", "setting": SANTURKAR_SETTING,
     "ours_key": "cosine"},
    {"quantity": "test accuracy, BN − noisy BN (points)", "paper": "Santurkar et al. 2018",
     "value": "≈ 0 (noisy BN trains and generalizes about as well; plotted, no table)",
     "setting": SANTURKAR_SETTING, "ours_key": "noisy_cost"},
    {"quantity": "variation of the loss along the gradient, without BN / with BN", "paper": "Santurkar et al. 2018", "value": "> 1 (BN smooths the landscape; plotted, no table)", "setting": SANTURKAR_SETTING,
     "ours_key": "smoothness"},
]
STAND_IN = ("the CIFAR ResNet stands in for their VGG: bnlab.models holds CIFAR ResNets and their plain twins, "
            "which the other claims use too, and the noise sits where a BN renormalizes it as in the VGG")
BASE_ARMS = ("bn", "none", "noisy_bn")
PLACEMENT = ("Noise goes after the first BN of every residual branch only: its output passes a ReLU and a "
             "convolution into the branch's second BN, which renormalizes it, as in Santurkar et al.'s VGG where "
             "a BN follows every noisy layer. The stem's BN and each branch's last BN are left clean: they feed "
             "the un-normalized residual stream, where noise would accumulate up to the classifier with nothing "
             "renormalizing it — a different experiment from theirs.")


class Config(BaseModel):
    """Claim 1's section of a profile (``profile["ics"]``)."""

    model_config = ConfigDict(extra="forbid")

    arms: list[str] = Field(description='"bn", "none" and at least three "noisy_bn:<strength>" arms')
    lrs: dict[str, list[float]] = Field(description="per base arm (bn, none, noisy_bn): the SGD learning rates "
                                                    "each arm is validated over")
    ics_lr: float = Field(description="the one learning rate at which BN and none are compared for gradient ICS")
    steps: int = Field(ge=1, description="SGD steps per run")
    batch_size: int = Field(ge=2, description="examples per step")
    measure_every: int = Field(ge=1, description="steps between gradient-ICS and smoothness measurements")
    record_every: int = Field(ge=1, description="steps between distribution (percentile) records")
    eval_every: int = Field(ge=1, description="steps between validation evaluations")
    val_eval_size: int = Field(ge=1, description="validation examples evaluated during training")
    recal_batches: int = Field(ge=1, description="clean training batches that re-estimate BN statistics")
    step_sizes: list[float] = Field(min_length=1, description="η of the smoothness probe θ − η·g")
    probe_steps: list[float] = Field(min_length=1, description="the probe steps η at which gradient ICS is measured "
                                                               "on the same checkpoints (ics_lr among them)")
    ics_layers: list[float] = Field(min_length=1, description="depth fractions of the measured layers")

    @field_validator("arms")
    @classmethod
    def _known_arms(cls, arms: list[str]) -> list[str]:
        for arm in arms:
            base, _, dose = arm.partition(":")
            if base not in BASE_ARMS or (base == "noisy_bn") != bool(dose):
                raise ValueError(f"unknown arm {arm!r}: expected 'bn', 'none' or 'noisy_bn:<strength>'")
            if dose and not _positive(dose):
                raise ValueError(f"arm {arm!r}: the noise strength must be a positive number")
        if "bn" not in arms or "none" not in arms:
            raise ValueError("arms must include 'bn' and 'none'")
        if len(noise_arms(arms)) < 3:
            raise ValueError(f"a dose-response needs at least 3 'noisy_bn:<strength>' arms (got {noise_arms(arms)})")
        if len(set(arms)) != len(arms):
            raise ValueError("arms must not repeat")
        return arms

    @field_validator("ics_lr")
    @classmethod
    def _positive_lr(cls, lr: float) -> float:
        if not lr > 0:
            raise ValueError(f"learning rates must be positive (got {lr})")
        return lr

    @field_validator("step_sizes", "probe_steps")
    @classmethod
    def _positive_steps(cls, sizes: list[float]) -> list[float]:
        if any(not s > 0 for s in sizes):
            raise ValueError(f"step sizes must be positive (got {sizes})")
        return sizes

    @field_validator("ics_layers")
    @classmethod
    def _fractions(cls, fractions: list[float]) -> list[float]:
        if any(not 0 <= f < 1 for f in fractions):
            raise ValueError(f"layer fractions must lie in [0, 1) (got {fractions})")
        return fractions

    @model_validator(mode="after")
    def _probe_at_lr(self) -> "Config":
        if self.ics_lr not in self.probe_steps:
            raise ValueError(f"probe_steps must include ics_lr {self.ics_lr} (Santurkar et al.'s own probe: the "
                             f"training step), got {self.probe_steps}")
        if sorted(set(self.probe_steps)) != self.probe_steps:
            raise ValueError(f"probe_steps must be increasing and distinct (got {self.probe_steps})")
        return self

    @model_validator(mode="after")
    def _grids(self) -> "Config":
        bases = {a.partition(":")[0] for a in self.arms}
        if set(self.lrs) != bases:
            raise ValueError(f"lrs needs one grid per base arm {sorted(bases)} (got {sorted(self.lrs)})")
        for base, grid in self.lrs.items():
            if not grid or any(not lr > 0 for lr in grid):
                raise ValueError(f"lrs[{base!r}] must be a non-empty list of positive learning rates (got {grid})")
        return self


def _positive(text: str) -> bool:
    try:
        return math.isfinite(float(text)) and float(text) > 0
    except ValueError:
        return False


# probe steps from 0.03× to 1× the training rate 0.1 (pilots on seeds 100-105: the unnormalized net's probe
# step overshoots in ≈ 11% of measurements at 0.1 and ≈ 68% at 0.3; BN's in none at 0.1)
_COMMON = {"measure_every": 20, "record_every": 10, "eval_every": 100, "val_eval_size": 500, "recal_batches": 10,
           "ics_layers": [0.25, 0.5, 0.75], "step_sizes": [0.1, 0.2, 0.4], "probe_steps": [0.003, 0.01, 0.03, 0.1]}
_ARMS = ["bn", "none", "noisy_bn:0.5", "noisy_bn:1", "noisy_bn:2"]
PRESETS = {
    "tiny": {**_COMMON, "arms": _ARMS, "lrs": {"bn": [0.1], "none": [0.05, 0.1], "noisy_bn": [0.1]},
             "ics_lr": 0.1, "steps": 6, "batch_size": 32, "measure_every": 2, "record_every": 1, "eval_every": 3,
             "val_eval_size": 64, "recal_batches": 2, "step_sizes": [0.1, 0.4], "probe_steps": [0.01, 0.1]},
    # BN's grid includes ics_lr: its runs there are the gradient-ICS runs every seed has anyway
    # measured every 100 steps (4 measurements a run): each costs ≈ 17 forward/backward passes
    "quick": {**_COMMON, "arms": _ARMS, "lrs": {"bn": [0.1, 0.3, 1.0], "none": [0.03, 0.1], "noisy_bn": [0.3, 1.0]},
              "ics_lr": 0.1, "steps": 400, "batch_size": 64, "measure_every": 100},
    "full": {**_COMMON, "arms": _ARMS, "lrs": {"bn": [0.1, 0.3, 1.0], "none": [0.03, 0.1, 0.3],
                                               "noisy_bn": [0.1, 0.3, 1.0]},
             "ics_lr": 0.1, "steps": 4000, "batch_size": 128, "measure_every": 100, "eval_every": 250,
             "val_eval_size": 2000, "recal_batches": 20},
}
# standard judges every claim in four settings (two datasets × two depths) at quick's budget per setting
PRESETS["standard"] = dict(PRESETS["quick"])

# what the registry, the plan and the profiles read (see bnlab.study.claims)
TUNED_ON_SEEDS = True  # every rate on the tuning seeds, then the other seeds at each arm's choice
LATER_ROUNDS = None    # nothing more once the tuning seeds have chosen
PROFILE_CHECKS = ()
DATASET_FIELDS = ()


# --------------------------------------------------------------------------------------------------
# arms and runs
# --------------------------------------------------------------------------------------------------

def noise_arms(arms) -> list[str]:
    """The noisy-BN arms, weakest noise first."""
    return sorted((a for a in arms if a.startswith("noisy_bn:")), key=noise_strength)


def noise_strength(arm: str) -> float:
    return float(arm.partition(":")[2]) if arm.startswith("noisy_bn:") else 0.0


def rule_arm(arms) -> str:
    """The noisy arm part 2 compares with BN: the middle strength (fixed by the arm list, not by data)."""
    doses = noise_arms(arms)
    return doses[(len(doses) - 1) // 2]


def arm_label(arm: str) -> str:
    if arm.startswith("noisy_bn:"):
        return f"noisy BN (strength {noise_strength(arm):g})"
    return {"bn": "BN", "none": "no norm (He init)"}[arm]


def _spec(profile: dict, arm: str, lr: float, seed: int) -> dict:
    """One run. Gradient ICS is measured only where it is compared (BN and none at ``ics_lr``); measuring
    leaves the trajectory unchanged, so the same run also serves the accuracy comparison."""
    cfg = profile["ics"]
    measured = arm in ("bn", "none") and lr == cfg["ics_lr"]
    return ICS.spec(
        **data_fields(profile), device=profile.get("device", "cpu"), width=profile["width"],
        depth=profile["depth"], val_size=profile.get("val_size", 500), arm=arm,
        norm="none" if arm == "none" else "bn", noise=noise_strength(arm), lr=lr, seed=seed,
        steps=cfg["steps"], batch_size=cfg["batch_size"], measure_every=cfg["measure_every"] if measured else 0,
        record_every=cfg["record_every"], eval_every=cfg["eval_every"], val_eval_size=cfg["val_eval_size"],
        recal_batches=cfg["recal_batches"], step_sizes=cfg["step_sizes"], ics_layers=cfg["ics_layers"],
        **({"probe_steps": cfg["probe_steps"]} if measured else {}))


def _grid(cfg: dict, arm: str) -> list[float]:
    return cfg["lrs"][arm.partition(":")[0]]


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    """Every arm over its learning-rate grid on the tuning seeds, then (next round) at its validated rate on
    the other seeds; plus BN and none at the common ``ics_lr`` for every seed."""
    cfg = profile["ics"]
    out = [spec for arm in cfg["arms"] for spec in _tuned(profile, results, arm)[0]]
    out += [_spec(profile, arm, cfg["ics_lr"], seed) for arm in ("bn", "none") for seed in profile["seeds"]]
    return list(unique_specs(out).values())


def _tuned(profile: dict, results: Optional[dict], arm: str):
    return tuned(profile, results, _grid(profile["ics"], arm), lambda lr, seed: _spec(profile, arm, lr, seed))


def _runs(profile: dict, results: dict, arm: str, lr: float) -> dict:
    """seed → (status, result) of the finished runs of one cell."""
    rows = {s: lookup(results, _spec(profile, arm, lr, s)) for s in profile["seeds"]}
    return {s: (row["status"], row["result"]) for s, row in rows.items() if row is not None}


def failed_runs(profile: dict, results: dict) -> int:
    rows = (results.get(spec_key(spec)) for spec in measure(profile))
    return sum(1 for row in rows if row is not None and row["status"] == "failed")


def _final(run, key: str) -> float:
    status, result = run
    return 100.0 * result["final"][key]


def validated_lr(profile: dict, results: dict, arm: str) -> Optional[float]:
    """The grid learning rate with the best mean validation accuracy over the tuning seeds (ties: the
    smaller rate); ``None`` until every tuning run has finished."""
    return _tuned(profile, results, arm)[1]


def _per_seed(profile, results, arm, lr, fn) -> dict:
    return {s: fn(run) for s, run in _runs(profile, results, arm, lr).items()} if lr is not None else {}


# --------------------------------------------------------------------------------------------------
# decide: the rule calls, and every number the report shows
# --------------------------------------------------------------------------------------------------

@dataclass
class Arm:
    """One arm at its validated learning rate (and over its grid on the tuning seeds)."""

    lr: Optional[float]            # the validated rate (None until every tuning run finished)
    runs: int                      # finished runs at that rate
    diverged: int                  # of which diverged
    val: Interval                  # validation accuracy %, over seeds
    test: Interval                 # test accuracy %, over seeds
    cost: Optional[Effect]         # test accuracy BN − this arm, paired by seed (points); None for BN
    grid: dict[float, Interval]    # rate → validation accuracy % of the tuning seeds
    shift: Interval                # mean change per record of the perturbed activations' median
    curve: Optional[Band]          # validation accuracy % during training (None: no curve)
    percentiles: Optional[tuple]   # (seed, its "dist" record): the first seed's activation percentiles


@dataclass
class Layer:
    """Gradient ICS at one measured layer: BN and none at ``ics_lr``, over seeds."""

    name: str
    cos_bn: Interval
    cos_none: Interval
    gain: Interval       # cos BN − cos none, paired by seed
    dist_bn: Interval
    dist_none: Interval


@dataclass
class Probe:
    """Gradient ICS at one probe step η: BN and none trained at ``ics_lr``, measured on the same checkpoints."""

    eta: float
    effect: Effect                 # log10(relative change none ÷ BN), paired by seed, at the counted steps
    outcome: str                   # RULES[0] decided at this η alone
    stable: bool                   # in the stable range: a descent step in ≥ DESCENT_SHARE of both arms' steps
    descent: dict[str, float]      # arm → share of counted measurements where the probe step lowers the loss
    negative_cosine: dict[str, float]  # arm → share of counted measurements with mean cos(G, G′) < 0
    relative: dict[str, Interval]  # arm → ‖G − G′‖/‖G‖ (mean over layers and counted steps), over seeds
    cos_gain: Interval             # cos(G, G′) BN − none, paired (the scale the first version of the study used)
    counted: int                   # measurements counted (both arms stable), over seeds


@dataclass
class Findings:
    """Everything claim 1's report shows."""

    parts: list[Part]                      # BN reduces gradient ICS; injected shift costs accuracy
    failed_runs: int                       # failed runs among the first round's
    chosen_lr: dict[str, Optional[float]]  # arm → its validated rate (every arm of the profile)
    test_acc: dict[str, dict]              # arm → seed → test accuracy % at the validated rate
    probes: list[Probe]                    # gradient ICS at every probe step, smallest first
    stable_etas: list[float]               # the probe steps of the stable range
    changes: bool                          # part 1's outcome (each η alone) differs between probe steps of the stable range
    part1_eta: Optional[float]             # the probe step whose effect part 1 shows (verdict.across)
    reverses: bool                         # part 1 holds at one probe step of the stable range and is refuted at another
    rule_arm: str                          # the noisy arm part 2 compares with BN
    arms: dict[str, Arm]                   # BN, the noisy arms (weakest noise first), none
    layers: list[Layer]                    # gradient ICS per measured layer, at the training step (η = ics_lr)
    smoothness: Interval                   # loss range along the gradient, none / BN (geometric mean, ×)
    plateau: Interval                      # BN's validation accuracy change over the last third (points)
    at_edge: list[str]                     # arms whose validated rate is at an end of their grid
    dose: Band                             # test accuracy % against noise strength (0: BN)
    none_test: Interval                    # no normalization's test accuracy %, the dose figure's line
    ics_curves: dict[str, dict[str, Band]]  # "cosine", "distance", "loss_range" → BN, none → over steps


def decide(profile: dict, results: dict) -> Findings:
    cfg, tune = profile["ics"], tuning_seeds(profile)
    chosen = {arm: validated_lr(profile, results, arm) for arm in cfg["arms"]}
    test_acc = {arm: _per_seed(profile, results, arm, chosen[arm], lambda r: _final(r, "test_acc"))
                for arm in cfg["arms"]}
    noisy = rule_arm(cfg["arms"])
    ordered = ["bn", *noise_arms(cfg["arms"]), "none"]
    chosen_runs = {a: _runs(profile, results, a, chosen[a]) if chosen[a] is not None else {} for a in ordered}
    ics_runs = {a: _runs(profile, results, a, cfg["ics_lr"]) for a in ("bn", "none")}
    arms = {a: _arm(profile, results, a, chosen[a], chosen_runs[a], test_acc, tune) for a in ordered}

    # gradient ICS at every probe step, decided over the stable range
    probes = [_probe(k, eta, ics_runs) for k, eta in enumerate(cfg["probe_steps"])]
    stable = [p for p in probes if p.stable]
    changes = len({p.outcome for p in stable}) > 1
    decided = across(RULES[0], [p.effect for p in stable], RULES[0].bounds)
    if decided.effect is None:
        part1 = Part(RULES[0], probes[0].effect if probes else Effect([], Interval.of((math.nan,) * 3)), NO_DATA)
        part1_eta = None
    else:   # the deciding probe step's effect: the largest that holds / is undecided, or the largest refuted
        part1 = Part(RULES[0], decided.effect, decided.outcome, level=decided.level)
        part1_eta = stable[decided.index].eta
    parts = [part1, Part(RULES[1], paired_effect(test_acc["bn"], test_acc[noisy], "points", RULES[1].bounds))]

    # gradient ICS per layer at the training step (the first version's view)
    names = next((r["layers"] for st, r in ics_runs["bn"].values()), [])
    layers = [_layer(j, name, ics_runs) for j, name in enumerate(names)]

    def loss_range(run):
        st, r = run
        return float(np.mean(r["smooth"]["loss_range"])) if st == "done" and r["smooth"]["loss_range"] else math.nan
    ranges = {a: {s: loss_range(run) for s, run in ics_runs[a].items()} for a in ("bn", "none")}
    smoother = Interval.of(log_mean_ci([ranges["none"][s] / ranges["bn"][s] for s in ranges["bn"]
                                        if s in ranges["none"] and ranges["bn"][s] > 0]), "×")
    at_edge = [a for a in ordered if chosen[a] is not None and len(_grid(cfg, a)) > 1
               and chosen[a] in (min(_grid(cfg, a)), max(_grid(cfg, a)))]
    doses = [a for a in ordered if a.startswith("noisy_bn:")]
    return Findings(
        parts, failed_runs(profile, results), chosen, test_acc, probes, [p.eta for p in stable], changes, part1_eta,
        decided.changes, noisy,
        arms, layers, smoothness=smoother,
        plateau=_plateau_gain(chosen_runs["bn"], cfg["steps"]), at_edge=at_edge,
        dose=Band.of([0.0] + [noise_strength(a) for a in doses],
                     [t_interval(test_acc[a].values(), (0, 100)) for a in ["bn", *doses]]),
        none_test=Interval.of(t_interval(test_acc["none"].values(), (0, 100))),
        ics_curves={key: _ics_curves(ics_runs, key) for key in ("cosine", "distance", "loss_range")})


def _arm(profile, results, arm, lr, runs: dict, test_acc: dict, tune) -> Arm:
    """The arm at its validated rate ``lr``: ``runs`` are its finished runs there (seed → (status, result))."""
    cfg = profile["ics"]
    grid = {rate: _ci([_final(r, "val_acc") for s, r in _runs(profile, results, arm, rate).items() if s in tune],
                      (0, 100)) for rate in _grid(cfg, arm)}
    curves = [r["curve"] for st, r in runs.values() if st == "done" and r["curve"]["step"]]
    first_seed = min(runs) if runs else None
    return Arm(lr, len(runs), sum(1 for st, _ in runs.values() if st == "diverged"),
               val=_ci([_final(r, "val_acc") for r in runs.values()], (0, 100)),
               test=_ci(test_acc[arm].values(), (0, 100)),
               cost=paired_effect(test_acc["bn"], test_acc[arm], "points", (-100, 100)) if arm != "bn" else None,
               grid=grid,
               shift=_ci([float(np.mean(step_changes(r["dist"]["p50"]))) if len(r["dist"]["p50"]) > 1 else math.nan
                          for _, r in runs.values()]),
               curve=_band(curves[0]["step"], [[100 * v for v in c["val_acc"]] for c in curves], (0, 100))
               if curves else None,
               percentiles=(first_seed, runs[first_seed][1]["dist"]) if runs else None)


def _layer(j: int, name: str, ics_runs: dict) -> Layer:
    def layer_mean(run, key):
        st, r = run
        values = [v[j] for v in r["ics"][key]]
        return float(np.mean(values)) if st == "done" and values else math.nan
    cos = {a: {s: layer_mean(run, "cosine") for s, run in ics_runs[a].items()} for a in ("bn", "none")}
    dist = {a: {s: layer_mean(run, "distance") for s, run in ics_runs[a].items()} for a in ("bn", "none")}
    return Layer(name, _ci(cos["bn"].values(), (-1, 1)), _ci(cos["none"].values(), (-1, 1)),
                 paired_effect(cos["bn"], cos["none"], bounds=(-2, 2)).interval,
                 _ci(dist["bn"].values(), (0, math.inf)), _ci(dist["none"].values(), (0, math.inf)))


def _ics_curves(ics_runs: dict, key: str) -> dict[str, Band]:
    """BN's and none's ``key`` (mean over layers, or the smoothness probe's loss range) over the
    measurement steps, with its 95% band over seeds."""
    section = "smooth" if key == "loss_range" else "ics"
    out = {}
    for a in ("bn", "none"):
        runs = [r for st, r in ics_runs[a].values() if st == "done" and r[section]["step"]]
        if runs:
            out[a] = _band(runs[0][section]["step"], [[float(np.mean(v)) for v in r[section][key]] for r in runs],
                           (-1, 1) if key == "cosine" else (0, math.inf))
    return out


def _ci(values, bounds=None) -> Interval:
    return Interval.of(t_interval(list(values), bounds))


def _band(steps, series: list[list[float]], bounds=None) -> Band:
    """Mean and 95% interval over ``series`` at each step all of them reach."""
    n = min(len(s) for s in series)
    return Band.of(steps[:n], [t_interval([s[i] for s in series], bounds) for i in range(n)])


def stable_steps(result: dict) -> list[bool]:
    """For each probe measurement of a run: whether its training was stable at that step (its loss average
    within :data:`STABLE_RISE` of the lowest so far, the batch loss under :data:`STABLE_SPIKE` times it)."""
    ema, losses = result["ema_losses"], result["losses"]
    lowest = np.minimum.accumulate(np.asarray(ema, dtype=float)) if ema else np.array([])
    return [step < len(ema) and bool(ema[step] <= STABLE_RISE * lowest[step] and losses[step] <= STABLE_SPIKE * ema[step])
            for step in result["ics"]["probe"]["step"]]


def _probe(k: int, eta: float, ics_runs: dict) -> Probe:
    """Gradient ICS at the k-th probe step: per seed, the measurements where both arms are stable."""
    per_seed = {a: {} for a in ("bn", "none")}
    cosine = {a: {} for a in ("bn", "none")}
    descent = {a: [] for a in ("bn", "none")}
    negative = {a: [] for a in ("bn", "none")}
    counted = 0
    for seed in sorted(set(ics_runs["bn"]) & set(ics_runs["none"])):
        runs = {a: ics_runs[a][seed][1] for a in ("bn", "none")}
        if any("probe" not in r["ics"] for r in runs.values()):
            continue
        n = min(len(r["ics"]["probe"]["step"]) for r in runs.values())
        both = [sb and sn for sb, sn in zip(stable_steps(runs["bn"])[:n], stable_steps(runs["none"])[:n])]
        keep = [i for i in range(n) if both[i]]
        counted += len(keep)
        for a, r in runs.items():
            probe = r["ics"]["probe"]
            rel = [float(np.mean(probe["relative"][i][k])) for i in keep]
            cos = [float(np.mean(probe["cosine"][i][k])) for i in keep]
            per_seed[a][seed] = float(np.mean(rel)) if rel else math.nan
            cosine[a][seed] = float(np.mean(cos)) if cos else math.nan
            descent[a] += [bool(probe["descent"][i][k]) for i in keep]
            negative[a] += [c < 0 for c in cos]
    ratio = {s: math.log10(per_seed["none"][s] / per_seed["bn"][s]) for s in per_seed["bn"]
             if per_seed["bn"][s] > 0 and per_seed["none"][s] > 0}
    effect = paired_effect(ratio, {s: 0.0 for s in ratio}, "decades", RULES[0].bounds)
    shares = {a: float(np.mean(v)) if v else math.nan for a, v in descent.items()}
    return Probe(eta, effect, RULES[0].decide(effect),
                 stable=all(math.isfinite(v) and v >= DESCENT_SHARE for v in shares.values()),
                 descent=shares, negative_cosine={a: float(np.mean(v)) if v else math.nan for a, v in negative.items()},
                 relative={a: _ci(v.values(), (0, math.inf)) for a, v in per_seed.items()},
                 cos_gain=paired_effect(cosine["bn"], cosine["none"], bounds=(-2, 2)).interval, counted=counted)


def _plateau_gain(runs: dict, steps: int) -> Interval:
    """Change of validation accuracy (points) from the evaluation nearest 2/3 of the run to its end."""
    gains = []
    for status, r in runs.values():
        c = r["curve"]
        if status == "done" and len(c["step"]) > 1:
            i = int(np.argmin([abs(s - 2 * steps / 3) for s in c["step"][:-1]]))
            gains.append(100 * (c["val_acc"][-1] - c["val_acc"][i]))
    return Interval.of(t_interval(gains), "points")


# --------------------------------------------------------------------------------------------------
# render: tables, figures, prose
# --------------------------------------------------------------------------------------------------

def differences(profile: dict, findings: Findings) -> list[str]:
    """What this run measured that sets its setting apart from Santurkar et al.'s (shown where the verdict
    disagrees with theirs)."""
    cfg, f = profile["ics"], findings
    probes = "; ".join(f"η {p.eta:g}{'' if p.stable else ' (unstable)'}: {p.effect.interval.text(2)}" for p in f.probes)
    out = [f"Gradient ICS without BN ÷ with BN at each probe step: {probes}. Santurkar et al. measure it with the "
           f"training step of a VGG on CIFAR-10; here the training lr is {cfg['ics_lr']:g}."]
    at_lr = next((p for p in f.probes if p.eta == cfg["ics_lr"]), None)
    if at_lr is not None:
        out.append(f"At the training step the gradient's direction reversed (negative cosine) in "
                   f"{_share(at_lr.negative_cosine['none'])} of the unnormalized net's measurements and "
                   f"{_share(at_lr.negative_cosine['bn'])} of BN's: the unnormalized net's instability, which "
                   f"Santurkar et al. attribute to smoothness, not ICS.")
    out.append(f"Injected shift cost {f.parts[1].effect.interval.text(1)} of test accuracy ({arm_label(f.rule_arm)}); "
               f"the noise sits after each residual branch's first BN only, where the next BN renormalizes it, "
               f"Santurkar et al.'s after every BN of a VGG.")
    return out


def render(profile: dict, findings: Findings) -> ClaimResult:
    cfg, seeds, f = profile["ics"], profile["seeds"], findings
    parts, arms, failed, noisy = f.parts, f.arms, f.failed_runs, f.rule_arm
    acc_rows = [[arm_label(a), f"{noise_strength(a):g}" if a != "none" else "—",
                 f"{arm.lr:g}" if arm.lr is not None else "n/a", fmt_ci(arm.val, 1), fmt_ci(arm.test, 1),
                 arm.cost.interval.text(1) if arm.cost else "—", f"{arm.runs} ({arm.diverged} diverged)"]
                for a, arm in arms.items()]
    grid_rows = [[arm_label(a), "; ".join(f"lr {lr:g}: {fmt_ci(v, 1)}" for lr, v in arm.grid.items())]
                 for a, arm in arms.items()]
    ics_rows = [[layer.name, fmt_ci(layer.cos_bn, 3), fmt_ci(layer.cos_none, 3), layer.gain.text(3),
                 fmt_ci(layer.dist_bn, 4), fmt_ci(layer.dist_none, 4)] for layer in f.layers]
    probe_rows = [[f"{p.eta:g}" + (" (training lr)" if p.eta == cfg["ics_lr"] else ""),
                   "yes" if p.stable else "no", p.effect.interval.text(2), p.outcome,
                   fmt_ci(p.relative["bn"], 3), fmt_ci(p.relative["none"], 3), p.cos_gain.text(3),
                   f"{_share(p.descent['bn'])} / {_share(p.descent['none'])}",
                   f"{_share(p.negative_cosine['bn'])} / {_share(p.negative_cosine['none'])}", str(p.counted)]
                  for p in f.probes]
    doses = noise_arms(cfg["arms"])
    at_edge = [arm_label(a) for a in f.at_edge]
    at_lr = next((p for p in f.probes if p.eta == cfg["ics_lr"]), None)
    stable_text = (", ".join(f"{eta:g}" for eta in f.stable_etas) if f.stable_etas else "none")

    # the verdict and its prose
    verdict = Verdict.from_parts(parts, key_number=(f"gradient change without BN ÷ with BN "
                                                    f"{parts[0].effect.interval.text(2)} (η "
                                                    f"{f.part1_eta if f.part1_eta is not None else 'n/a'}); "
                                                    f"noisy-BN cost {parts[1].effect.interval.text(1)}"),
                                 explanation="", rule=combine_with_premise)
    if failed:
        verdict.verdict = NO_VERDICT
    ratio = parts[0].effect.interval
    direction = ("less" if ratio.mean > 0 else "more") if ratio.finite else ""
    paragraphs = [p for p in [
        (f"{failed} of this claim's runs failed, so there is no verdict; rerun `bnlab study` to retry them."
         if failed else ""),
        f"BN and an unnormalized twin trained at one rate, {cfg['ics_lr']:g}, from the same initial weights and data "
        f"order. Every {cfg['measure_every']} steps we measured gradient ICS: how much a layer's gradient G changes "
        f"(to G′) when the earlier layers take a step of size η first, relative to its size.",
        (f"Where both networks' steps still lower the loss (η ≤ {f.stable_etas[-1]:g}), at η = {f.part1_eta:g} the "
         f"gradient changed {factor_text(ratio)} {direction} with BN ({ratio.text(2)} decades"
         + (f", the {percent(parts[0].level)} interval of a claim tested at {len(f.stable_etas)} probe steps"
            if parts[0].level != confidence() else "")
         + (", and the outcome changed between probe steps" if f.changes else "") + "). "
         f"Santurkar et al. found BN does not lower ICS either." if f.stable_etas and f.part1_eta is not None else
         "No probe step was a descent step for both networks, so part 1 has no data."),
        (f"At the training step (η = {at_lr.eta:g}) the unnormalized net's step raised the loss in "
         f"{_share(1 - at_lr.descent['none'])} of the measurements, BN's in {_share(1 - at_lr.descent['bn'])}. That "
         f"is BN's smoothing effect, not ICS, and it is why the first version of this study saw less ICS with BN."
         if at_lr is not None and math.isfinite(at_lr.descent["none"]) else ""),
        f"Injecting noise that shifts after BN ({arm_label(noisy)}, each arm at its own validated rate) changed "
        f"test accuracy by {_signed(parts[1].effect.interval)} points.",
        (f"BN's validation accuracy was still rising at the end (+{f.plateau.mean:.1f} points over the last third), "
         f"so part 2 compares the arms after {cfg['steps']} steps, not at convergence."
         if f.plateau.finite and f.plateau.low > RULES[1].margin else ""),
    ] if p]
    details = [
        {"title": "How gradient ICS and its stable range are measured", "paragraphs": [
            f"Probe steps {', '.join(f'{p.eta:g}' for p in f.probes)}; layers at depth fractions "
            f"{cfg['ics_layers']}. Per seed, the relative change ‖G − G′‖/‖G‖ is averaged over layers and over the "
            f"measurements where both networks are stable (loss average within {STABLE_RISE - 1:.0%} of its lowest so "
            f"far, batch loss under {STABLE_SPIKE:g}× the average); the effect is log10 of its ratio, none over BN.",
            f"A probe step is in the stable range when it lowers the batch loss in at least {DESCENT_SHARE:.0%} of both "
            f"networks' measurements. Part 1 holds if it holds at every probe step of that range and is refuted if "
            f"it is refuted at one (at the Bonferroni level over the range) and holds at none: "
            + "; ".join(f"η {p.eta:g}: {p.effect.interval.text(2)}, {p.outcome}" for p in f.probes if p.stable) + ".",
            f"The cosine the first version used, at the training step: Δcos(G, G′) BN − none "
            f"{at_lr.cos_gain.text(3) if at_lr is not None else 'n/a'}; cos(G, G′) < 0 in "
            f"{_share(at_lr.negative_cosine['none']) if at_lr is not None else 'n/a'} of the unnormalized net's "
            f"measurements against {_share(at_lr.negative_cosine['bn']) if at_lr is not None else 'n/a'} with BN.",
            f"Smoothness: along the gradient the loss varies {f.smoothness.text()} times as much without BN as with it."]},
        {"title": "The injected noise", "paragraphs": [
            PLACEMENT,
            f"Strengths {', '.join(f'{noise_strength(a):g}' for a in doses)}: test accuracy "
            + ", ".join(f"{fmt_ci(arms[a].test, 1)}%" for a in doses) + f" against BN's {fmt_ci(arms['bn'].test, 1)}%, "
            f"BN statistics re-estimated on clean batches before every evaluation. The noise moves the median of the "
            f"perturbed activations by {fmt_ci(arms[noisy].shift, 4)} per record, against {fmt_ci(arms['bn'].shift, 4)} "
            f"with BN.",
            (f"Learning rates at the edge of their grid (a wider grid might do better): {', '.join(at_edge)}."
             if at_edge else "No arm validated an end of its learning-rate grid.")]},
    ]
    verdict.explanation = " ".join(paragraphs + [f"Part 1: {parts[0].text(2)}. Part 2: {parts[1].text(1)}."])

    tables = [
        {"title": "Gradient ICS by probe step η (BN and none trained at the same rate; counted: the measurements "
                  "where both arms' training is stable)",
         "columns": ["η", "stable range", "log10 change none ÷ BN (paired)", "outcome at this η",
                     "‖G − G′‖/‖G‖ BN", "‖G − G′‖/‖G‖ none", "Δcos BN − none", "descent steps BN / none",
                     "cos < 0 BN / none", "counted"], "rows": probe_rows},
        {"title": "Accuracy at each arm's validated learning rate (test set, once at the end)",
         "columns": ["arm", "noise strength", "validated lr", "validation acc %", "test acc %",
                     "cost vs BN (paired, points)", "runs"], "rows": acc_rows},
        {"title": f"Validation accuracy over the learning-rate grid, tuning seeds {seed_list(tuning_seeds(profile))} "
                  f"(the choice above)",
         "columns": ["arm", "validation acc % per lr"], "rows": grid_rows, "details": True},
        {"title": f"Gradient ICS per layer at the training step (η = {cfg['ics_lr']:g})",
         "columns": ["layer", "cos(G, G′) BN", "cos(G, G′) none", "Δcos BN − none (paired)", "‖G − G′‖ BN",
                     "‖G − G′‖ none"], "rows": ics_rows, "details": True},
        paper_table(PAPER, {key: (text, f"width-{profile['width']:g} ResNet-{profile['depth']} on "
                                        f"{dataset_label(profile)}, {cfg['steps']} plain-SGD steps at batch "
                                        f"{cfg['batch_size']}; {STAND_IN}")
                            for key, text in (("cosine", f"ratio none ÷ BN {parts[0].effect.interval.text(2)} decades "
                                                         f"(stable range η {stable_text}; part 1 {parts[0].outcome})"),
                                              ("noisy_cost", f"{parts[1].effect.interval.text(1)} ({arm_label(noisy)})"),
                                              ("smoothness", f.smoothness.text()))}),
    ]
    return ClaimResult(
        answer=answer(findings), paragraphs=paragraphs, details=details, differences=differences(profile, findings),
        number=NUMBER, title=TITLE, verdict=verdict, literature=LITERATURE, rule=RULE, expected=EXPECTED,
        finding=FINDING, failed_runs=failed, tables=tables,
        caveats=[tuning_caveat(profile),
                 f"{cfg['steps']} plain-SGD steps of a width-{profile['width']} ResNet-{profile['depth']} on "
                 f"{dataset_label(profile)}, {len(seeds)} seeds; Santurkar et al. used VGG and deep linear nets on "
                 f"CIFAR-10: {STAND_IN}.",
                 "Gradient ICS is measured with plain SGD at one common learning rate, not at each arm's best; "
                 "the probe steps vary the step the earlier layers take, not the training trajectory.",
                 "The noise is one family (log-normal scale, Gaussian shift, parameters redrawn every step) at "
                 f"{len(doses)} strengths; stronger noise eventually hurts any network."],
        figures=[_probe_figure(f, cfg["ics_lr"]), _accuracy_figure(f), _distribution_figure(f),
                 _ics_figure(f, cfg["ics_lr"])],
        numbers={"parts": [p.to_dict() for p in parts], "chosen_lr": f.chosen_lr, "rule_arm": noisy,
                 "test_acc": {a: {str(s): v for s, v in f.test_acc[a].items()} for a in arms},
                 "probes": [{"eta": p.eta, "stable": p.stable, "outcome": p.outcome, "interval": p.effect.interval,
                             "values": p.effect.values, "descent": p.descent, "negative_cosine": p.negative_cosine,
                             "relative": p.relative, "cos_gain": p.cos_gain, "counted": p.counted} for p in f.probes],
                 "stable_etas": f.stable_etas, "changes_within_stable_range": f.changes,
                 "part1_eta": f.part1_eta, "holds_and_refuted_within_stable_range": f.reverses,
                 "smoothness_ratio": f.smoothness.to_dict(), "bn_plateau_gain": f.plateau.to_dict(),
                 "lr_at_grid_edge": at_edge, "failed_runs": failed})


def factor_text(interval: Interval) -> str:
    """A log10 ratio's size as a factor: 0.28 decades → "1.9×"."""
    return f"{10 ** abs(interval.mean):.1f}×" if interval.finite else "n/a"


def _signed(interval: Interval) -> str:
    """An accuracy change with its sign and interval: "−6.4 [−10.6, −2.3]" for a cost of 6.4 points."""
    return f"{-interval.mean:+.1f} [{-interval.high:.1f}, {-interval.low:.1f}]" if interval.finite else "n/a"


def _share(value: float) -> str:
    return f"{100 * value:.0f}%" if math.isfinite(value) else "n/a"


def _probe_figure(findings: Findings, lr: float) -> dict:
    """Gradient ICS against the probe step: the dose-response part 1 is decided over."""
    fig, (ax_ratio, ax_descent) = figure(ncols=2)
    probes = findings.probes
    etas = [p.eta for p in probes]
    ax_ratio.plot(etas, [p.effect.interval.mean for p in probes], marker="o", color=arm_color("bn"),
                  label="log10 change none ÷ BN")
    ax_ratio.fill_between(etas, [p.effect.interval.low for p in probes], [p.effect.interval.high for p in probes],
                          color=arm_color("bn"), alpha=0.2, linewidth=0)
    for y, style, name in ((RULES[0].threshold, "--", "threshold"), (RULES[0].margin, ":", "margin"),
                           (-RULES[0].margin, ":", None), (0.0, "-", None)):
        ax_ratio.axhline(y, color="#555", linestyle=style, linewidth=0.8, label=name)
    for ax in (ax_ratio, ax_descent):
        ax.set_xscale("log")
        ax.set_xlabel("probe step η (earlier layers step −η·G)")
        ax.axvline(lr, color="#999", linestyle="-.", linewidth=0.8)
        stable = [p.eta for p in probes if p.stable]
        if stable:
            ax.axvspan(min(stable) / 1.3, max(stable) * 1.3, color="#88c", alpha=0.12, linewidth=0)
    ax_ratio.set_ylabel("decades (> 0: less gradient ICS with BN)")
    ax_ratio.set_title("Gradient ICS, without BN ÷ with BN")
    for arm in ("bn", "none"):
        ax_descent.plot(etas, [100 * p.descent[arm] for p in probes], marker="o", color=arm_color(arm),
                        label=arm_label(arm))
    ax_descent.axhline(100 * DESCENT_SHARE, color="#555", linestyle="--", linewidth=0.8)
    ax_descent.set_ylabel("% of measurements where the step lowers the loss")
    ax_descent.set_title("Descent steps (the stable range: ≥ 95% for both)")
    legend_outside(fig, [ax_ratio, ax_descent])
    return {"name": "claim1_probe_steps", "title": "Gradient ICS against the probe step",
            "figure": fig, "caption": "Left: log10 of the relative gradient change ‖G − G′‖/‖G‖ without BN over "
                                      "with BN, paired by seed (band: interval over seeds), with the rule's "
                                      "threshold and margin; the shaded probe steps form the stable range over "
                                      "which part 1 is decided; the dash-dotted line is the training rate. Right: "
                                      "how often the probe step lowers the batch loss, per arm."}


def _color(arm: str, arms) -> str:
    """The arm's colour: the noisy arms in shades of one hue, by strength."""
    doses = [a for a in arms if a.startswith("noisy_bn:")]
    return arm_color(arm, doses.index(arm), len(doses)) if arm in doses else arm_color(arm)


def _accuracy_figure(findings: Findings) -> dict:
    fig, (ax_dose, ax_curve) = figure(ncols=2)
    band(ax_dose, *findings.dose, arm_color("noisy_bn"), "BN → noisy BN (test)")
    none = findings.none_test
    if math.isfinite(none.mean):
        ax_dose.axhline(none.mean, color=arm_color("none"), linestyle="--", label=arm_label("none") + " (test)")
        ax_dose.axhspan(none.low, none.high, color=arm_color("none"), alpha=0.12, linewidth=0)
    ax_dose.set_xlabel("noise strength (0 = BN)")
    ax_dose.set_ylabel("test accuracy % (validated lr)")
    ax_dose.set_title("Dose-response: accuracy against injected noise")
    for a, arm in findings.arms.items():
        if arm.curve is not None:
            band(ax_curve, *arm.curve, _color(a, findings.arms), arm_label(a))
    ax_curve.set_xlabel("step")
    ax_curve.set_ylabel("validation accuracy % (clean statistics)")
    ax_curve.set_title("Validation accuracy during training")
    legend_outside(fig, [ax_dose, ax_curve])
    return {"name": "claim1_dose_response", "title": "Injected shift against accuracy",
            "figure": fig, "caption": "Left: test accuracy at each arm's validated learning rate against the noise "
                                      "strength (band: 95% interval over seeds). Right: validation accuracy with "
                                      "BN statistics re-estimated without noise, showing where training plateaus."}


def _distribution_figure(findings: Findings) -> dict:
    shown = [a for a, arm in findings.arms.items() if arm.percentiles is not None]
    fig, axes = figure(ncols=max(1, len(shown)), width=3.0)
    for ax, a in zip(axes, shown):
        color = _color(a, findings.arms)
        first_seed, dist = findings.arms[a].percentiles
        for key, style, name in (("p15", LINESTYLES[2], "15th percentile"), ("p50", LINESTYLES[0], "median"),
                                 ("p85", LINESTYLES[1], "85th percentile")):
            if dist["step"]:  # one seed: averaging seeds would smooth away the step-to-step shift
                ax.plot(dist["step"], dist[key], color=color, linestyle=style, label=name)
        ax.set_title(f"{arm_label(a)}, seed {first_seed}")
        ax.set_xlabel("step")
    axes[0].set_ylabel("first BN output, middle block")
    legend_outside(fig, axes)
    return {"name": "claim1_percentiles", "title": "Distribution of the activations noisy BN perturbs",
            "figure": fig, "caption": "15th, 50th and 85th percentiles (line styles) of the middle residual block's "
                                      "first BN output, noise included (no norm: its first convolution's output), "
                                      "during training; one seed, each arm at its validated learning rate."}


def _ics_figure(findings: Findings, lr: float) -> dict:
    fig, axes = figure(ncols=3)
    panels = (("cosine", "cos(G, G′) (mean over layers)"), ("distance", "‖G − G′‖ (mean over layers)"),
              ("loss_range", "loss range along −η·g"))
    for ax, (key, ylabel) in zip(axes, panels):
        for a, curve in findings.ics_curves[key].items():
            band(ax, *curve, arm_color(a), arm_label(a))
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title({"cosine": "Gradient ICS: direction", "distance": "Gradient ICS: size",
                      "loss_range": "Smoothness along the gradient"}[key])
    axes[2].set_yscale("log")
    legend_outside(fig, axes)
    return {"name": "claim1_gradient_ics", "title": f"Gradient ICS and smoothness at learning rate {lr:g}",
            "figure": fig, "caption": "BN and no normalization at the same learning rate and steps; bands are 95% "
                                      "intervals over seeds (paired by seed in the verdict)."}


# ------------------------------------------------------------------------------------------------ answer

def _changing(findings: Findings) -> str:
    """Part 1's clause when its outcome changes across the stable range: each outcome with its probe steps
    ("higher with BN at η 0.003 and 0.01, undecided at η 0.03 and 0.1"); empty otherwise (the generic
    clause)."""
    if not findings.changes:
        return ""
    said = {REFUTED: "not clearly lower with BN", UNDECIDED: "undecided", HOLDS: "lower with BN"}
    steps: dict[str, list[str]] = {}
    for p in findings.probes:
        if p.stable:
            word = ("higher with BN" if p.outcome == REFUTED and p.effect.interval.high < 0 else
                    said.get(p.outcome, p.outcome))
            steps.setdefault(word, []).append(f"{p.eta:g}")
    where = ", ".join(f"{word} at η {' and '.join(etas) if len(etas) < 3 else ', '.join(etas)}"
                      for word, etas in steps.items())
    return ("we could not tell whether BN lowers gradient ICS: the answer changed with the probe step η "
            f"among those where both networks' steps were stable ({where})")


def answer(findings: Findings) -> str:
    """The claim's answer in one plain sentence (the report's first screen), from its parts."""
    from bnlab.study import answers  # only the answer reads the shared phrasing
    eta = f"{findings.part1_eta:g}" if findings.part1_eta is not None else "n/a"
    others = [p for p in findings.probes if p.stable and p.eta != findings.part1_eta]
    elsewhere = (", and at no probe step where both networks' steps were stable did BN clearly lower it"
                 if others else "")
    return answers.sentence(findings.parts, [
        answers.Phrase(holds="with BN, earlier layers' steps changed a layer's gradient {x} less (lower gradient ICS) "
                             "at every probe step where both networks' steps were stable",
                       refuted=(f"BN did not lower gradient ICS: at probe step η {eta} earlier layers' steps "
                                f"changed a layer's gradient {{x}} more with BN, not less{elsewhere}"
                                if findings.parts[0].effect.interval.mean < 0 else
                                f"BN did not clearly lower gradient ICS: at probe step η {eta} earlier layers' "
                                f"steps changed a layer's gradient at most slightly less with BN ({{x}}){elsewhere}"),
                       reversed=f"BN raised gradient ICS: at probe step η {eta} earlier layers' steps changed a "
                                f"layer's gradient {{x}} more{elsewhere}",
                       question="BN lowers gradient ICS",
                       undecided=_changing(findings)),
        answers.Phrase(holds="injecting shift after BN cost {x} of test accuracy, as if shift mattered",
                       refuted="injecting shift after BN cost no clear accuracy ({s}), so shift is not why BN helps",
                       reversed="injecting shift after BN raised test accuracy by {x}",
                       question="injected shift costs accuracy"),
    ])
