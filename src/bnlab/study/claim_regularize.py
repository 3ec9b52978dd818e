"""Claim 3: "BN regularizes."

An overfitting regime: a small class-balanced training subset and enough steps that every arm fits it
(training accuracy ≈ 100%), so the generalization gap (training − test accuracy of the final model) is
compared at matched training accuracy. Arms, each at the learning rate its validation accuracy chose:
BN at the full batch; BN with ghost batches of several sizes (smaller → noisier statistics: the
dose–response of Hoffer et al. 2017); GroupNorm (normalization without any batch dependence, the
control that separates "normalizing" from "batch noise"); no normalization; and no normalization with a
weight decay large enough to change the weights (its weight-norm change is reported). Diverged runs and
runs that did not fit the subset are flagged and excluded, with a count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pydantic import (ConfigDict, Field, NonNegativeFloat, PositiveFloat, PositiveInt, field_validator,
                      model_validator)

from bnlab.study import style
from bnlab.study.common import (DIFF_BOUNDS, Band, OwnLooks, all_finished, arm_label, ci, dataset_label, final_pct,
                                fmt, fmt_ci, lookup, narrowed, paper_table, resnet_depths, train_spec, tuned,
                                tuning_caveat)
from bnlab.study.sequential import of_profile, part_look
from bnlab.study.verdict import (SUPPORTED, UNDECIDED, ClaimResult, Effect, Interval, Part, Rule, Verdict,
                                 at_confidence, paired_effect)

NUMBER = 3
SLUG = "regularize"
TITLE = "BN regularizes"
LITERATURE = ("Ioffe & Szegedy 2015 reduced dropout thanks to BN; Luo et al. 2019 "
              "(https://arxiv.org/abs/1809.00846) trace the effect to the noise of batch statistics, and "
              "Hoffer et al. 2017 (https://arxiv.org/abs/1705.08741) show smaller ghost batches generalize "
              "better. Zhang et al. 2019 (Fixup) match BN's test error only once extra regularization is added.")
FINDING = ("Luo et al. 2019, Hoffer et al. 2017: batch noise regularizes, smaller ghost batches generalize "
           "better (supported)")
EXPECTED = SUPPORTED
RULES = [
    Rule("BN shrinks the gap", "gap without normalization − gap with BN (train − test accuracy at matched, "
         "≈100% training accuracy)", threshold=1.0, margin=0.5, unit="points", bounds=DIFF_BOUNDS),
    Rule("through batch noise", "gap with BN at the full batch − gap with the smallest ghost batch",
         threshold=1.0, margin=0.5, unit="points", bounds=DIFF_BOUNDS),
]
RULE = ("Per seed, each arm at its validated learning rate trains at a constant rate until it fits the subset "
        "(training accuracy ≥ the profile's fit threshold, checked every eval_every steps) or reaches the cap; "
        "the gap = training accuracy on the whole subset − test accuracy, both of the model at that point. Every "
        "seed counts: a run that never fits (or diverged) enters with an interval, its observed gap up to that gap "
        "plus the training accuracy it still lacks (continuing to fit could add at most that to its training "
        "accuracy, and nothing to its test accuracy, at the upper end; as much to both, at the lower), and a part "
        "is decided only when both ends of every such interval give the same outcome. Under sequential seeds "
        "each part stops at the look that decides it, and only the arms of an undecided part run the next block "
        "(part 1: none and BN; part 2: BN and its smallest ghost batch); the arms of no part (GroupNorm, weight "
        "decay, the other ghost batches) run the first look's seeds. "
        + " ".join(f"Part {i + 1}, {r.text()}." for i, r in enumerate(RULES)))
WU_HE = "Wu & He 2018, Fig. 1"
WU_HE_SETTING = ("ImageNet ResNet-50 trained on the full training set, validation error; BN's statistics over the "
                 "images of one GPU")
WU_HE_BN = {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7}  # top-1 validation error %, images per GPU
PAPER = [{"quantity": f"test error % with BN over {g} images (ours: ghost batches of {g})", "paper": WU_HE,
          "value": f"{e:.1f}", "setting": WU_HE_SETTING + f", {g} images per GPU", "ours_key": f"ghost:{g}"}
         for g, e in WU_HE_BN.items()] + [
    {"quantity": "test error % with GroupNorm", "paper": WU_HE, "value": "24.1 at 2 images per GPU (flat, within "
     "0.2, from 32 down to 2)", "setting": WU_HE_SETTING + "; GroupNorm does not depend on the batch",
     "ours_key": "groupnorm"}]


class Config(OwnLooks):
    """The ``regularize`` section; under its own ``looks`` (or the profile's) each part stops at the look that
    decides it (:func:`part_looks`)."""

    model_config = ConfigDict(extra="forbid")
    dataset: Optional[str] = None
    depth: Optional[PositiveInt] = Field(None, description="the ResNet depth of this claim's runs, 6n+2 (unset: the "
                                                           "profile's or the setting's)")
    subset: PositiveInt
    batch_size: PositiveInt
    ghost_sizes: list[PositiveInt] = Field(min_length=2)
    max_steps: PositiveInt
    lrs: list[PositiveFloat] = Field(min_length=1)
    weight_decay: NonNegativeFloat
    fit_threshold: float = Field(99.0, gt=0, le=100)
    eval_every: Optional[PositiveInt] = None
    test_eval_size: Optional[PositiveInt] = None
    group_channels: PositiveInt = Field(4, description="GroupNorm's channels per group (groupnorm:K): at least 2, so "
                                                       "the control is not InstanceNorm in a narrow net")
    warmup_steps: PositiveInt = Field(50, description="linear warm-up before the constant rate")

    _check_depth = field_validator("depth")(classmethod(lambda cls, v: v if v is None else resnet_depths([v])[0]))

    @model_validator(mode="after")
    def _ghosts_divide_the_batch(self):
        bad = [g for g in self.ghost_sizes if g >= self.batch_size or self.batch_size % g]
        if bad:
            raise ValueError(f"ghost_sizes {bad} must be smaller than batch_size {self.batch_size} and divide it")
        return self


PRESETS = {
    "tiny": {"subset": 64, "batch_size": 32, "ghost_sizes": [4, 16], "max_steps": 8, "lrs": [0.05],
             "weight_decay": 5e-3, "fit_threshold": 1.0, "warmup_steps": 2, "eval_every": 4},
    # batch 64 rather than 32: a pilot on seeds 100-107 (not reported) found full-batch statistics over 32
    # examples already so noisy that ghost batches of 4 changed the gap by 1.1 ± 5.7 points, against
    # 6.6 ± 4.0 at batch 64; ghost batches of 16 complete the dose-response (4, 16, 64)
    # every run trains until it fits or reaches the cap of 1000 steps (2.5× the first version's budget; on pilot
    # seeds 100-105 every run fitted within 600 steps at a constant rate; one that does not enters as an interval)
    # rates 0.01 and 0.02 added (pilot seeds 100-109): at 0.05 the unnormalized net stayed at chance (10.2%
    # training accuracy) in 5 of 14 seeds of standard's MNIST-1D runs, each then entering as an interval up to
    # 90 points wide; at 0.02 it fitted all 10 pilot seeds, and weight decay all 10 at 0.01.
    # its own sequential seeds, each part stopping at the look that decides it: part 2 (batch noise, −1.9 to
    # +0.3 points in seed sets 60-89, 100-139, 1000-1119, ≈ −1.1 pooled, against a margin of 0.5 and a per-seed
    # spread of ≈ 4.3) needs 40-80 seeds (simulated power to refute −1.1: 84%; 16% with the profile's 6/10
    # looks); the arms of no part stop at the first look (seeds 1000-1119 ran them to 40-60 seeds: 294 s)
    "quick": {"subset": 128, "batch_size": 64, "ghost_sizes": [4, 16], "max_steps": 1000,
              "lrs": [0.01, 0.02, 0.05, 0.2], "weight_decay": 2e-3, "fit_threshold": 99.0, "eval_every": 25,
              "looks": [10, 20, 40, 80], "look_alphas": [0.01, 0.01, 0.01, 0.02]},
    # Wu & He's per-GPU batch sizes 32/16/8/4/2 as ghost batches of a batch of 128 (4 to 64 "GPUs")
    "full": {"subset": 2000, "batch_size": 128, "ghost_sizes": [2, 4, 8, 16, 32], "max_steps": 6000,
             "lrs": [0.03, 0.1, 0.3], "weight_decay": 2e-3, "fit_threshold": 99.0, "eval_every": 200,
             "group_channels": 16, "warmup_steps": 500},
}
# standard judges every claim in four settings at quick's budget per setting (on 1000 examples, batch 128 and
# 600 steps, the unnormalized net fitted in no seed: 93.9% training accuracy at best). Its runs stay at ResNet-8
# in the depth-14 settings too (one run serves both depths of a dataset): the claim is about the batch a BN layer
# averages over, not depth, and at depth 14 its unnormalized runs cost ≈ 3× BN's (18% of standard's CPU time
# with both depths)
PRESETS["standard"] = {**PRESETS["quick"], "depth": 8}

# what the registry, the plan and the profiles read (see bnlab.study.claims)
TUNED_ON_SEEDS = True  # every rate on the tuning seeds, then the other seeds at each arm's choice
LATER_ROUNDS = None    # nothing more once the tuning seeds have chosen
PROFILE_CHECKS = ()
DATASET_FIELDS = ("dataset",)  # --dataset sets this section's own dataset too


# ------------------------------------------------------------------------------------------------ measure

def arms(profile: dict) -> list[tuple[str, str, float]]:
    """(arm key, norm, weight decay) per arm."""
    cfg = profile["regularize"]
    return ([("bn", "bn", 0.0)] + [(f"ghost:{g}", f"ghost:{g}", 0.0) for g in sorted(cfg["ghost_sizes"], reverse=True)]
            + [("groupnorm", f"groupnorm:{cfg['group_channels']}", 0.0), ("none", "none", 0.0),
               ("none+wd", "none", cfg["weight_decay"])])


def run_depth(profile) -> int:
    """The depth this claim trains at: its own ``depth`` if set, else the profile's (the setting's)."""
    return profile["regularize"].get("depth") or profile["depth"]


def _spec(profile, norm, weight_decay, lr, seed) -> dict:
    cfg = profile["regularize"]
    fields = {"dataset": cfg.get("dataset") or profile["dataset"], "depth": run_depth(profile),
              "subset": cfg["subset"], "norm": norm, "lr": lr,
              "batch_size": cfg["batch_size"], "max_steps": cfg["max_steps"], "epochs": 10 ** 6,
              "weight_decay": weight_decay, "seed": seed, "train_eval_size": cfg["subset"],
              "schedule": "constant", "warmup_fraction": cfg["warmup_steps"] / cfg["max_steps"],
              "stop_at_train_acc": cfg["fit_threshold"] / 100}
    if cfg.get("eval_every"):
        fields["eval_every"] = cfg["eval_every"]
    if cfg.get("test_eval_size"):
        fields["test_eval_size"] = cfg["test_eval_size"]
    return train_spec(profile, **fields)


def _tuned(profile: dict, results: Optional[dict], norm: str, wd: float):
    """Each arm's rates on the tuning seeds, then its validated rate on the others. Only rates at which the arm
    fits the subset (and does not diverge) on every tuning seed compete: the claim compares gaps at ≈100%
    training accuracy (if no rate fits, all compete; unfit seeds enter as intervals)."""
    threshold = profile["regularize"]["fit_threshold"]
    return tuned(profile, results, profile["regularize"]["lrs"], lambda lr, s: _spec(profile, norm, wd, lr, s),
                 admissible=lambda row: row["status"] == "done" and final_pct(row, "train_acc") >= threshold)


def part_arms(profile: dict) -> tuple[set, set]:
    """The arms each part reads: part 1 the unnormalized net against BN, part 2 BN against its smallest ghost
    batch. The other arms (GroupNorm, weight decay, the other ghost batches) enter no rule: they describe,
    and run the first look's seeds only (:func:`arm_looks`)."""
    return {"bn", "none"}, {"bn", f"ghost:{min(profile['regularize']['ghost_sizes'])}"}


