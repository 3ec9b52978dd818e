"""Pieces the claim modules share: building specs from a profile, reading rows back, choosing on
validation, the intervals and curves their findings hold, formatting, and :class:`LaterRounds` (what a
claim may add once it sees results)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
from pydantic import BaseModel, Field, PositiveInt, model_validator

from bnlab.study.kinds import TRAIN
from bnlab.study.metrics import is_stable, mean_ci
from bnlab.study.specs import spec_key
from bnlab.study.verdict import Interval

__all__ = ["data_fields", "dataset_label", "base_fields", "resnet_depths", "train_spec", "lookup", "count_failed",
           "final_loss", "final_pct", "stable", "choose_lr", "tuning_seeds", "tuned", "tuning_caveat", "seed_list",
           "by_seed", "narrowed", "all_finished", "ci", "Band", "LaterRounds", "ARM_LABELS", "arm_label", "fmt",
           "fmt_ci", "ACC_BOUNDS", "DIFF_BOUNDS", "OwnLooks"]

class OwnLooks(BaseModel):
    """A claim section's own sequential seeds, in place of the profile's ``looks`` (the scope reads them:
    :func:`bnlab.study.sequential.of_profile`); the profile's seeds must reach the last of them."""

    looks: Optional[list[PositiveInt]] = Field(None, description="this claim's own sequential seeds, cumulative "
                                                                 "(unset: the profile's looks)")
    look_alphas: Optional[list[float]] = Field(None, description="the two-sided error spent at each of looks "
                                                                 "(summing to at most 0.05)")

    @model_validator(mode="after")
    def _own_looks(self):
        from bnlab.study.sequential import checked
        checked(self.looks, self.look_alphas)   # raises ValueError naming what is wrong
        return self


ACC_BOUNDS = (0.0, 100.0)       # an accuracy in percent
DIFF_BOUNDS = (-100.0, 100.0)   # a difference of two accuracies

ARM_LABELS = {"bn": "BN", "none": "no norm (He init)", "skipinit": "SkipInit", "fixup": "Fixup",
              "noisy_bn": "noisy BN", "groupnorm": "GroupNorm", "none+wd": "no norm + weight decay"}


def arm_label(norm: str, plain: bool = False) -> str:
    if norm.startswith("ghost:"):
        label = f"ghost BN ({norm.split(':')[1]})"
    elif norm.startswith("groupnorm:"):
        label = f"GroupNorm ({norm.split(':')[1]}+ channels per group)"
    else:
        label = ARM_LABELS.get(norm, norm)
    return f"{label}, plain" if plain else label


def data_fields(profile: dict, dataset: Optional[str] = None) -> dict:
    """The spec fields naming a run's data: ``dataset``, and on an image dataset the profile's
    ``image_size`` and ``image_train_size`` (as ``train_size``) when set (a sequence dataset's specs do not
    carry them, so their keys do not depend on these settings)."""
    import bnlab.data
    dataset = dataset or profile["dataset"]
    fields = {"dataset": dataset}
    if bnlab.data.is_image(dataset):
        for name, key in (("image_size", "image_size"), ("train_size", "image_train_size")):
            if profile.get(key) is not None:
                fields[name] = profile[key]
    return fields


def dataset_label(profile: dict, dataset: Optional[str] = None, train_size: bool = True) -> str:
    """The dataset as the report names it: ``fashion-mnist (14×14, 3500 training images)`` when the profile
    shrinks an image dataset (see :func:`data_fields`; ``train_size=False`` leaves the count out, for a claim
    that trains on its own smaller subset), else its bare name."""
    import bnlab.data
    fields = data_fields(profile, dataset)
    shape = bnlab.data.example_shape(fields["dataset"])
    notes = []
    if fields.get("image_size") is not None and max(shape[1:]) > fields["image_size"]:
        notes.append("×".join(str(min(side, fields["image_size"])) for side in shape[1:]))
    available = bnlab.data.split_sizes(fields["dataset"])[0] - int(profile.get("val_size") or 0)
    if train_size and fields.get("train_size") is not None and fields["train_size"] < available:
        notes.append(f"{fields['train_size']} training images")
    return f"{fields['dataset']} ({', '.join(notes)})" if notes else fields["dataset"]


def base_fields(profile: dict, dataset: Optional[str] = None) -> dict:
    """Settings every training run of a profile shares (its data and validation split included)."""
    return {**data_fields(profile, dataset), "device": profile.get("device", "cpu"),
            "width": profile["width"], "depth": profile["depth"], "eval_every": profile["eval_every"],
            "val_size": profile["val_size"], "val_eval_size": profile["val_eval_size"]}


def resnet_depths(depths: list[int]) -> list[int]:
    """``depths`` if each is a CIFAR-style ResNet depth 6n+2 (n >= 1); a ValueError naming the others if not."""
    bad = [d for d in depths if d < 8 or (d - 2) % 6]
    if bad:
        raise ValueError(f"depths must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {bad}")
    return depths


def train_spec(profile: dict, **fields) -> dict:
    """A training run's spec: the profile's shared settings, then ``fields`` (norm, lr, seed, …)."""
    spec = base_fields(profile, fields.pop("dataset", None))
    spec.update(fields)
    return TRAIN.spec(**spec)


def lookup(results: dict, spec: dict) -> Optional[dict]:
    """The stored row for ``spec`` (``None`` if it was not run or failed)."""
    row = (results or {}).get(spec_key(spec))
    return row if row is not None and row["status"] in ("done", "diverged") else None


def narrowed(profile: dict, seeds: int) -> dict:
    """``profile`` on its first ``seeds`` seeds (a look's profile)."""
    return {**profile, "seeds": list(profile["seeds"][:seeds])}


def all_finished(results: Optional[dict], specs: Iterable[dict]) -> bool:
    """Whether every run of ``specs`` is stored as finished (done, diverged or failed)."""
    return all(((results or {}).get(spec_key(s)) or {}).get("status") in ("done", "diverged", "failed")
               for s in specs)


def count_failed(results: dict, specs: Iterable[dict]) -> int:
    """How many of ``specs`` are stored as failed."""
    rows = [(results or {}).get(spec_key(s)) for s in specs]
    return sum(1 for r in rows if r is not None and r["status"] == "failed")


def final_loss(result: dict) -> float:
    """Mean training loss over the last tenth of the steps (single batches are noisy)."""
    losses = [v for v in result.get("losses", []) if v is not None]
    if not losses:
        return math.nan
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail))


def final_pct(row: Optional[dict], name: str = "val_acc") -> float:
    """The final model's ``name`` (``val_acc``, ``test_acc``, ``train_acc``) in percent; a diverged run
    counts as chance level; no row (not run, failed) is NaN."""
    if row is None:
        return math.nan
    result = row["result"] or {}
    value = (result.get("final") or {}).get(name)
    if row["status"] == "diverged" or value is None:
        return 100.0 * result.get("chance", 0.1)
    return 100.0 * value


def stable(row: Optional[dict]) -> bool:
    """:func:`bnlab.study.metrics.is_stable` for a stored row."""
    if row is None:
        return False
    result = row["result"] or {}
    return is_stable(row["status"], result.get("initial_loss"), final_loss(result),
                     (result.get("final") or {}).get("val_acc"), result.get("chance", 0.1))


def choose_lr(per_lr: dict) -> Optional[float]:
    """The learning rate whose per-seed validation values have the highest mean (``None`` if no rate has
    any). Every choice in the study goes through here, on validation numbers only."""
    means = {lr: float(np.nanmean(v)) for lr, v in per_lr.items() if any(math.isfinite(x) for x in v)}
    return max(means, key=lambda lr: (means[lr], -lr)) if means else None


def tuning_seeds(profile: dict) -> list:
    """The seeds every learning rate of a claim's grid is tried on: the first ``tune_seeds`` of the profile's
    seeds (all of them when unset)."""
    k = profile.get("tune_seeds")
    return list(profile["seeds"][:k]) if k else list(profile["seeds"])


def tuned(profile: dict, results: Optional[dict], lrs: Sequence[float], spec_of, score=None,
          admissible=None) -> tuple[list[dict], Optional[float]]:
    """A learning rate chosen on validation from the tuning seeds, then used for the others.

    ``spec_of(lr, seed)`` builds a run. Returns (the specs to run, the chosen rate): every rate of ``lrs`` on
    :func:`tuning_seeds`; once all of those have finished, :func:`choose_lr` picks the rate from
    ``score(row)`` (default: the final validation accuracy) and the other seeds run at it only. While a
    tuning run is missing the rate is ``None`` and only the tuning runs are asked for (the runner's next
    round adds the rest). ``admissible(row)``: when given, only rates at which every tuning seed's run is
    admissible compete (if none is, all do)."""
    score = score or (lambda row: final_pct(row, "val_acc"))
    tune = tuning_seeds(profile)
    specs = [spec_of(lr, s) for lr in lrs for s in tune]
    rows = {lr: [lookup(results, spec_of(lr, s)) for s in tune] for lr in lrs}
    if any(r is None for rs in rows.values() for r in rs):
        return specs, None
    candidates = {lr: rs for lr, rs in rows.items() if admissible is None or all(admissible(r) for r in rs)}
    lr = choose_lr({lr: [score(r) for r in rs] for lr, rs in (candidates or rows).items()})
    if lr is not None:
        specs += [spec_of(lr, s) for s in profile["seeds"] if s not in tune]
    return specs, lr