def part_looks(profile: dict, results: Optional[dict]) -> list[tuple[int, float]]:
    """Per part, ``(seeds, confidence level)`` it is judged at: each part stops at the first look of the
    claim's design (its own ``looks``, else the profile's) that decides it, and only the arms of the parts
    still undecided run the next block of seeds (:func:`bnlab.study.sequential.part_look`). Part 1's arms
    cost more per seed (the unnormalized net takes the most steps to fit), and part 2's effect is the
    smaller one against its spread."""
    plan, now = of_profile(profile, SLUG), len(profile["seeds"])
    by_key = {key: (norm, wd) for key, norm, wd in arms(profile)}

    def judge(index: int, keys: set):
        def at(n: int, level: float) -> Optional[bool]:
            sub = narrowed(profile, n)
            if not all_finished(results, [s for k in keys for s in _tuned(sub, results, *by_key[k])[0]]):
                return None
            with at_confidence(level):
                return _decide_part(index, sub, results, {k: _arm(sub, results, *by_key[k]) for k in keys})[0] \
                    .outcome != UNDECIDED
        return at

    return [part_look(plan, now, judge(i, keys)) for i, keys in enumerate(part_arms(profile))]


def arm_looks(profile: dict, results: Optional[dict], looks: Optional[list] = None) -> dict[str, tuple[int, float]]:
    """arm key → ``(seeds, level)``: the look of the part that runs it furthest (``looks``: the parts' looks,
    :func:`part_looks`, computed when not given); an arm of no part, the first look's."""
    looks = looks or part_looks(profile, results)
    n, alpha = of_profile(profile, SLUG).reached(len(profile["seeds"]))[0]
    return {key: max([look for look, keys in zip(looks, part_arms(profile)) if key in keys] or [(n, 1.0 - alpha)])
            for key, _, _ in arms(profile)}