def tuning_caveat(profile: dict) -> str:
    """The caveat of a claim whose rates are chosen on the tuning seeds (see :func:`tuned`)."""
    tune, seeds = tuning_seeds(profile), profile["seeds"]
    if len(tune) == len(seeds):
        return "Every seed ran every learning rate of the grid; the rate was chosen on mean validation accuracy."
    return (f"Learning rates were chosen on the mean validation accuracy of seeds {seed_list(tune)}, which ran "
            f"every rate of the grid; the other {len(seeds) - len(tune)} seeds ran only the chosen rate (so each "
            "extra seed costs one run per arm). Every seed's reported numbers come from the chosen rate, and no "
            "choice sees the test set.")


def seed_list(seeds) -> str:
    """``[0, 1]`` → ``"0, 1"`` (for table titles)."""
    return ", ".join(str(s) for s in seeds)


def by_seed(seeds: Sequence, values: Sequence[float]) -> dict:
    return dict(zip(seeds, values))


def ci(values: Iterable[float], bounds: Optional[tuple[float, float]] = None, unit: str = "") -> Interval:
    """The mean of the finite ``values`` with its 95% interval (:func:`bnlab.study.metrics.mean_ci`), as
    an :class:`~bnlab.study.verdict.Interval`."""
    return Interval.of(mean_ci(list(values), bounds), unit)


@dataclass
class Band:
    """A curve with its 95% band, as a figure draws it: ``x`` and, at each x, the mean and the interval's
    ends. Unpacks as ``(x, mean, low, high)``, the arguments of :func:`bnlab.study.style.band`."""

    x: list
    mean: list
    low: list
    high: list

    @classmethod
    def of(cls, x: Sequence, intervals: Iterable[Sequence[float]]) -> "Band":
        """From ``x`` and one (mean, low, high) per x."""
        intervals = [(i.mean, i.low, i.high) if isinstance(i, Interval) else tuple(i) for i in intervals]
        return cls(list(x), [m for m, _, _ in intervals], [lo for _, lo, _ in intervals],
                   [hi for _, _, hi in intervals])

    def __iter__(self):
        return iter((self.x, self.mean, self.low, self.high))


@dataclass(frozen=True)
class LaterRounds:
    """What a claim may add after the runner's first round, once it sees results (its ``LATER_ROUNDS``).

    ``runs(profile)`` maps what adds runs to the most it may add. What two claims both name (claim 4's grid
    extensions at one batch size, which claim 2 trains too) are the same runs: the dry-run plan counts them
    once, with the first of the claims. ``what`` says what they are in the plan's note, ``none`` ends the
    note of a claim that adds none here."""

    what: str
    runs: Callable[[dict], dict[str, int]]
    none: str = "."


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(triple, digits: int = 2, unit: str = "") -> str:
    if isinstance(triple, Interval):
        triple = (triple.mean, triple.low, triple.high)
    mean, low, high = triple
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}{unit} [{low:.{digits}f}, {high:.{digits}f}]"


def json_safe(value):
    """``value`` with every non-finite float replaced by ``None`` (verdicts.json never holds NaN)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def paper_table(paper: list[dict], ours: dict) -> dict:
    """The "ours | paper | setting" table of a claim: one row per entry of its ``PAPER`` (the published
    figure, its source and setting), with our number for the same quantity from ``ours[entry["ours_key"]]``
    — a pair (our value as text, our setting in words) — and where the settings differ."""
    rows = []
    for entry in paper:
        value, setting = ours.get(entry["ours_key"], ("not measured by this profile", ""))
        rows.append([entry["quantity"], value, f"{entry['value']} ({entry['paper']})",
                     f"paper: {entry['setting']}; ours: {setting}" if setting else f"paper: {entry['setting']}"])
    return {"title": "Ours beside the published figures (the setting column says where the quantities or "
                     "settings differ)", "columns": ["quantity", "ours", "paper", "setting"], "rows": rows}


__all__ += ["json_safe", "mean_ci", "paper_table"]