def measure(profile: dict, results: Optional[dict] = None) -> list[dict]:
    looks = arm_looks(profile, results)
    return [spec for key, norm, wd in arms(profile)
            for spec in _tuned(narrowed(profile, looks[key][0]), results, norm, wd)[0]]


# ------------------------------------------------------------------------------------------------ decide

@dataclass
class Arm:
    """One arm at its validated rate. Per-seed lists follow the profile's seeds (NaN: not run)."""

    lr: Optional[float]
    gap: dict                  # seed → train − test accuracy (points) of every finished seed (as observed)
    gap_high: dict             # seed → the upper end of its gap at fit: + the training accuracy it still lacks
    train: list[float]         # training accuracy % on the whole subset
    test: list[float]          # test accuracy %
    norm_change: list[float]   # change of the weight norm over training, %
    diverged: int              # seeds that diverged (they enter as intervals)
    unfit: int                 # seeds below the fit threshold at the cap (they enter as intervals)
    steps: list[float]         # per seed: steps trained (to the fit, or the cap)
    train_ci: Interval         # the intervals the report shows, over seeds
    test_ci: Interval
    gap_ci: Interval
    norm_change_ci: Interval
    error_ci: Interval         # test error % (100 − test accuracy)


@dataclass
class Findings:
    """Everything claim 3's report shows."""

    parts: list[Part]            # BN shrinks the gap, through batch noise
    ends: list[tuple[Effect, Effect]]  # per part: the effect at the lower and the upper end of the intervals
    arms: dict[str, Arm]         # arm key → the arm, in the order of :func:`arms`
    controls: dict[str, Effect]  # "groupnorm", "none+wd" → the gap they shrink, none − it (points, paired)
    smallest: str                # the smallest ghost batch's arm key
    ghost_curve: Band            # gap against the examples per statistic: ghost batches, then the full batch


def _arm(profile, results, norm, wd) -> Arm:
    """The arm at its validated lr: per-seed gap, training accuracy, test accuracy, weight-norm change,
    and which seeds are excluded (diverged, or did not fit the subset)."""
    cfg, seeds = profile["regularize"], profile["seeds"]
    lr = _tuned(profile, results, norm, wd)[1]
    chosen = [lookup(results, _spec(profile, norm, wd, lr, s)) if lr is not None else None for s in seeds]
    gap, high, trains, tests, norm_change, steps, diverged, unfit = {}, {}, [], [], [], [], 0, 0
    for s, row in zip(seeds, chosen):
        train, test = final_pct(row, "train_acc"), final_pct(row, "test_acc")
        trains.append(train), tests.append(test)
        result = (row or {}).get("result") or {}
        w = result.get("weight_norm") or {}
        norm_change.append(100 * (w["final"] / w["initial"] - 1) if w.get("final") and w.get("initial") else math.nan)
        steps.append(float(result.get("steps", math.nan)))
        if row is None:
            continue
        gap[s] = train - test     # a diverged run scores chance on both: gap 0, up to what it lacks
        high[s] = gap[s] + max(0.0, 100.0 - train) if (row["status"] == "diverged"
                                                        or train < cfg["fit_threshold"]) else gap[s]
        diverged += row["status"] == "diverged"
        unfit += row["status"] != "diverged" and train < cfg["fit_threshold"]
    return Arm(lr, gap, high, trains, tests, norm_change, diverged, unfit, steps, ci(trains, (0, 100)),
               ci(tests, (0, 100)), ci(gap.values(), DIFF_BOUNDS), ci(norm_change), ci([100 - t for t in tests], (0, 100)))


def _both_ends(rule: Rule, larger: Arm, smaller: Arm) -> tuple[Part, tuple[Effect, Effect]]:
    """The part "``larger``'s gap − ``smaller``'s gap": decided at both ends of the unfit runs' intervals (the
    effect is smallest with ``larger`` at its low ends and ``smaller`` at its high ends); undecided unless
    the two ends agree. The part shows the effect of the observed gaps."""
    low = paired_effect(larger.gap, smaller.gap_high, "points", DIFF_BOUNDS)
    high = paired_effect(larger.gap_high, smaller.gap, "points", DIFF_BOUNDS)
    outcomes = {rule.decide(low), rule.decide(high)}
    observed = paired_effect(larger.gap, smaller.gap, "points", DIFF_BOUNDS)
    return Part(rule, observed, outcomes.pop() if len(outcomes) == 1 else UNDECIDED), (low, high)


def _decide_part(index: int, profile: dict, results: dict, per_arm: dict) -> tuple[Part, tuple[Effect, Effect]]:
    """Part ``index`` (0: BN shrinks the gap, 1: through batch noise) from ``per_arm``, at the current level."""
    if index == 0:
        return _both_ends(RULES[0], per_arm["none"], per_arm["bn"])
    return _both_ends(RULES[1], per_arm["bn"], per_arm[f"ghost:{min(profile['regularize']['ghost_sizes'])}"])


def decide(profile: dict, results: dict) -> Findings:
    cfg = profile["regularize"]
    per_part = part_looks(profile, results)
    looks, per_arm = arm_looks(profile, results, per_part), {}
    for key, norm, wd in arms(profile):
        n, level = looks[key]
        with at_confidence(level):
            per_arm[key] = _arm(narrowed(profile, n), results, norm, wd)
    decided = []
    for index, (_, level) in enumerate(per_part):   # each part at its own look (paired: the seeds both arms ran)
        with at_confidence(level):
            decided.append(_decide_part(index, profile, results, per_arm))
    parts, ends = [part for part, _ in decided], [e for _, e in decided]
    with at_confidence(per_part[0][1]):              # the controls beside part 1, on the seeds they share
        controls = {k: paired_effect(per_arm["none"].gap, per_arm[k].gap, "points", DIFF_BOUNDS)
                    for k in ("groupnorm", "none+wd")}
    smallest = f"ghost:{min(cfg['ghost_sizes'])}"
    keys = [f"ghost:{g}" for g in sorted(cfg["ghost_sizes"])] + ["bn"]
    curve = Band.of(sorted(cfg["ghost_sizes"]) + [cfg["batch_size"]], [per_arm[k].gap_ci for k in keys])
    return Findings(parts, ends, per_arm, controls, smallest, curve)


# ------------------------------------------------------------------------------------------------ render

def render(profile: dict, findings: Findings) -> ClaimResult:
    cfg, per_arm, parts = profile["regularize"], findings.arms, findings.parts
    rows = [[arm_label(k), fmt(a.lr, 3), fmt_ci(a.train_ci, 1), fmt_ci(a.test_ci, 1), fmt_ci(a.gap_ci, 1),
             fmt_ci(a.norm_change_ci, 1), f"{a.diverged} / {a.unfit}", fmt_ci(ci(a.steps), 0), str(len(a.gap))]
            for k, a in per_arm.items()]
    table = {"title": f"Generalization gap where each run fits its {cfg['subset']} training examples (or at the "
                      f"{cfg['max_steps']}-step cap)",
             "columns": ["arm", "validated lr", "train acc %", "test acc %", "gap (points)", "weight-norm change %",
                         "as intervals: diverged / did not fit", "steps", "seeds"], "rows": rows}
    gn, wd = findings.controls["groupnorm"].interval, findings.controls["none+wd"].interval
    spans = [f"{p.rule.name}: from {lo.interval.text(1)} to {hi.interval.text(1)} with every unfit run at the low "
             f"or the high end of its interval" for p, (lo, hi) in zip(parts, findings.ends)
             if lo.interval.text(1) != hi.interval.text(1)]
    intervals = sum(a.diverged + a.unfit for a in per_arm.values())
    smallest = findings.smallest.split(":")[1]
    paragraphs = [
        f"Each arm trained on the same {cfg['subset']} examples at a constant rate until it fitted them (at least "
        f"{cfg['fit_threshold']:g}% training accuracy) or reached {cfg['max_steps']} steps. Its generalization gap is "
        f"training minus test accuracy at that point, so the arms are compared where each has just fitted.",
        f"The unnormalized net's gap was {_more_or_less(parts[0].effect.interval.mean, 'larger', 'smaller')} than "
        f"BN's ({parts[0].effect.interval.text(1)}). Against BN's full batch of {cfg['batch_size']}, ghost batches of "
        f"{smallest} made the gap {_more_or_less(-parts[1].effect.interval.mean, 'wider', 'narrower')} (full − ghost: "
        f"{parts[1].effect.interval.text(1)}).",
        (f"Every seed counts: {intervals} run(s) never fitted and entered as intervals; the parts are decided at "
         f"both ends of those ({'; '.join(spans)})." if spans else "Every seed counts, and every run fitted."),
        f"GroupNorm ({cfg['group_channels']} or more channels per group) normalizes without batch noise: it shrank "
        f"the unnormalized gap by {gn.text(1)} points.",
    ] + ([f"The two parts stopped separately, each at the look that decided it (or the last): "
          f"{parts[0].rule.name} on {parts[0].effect.n} seeds, {parts[1].rule.name} (the smaller effect "
          f"against its spread) on {parts[1].effect.n}; the arms of no part (GroupNorm, weight decay, the other "
          f"ghost batches) ran the first look's {len(per_arm['groupnorm'].train)}."]
         if len({parts[0].effect.n, parts[1].effect.n, len(per_arm['groupnorm'].train)}) > 1 else [])
    details = [{"title": "Controls and counts", "paragraphs": [
        f"Weight decay {cfg['weight_decay']:g} without normalization shrank the gap by {wd.text(1)} and changed the "
        f"weight norm by {fmt_ci(per_arm['none+wd'].norm_change_ci, 1)}% (against "
        f"{fmt_ci(per_arm['none'].norm_change_ci, 1)}% without it).",
        f"Runs that entered as intervals (diverged / did not reach {cfg['fit_threshold']:g}% training accuracy by the "
        f"cap): " + ", ".join(f"{arm_label(k)} {a.diverged}/{a.unfit}" for k, a in per_arm.items()) + ". Such a "
        f"run's gap lies between its observed gap and that gap plus the training accuracy it lacked.",
        f"The first version of this study trained every arm a fixed one-cycle budget and left out the seeds where "
        f"the unnormalized net did not fit; training to the fit counts every seed and compares the arms at matched "
        f"training accuracy."]}]
    explanation = " ".join(paragraphs + [f"{parts[0].text(1)}.", f"{parts[1].text(1)}."])
    return ClaimResult(
        answer=answer(findings), paragraphs=paragraphs, details=details,
        differences=differences(profile, findings),
        number=NUMBER, title=TITLE, literature=LITERATURE, rule=RULE, finding=FINDING, expected=EXPECTED,
        verdict=Verdict.from_parts(parts, f"gap none − BN: {parts[0].effect.interval.text(1)}", explanation),
        caveats=[tuning_caveat(profile),
                 f"{cfg['subset']} training examples of {dataset_label(profile, cfg.get('dataset'), train_size=False)} "
                 "where Hoffer et al. and Luo et al. use full CIFAR/ImageNet: a small subset is how every arm can fit "
                 "its training data within the budget, which the comparison at matched training accuracy needs.",
                 "No data augmentation or dropout: the gaps are those of the architectures alone.",
                 "Ghost batches split each batch into independent normalization groups (Hoffer et al.'s "
                 "implementation); the statistics of the smallest ghost batch are the noisiest."]
        + ([f"Trained at ResNet-{run_depth(profile)} (the section's depth), not at this setting's "
            f"ResNet-{profile['depth']}: the claim is about the batch BN averages over, and one set of runs "
            f"serves every depth of a dataset."] if run_depth(profile) != profile["depth"] else []),
        tables=[table, paper_table(PAPER, _ours(profile, per_arm))], figures=[_gap_figure(profile, findings)],
        numbers={"gap_reduction": parts[0].effect.interval.to_dict(), "noise_effect": parts[1].effect.interval.to_dict(),
                 "groupnorm_reduction": gn.to_dict(), "weight_decay_reduction": wd.to_dict(),
                 "parts": [p.to_dict() for p in parts],
                 "intervals": {k: {"diverged": a.diverged, "unfit": a.unfit} for k, a in per_arm.items()},
                 "ends": [{"low": lo.interval.to_dict(), "high": hi.interval.to_dict()} for lo, hi in findings.ends]})


def _more_or_less(value: float, more: str, less: str) -> str:
    """ "4.2 points larger" / "3.3 points smaller" / "unchanged" for a signed difference in points."""
    if not math.isfinite(value):
        return "not measured"
    if abs(value) < 0.05:
        return "about the same"
    return f"{abs(value):.1f} points {more if value > 0 else less}"


def differences(profile: dict, findings: Findings) -> list[str]:
    """What this run measured that sets its setting apart from Hoffer et al.'s and Luo et al.'s (shown where
    the verdict disagrees with theirs)."""
    cfg, per_arm = profile["regularize"], findings.arms
    bn, none, ghost = per_arm["bn"], per_arm["none"], per_arm[findings.smallest]
    n = len(none.train)
    out = [f"An overfitting regime: BN's own gap is {fmt_ci(bn.gap_ci, 1)} points at {fmt_ci(bn.test_ci, 1)}% test "
           f"accuracy on {cfg['subset']} training examples, where the papers compare test errors of networks trained "
           f"on full datasets, whose gaps are a few points."]
    if none.unfit or none.diverged:
        lo, hi = findings.ends[0]
        out.append(f"The unnormalized net did not fit the {cfg['subset']} examples by the {cfg['max_steps']}-step cap "
                   f"in {none.unfit + none.diverged} of {n} seeds, so BN's effect on the gap spans "
                   f"{lo.interval.mean:.1f} to {hi.interval.mean:.1f} points at the two ends of those seeds' intervals.")
    out.append(f"Ghost batches of {findings.smallest.split(':')[1]} took {fmt_ci(ci(ghost.steps), 0)} steps "
               f"to fit (validated lr {fmt(ghost.lr, 3)}) against BN's {fmt_ci(ci(bn.steps), 0)} (lr {fmt(bn.lr, 3)}): "
               f"each arm's gap is read when it fits, so the noisier arm is read after more training.")
    return out


def _ours(profile: dict, per_arm: dict) -> dict:
    """Our test error (100 − test accuracy of the final model, every seed, at the arm's validated rate) for
    :data:`PAPER`'s quantities, each with our setting in words."""
    cfg = profile["regularize"]
    setting = (f"{cfg['subset']} examples of {dataset_label(profile, cfg.get('dataset'), train_size=False)}, "
               f"width-{profile['width']:g} ResNet-{run_depth(profile)}, trained to fit (cap {cfg['max_steps']} steps) "
               f"at batch {cfg['batch_size']} (an overfitting regime: errors sit far above the paper's and the claim's "
               f"quantity is the gap)")
    return {key: (fmt_ci(arm.error_ci, 1) + (f" at lr {arm.lr:g}" if arm.lr is not None else ""),
                  setting + ("; GroupNorm at the full batch" if key == "groupnorm"
                             else f"; ghost batches of {key[6:]}"))
            for key, arm in per_arm.items() if key == "groupnorm" or key.startswith("ghost:")}


def _gap_figure(profile, findings: Findings) -> dict:
    per_arm, curve = findings.arms, findings.ghost_curve
    fig, axes = style.figure()
    ax = axes[0]
    style.band(ax, *curve, color=style.arm_color("bn"), label="BN, statistics over this many examples")
    for j, key in enumerate(("groupnorm", "none", "none+wd")):
        gap = per_arm[key].gap_ci
        if math.isfinite(gap.mean):
            ax.axhline(gap.mean, color=style.arm_color(key.split("+")[0]), linestyle=style.LINESTYLES[1 + j % 3],
                       label=arm_label(key))
            ax.axhspan(gap.low, gap.high, color=style.arm_color(key.split("+")[0]), alpha=0.08, linewidth=0)
    sizes = curve.x
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(sizes) / 1.5, max(sizes) * 1.5)  # also when no seed fitted (nothing drawn)
    ax.set(xlabel="examples per normalization statistic (ghost batch size)", ylabel="train − test accuracy (points)",
           title="Gap against batch noise")
    ax.grid(alpha=0.3)
    style.legend_outside(fig, axes)
    return {"name": "claim3_gap_vs_ghost", "title": "Generalization gap at ≈100% training accuracy",
            "figure": fig, "caption": "Mean over every seed (observed gaps), with its interval; horizontal lines and "
                                      "shading are the batch-independent arms."}


# ------------------------------------------------------------------------------------------------ answer

def answer(findings: Findings) -> str:
    """The claim's answer in one plain sentence (the report's first screen), from its parts."""
    from bnlab.study import answers  # only the answer reads the shared phrasing
    return answers.sentence(findings.parts, [
        answers.Phrase(holds="BN shrank the train − test accuracy gap by {x}",
                       refuted="BN did not clearly shrink the train − test accuracy gap ({s})",
                       reversed="BN widened the train − test accuracy gap by {x}",
                       question="BN shrinks the train − test accuracy gap"),
        answers.Phrase(holds="noisier batch statistics (smaller ghost batches) shrank it by {x} more",
                       refuted="noisier batch statistics (smaller ghost batches) did not clearly shrink it ({s})",
                       reversed="noisier batch statistics (smaller ghost batches) widened it by {x}",
                       question="batch noise is what shrinks it"),
    ])
