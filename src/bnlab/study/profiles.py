"""Study profiles: how big each claim's experiment is, as validated data.

A profile is a plain JSON-able dict (one per size below, or a JSON file passed as ``--profile
path.json``). Its shape is the pydantic model :data:`Profile`: the shared fields of :class:`Shared` and
one section per claim, whose schema (``Config``) and per-size defaults (``PRESETS``) live in the claim
module that reads it (``ics``, ``lr``, ``speed``, ``regularize``, ``residual``). Unknown keys are
rejected, and every problem of a file is reported at once with its JSON path. The claim modules read
their own section and never branch on the profile's name. Sizes:

* ``tiny``     — drives the whole pipeline in the tests (2 seeds: every verdict is "no verdict");
* ``quick``    — the default (340 runs): MNIST-1D, narrow 1-D ResNet-8s, 6 seeds;
* ``standard`` — every claim in four settings (two datasets × two depths), 14 seeds in three looks;
* ``full``     — one CUDA GPU (``requires_cuda``), unattended for days: the papers' settings on CIFAR-10 —
  ResNet-110 for Bjorck et al.'s learning-rate comparison, He et al.'s depths 20–110 with their plain
  twins, Wu & He's 32…2 images per batch as ghost batches, 10 seeds.

How long each takes is stated once, in its ``description`` ("TIME: WHAT"), which ``bnlab study --help``, the
README and the report quote.

Units: ``steps`` are optimizer steps; ``lr`` is the SGD learning rate (Nesterov momentum 0.9; a
one-cycle schedule for claim 4's sweep); ``width`` multiplies the base widths 16/32/64; ``eval_every`` is
in steps; ``val_size`` examples are held out of the training set (stratified, seed 0) for every choice,
and curves are evaluated on its first ``val_eval_size``.

Budgets in epochs scale with the training set, and a 2-D step costs more than a 1-D one, so ``quick`` and
``standard`` shrink an image dataset (``--dataset fashion-mnist``) to MNIST-1D's scale: a class-balanced
``image_train_size`` of 3,500 training images (MNIST-1D's 4,000 minus its validation split: the same steps
per epoch) average-pooled to ``image_size`` 14 × 14 (a step then costs ≈ 1.8× a MNIST-1D step, against
4.6× at 28 × 28); the validation split comes from the whole training set and the test set stays whole.
``full`` trains on all of CIFAR-10 at its size. Unset both in a profile file to train on a whole image set.
``tiny`` shrinks an image dataset to its own budget: 448 images (synthetic's 512 minus its validation split)
pooled to 8 × 8.

Bounds (:func:`limits`): a value that passes the types above but would fail every run, or the machine, is
refused up front with its JSON path: every number finite; learning rates and probe step sizes (fields named
``lr``, ``lrs``, ``ics_lr``, ``step_sizes``, ``probe_steps``) at most :data:`MAX_LR`; ``width`` at most
:data:`MAX_WIDTH`; depths (``depth``, ``signal_depths``, ``train_depths``) at most :data:`MAX_DEPTH`; at most
:data:`MAX_SEEDS` seeds, each in [0, 2³²); grids at most :data:`MAX_GRID` values; ``stack`` at most
:data:`MAX_STACK`. Sizes are checked against
each dataset the profile reads, from the registry's split sizes (nothing is loaded): ``val_size`` below its
training examples, and batch sizes (``batch_size``, ``batch_sizes``, ``signal_batch``) and a section's
``subset`` at most the training examples left after the validation split (and ``image_train_size``); a
section's batch sizes at most its ``subset``. What a run needs in memory depends on the machine and is
checked before anything is built (:func:`bnlab.study.plan.check_memory`).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError, create_model, \
    field_validator, model_validator

from bnlab.errors import UserError
from bnlab.study.claims import SECTIONS
from bnlab.study.common import resnet_depths

__all__ = ["PROFILES", "Profile", "Shared", "Setting", "get_profile", "validate", "with_overrides", "with_dataset",
           "datasets", "limits", "MAX_LR", "MAX_WIDTH", "MAX_DEPTH", "MAX_SEEDS", "MAX_GRID", "LR_FIELDS",
           "DEPTH_FIELDS", "BATCH_FIELDS", "MAX_STACK"]

SIZES = ("tiny", "quick", "standard", "full")

# Bounds every profile meets (see the module docstring): wide enough for any study of these networks, narrow
# enough that a value beyond them is a typo or a run no machine finishes.
MAX_LR = 1e4        # full sweeps to 3 and standard to 10; SGD far above this only diverges, and past float32's
                    # 3.4e38 the parameter update itself overflows
MAX_WIDTH = 64.0    # 1024/2048/4096 channels (Wide ResNets use 10)
MAX_DEPTH = 2000    # He et al.'s deepest CIFAR ResNet has 1202 layers
MAX_SEEDS = 1000    # planning alone takes minutes beyond
MAX_GRID = 100      # values in one grid (learning rates, depths, batch sizes, settings)
MAX_STACK = 64      # seeds trained as one stacked network (memory grows with it; 8 already amortizes the overhead)
_SEED_END = 2 ** 32  # NumPy and torch seed generators take [0, 2^32)
LR_FIELDS = ("lr", "lrs", "ics_lr", "step_sizes", "probe_steps")
DEPTH_FIELDS = ("depth", "signal_depths", "train_depths")
BATCH_FIELDS = ("batch_size", "batch_sizes", "signal_batch")


class Setting(BaseModel):
    """One setting every claim is judged in: the profile with this dataset and/or network depth."""

    model_config = ConfigDict(extra="forbid")
    dataset: Optional[str] = Field(None, description="the dataset (unset: the profile's)")
    depth: Optional[PositiveInt] = Field(None, description="the ResNet depth, 6n+2 (unset: the profile's)")

    @field_validator("depth")
    @classmethod
    def _resnet_depth(cls, depth):
        return None if depth is None else resnet_depths([depth])[0]


class Shared(BaseModel):
    """The fields every claim reads."""

    model_config = ConfigDict(extra="forbid")
    name: str = "custom"
    description: str = ""
    dataset: str
    seeds: list[int] = Field(min_length=1)
    tune_seeds: Optional[PositiveInt] = Field(
        None, description="claims 1, 3 and 5 try every learning rate of their grids on the first tune_seeds seeds "
                          "only and run the other seeds at the rate those chose on validation (unset: every seed "
                          "runs every rate)")
    width: PositiveFloat
    depth: PositiveInt
    device: str = "cpu"
    requires_cuda: bool = False
    val_size: PositiveInt
    val_eval_size: PositiveInt
    eval_every: PositiveInt
    image_size: Optional[PositiveInt] = Field(
        None, description="on an image dataset, images are average-pooled to at most this many pixels a side "
                          "(unset: native size; sequence datasets ignore it)")
    image_train_size: Optional[PositiveInt] = Field(
        None, description="on an image dataset, train on a class-balanced subset of at most this many of the "
                          "training examples left after the validation split (unset: all of them; sequence "
                          "datasets ignore it)")
    settings: list[Setting] = Field(
        default_factory=list, description="the settings (dataset × depth) each claim is judged in; the report "
                                          "gives a verdict per setting and a robust answer across them (empty: "
                                          "the profile's own dataset and depth only)")
    looks: Optional[list[PositiveInt]] = Field(
        None, description="sequential seeds: a claim first runs the first looks[0] seeds, and while a part of it "
                          "is undecided the next block, up to looks[-1] (unset: one look, every seed). The longest "
                          "design, this or a claim section's own looks, ends at len(seeds)")
    stack: PositiveInt = Field(
        8, description="runs that differ only in their seed and learning rate train together, as one stacked "
                       "network of at most this many (bnlab.models.stack: each seed's run as alone, up to float rounding; "
                       "on one CPU core 2.1–2.6× the throughput for 1-D ResNet-8s, 1.2–1.3× for 2-D ones at "
                       "14×14); 1: every run alone")
    look_alphas: Optional[list[float]] = Field(
        None, description="the two-sided error spent at each look (summing to at most 0.05, so a false decision "
                          "stays under 5% whatever the stopping: bnlab.study.sequential)")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds):
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds repeat (got {seeds})")
        return seeds

    @field_validator("depth")
    @classmethod
    def _resnet_depth(cls, depth):
        return resnet_depths([depth])[0]

    @model_validator(mode="after")
    def _looks(self):
        from bnlab.study.sequential import checked
        checked(self.looks, self.look_alphas)   # raises ValueError naming what is wrong
        own = {slug: getattr(self, slug) for slug in SECTIONS if getattr(getattr(self, slug, None), "looks", None)}
        # every seed is some design's: the profile's last look (or every seed without one) and each section's
        reach = {"looks": self.looks[-1] if self.looks else len(self.seeds)} | {
            f"{slug}.looks": section.looks[-1] for slug, section in own.items()}
        beyond = {name: n for name, n in reach.items() if n > len(self.seeds)}
        if beyond:
            raise ValueError(f"the last look of {', '.join(f'{k} ({v})' for k, v in beyond.items())} exceeds the "
                             f"number of seeds ({len(self.seeds)})")
        if max(reach.values()) != len(self.seeds):
            raise ValueError(f"the last look ({max(reach.values())}, the longest of "
                             f"{', '.join(reach)}) must be the number of seeds ({len(self.seeds)})")
        return self

    @model_validator(mode="after")
    def _settings(self):
        seen = [(s.dataset or self.dataset, s.depth or self.depth) for s in self.settings]
        if len(set(seen)) != len(seen):
            raise ValueError(f"settings repeat (dataset, depth): {seen}")
        return self

    @field_validator("device")
    @classmethod
    def _device(cls, device):
        if not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"must be cpu or cuda[:N] (got {device!r})")
        return device

    @model_validator(mode="after")
    def _claims_agree(self):
        for claim in SECTIONS.values():  # checks across sections, each declared by the claim that needs it
            for check in claim.PROFILE_CHECKS:
                check(self)
        return self

    @model_validator(mode="after")
    def _cuda_when_required(self):
        if self.requires_cuda and not self.device.startswith("cuda"):
            raise ValueError(f"profile {self.name!r} requires a CUDA GPU (requires_cuda: true), got device "
                             f"{self.device!r}: run it with --device cuda on a machine with one, or use the "
                             f"standard profile on CPU")
        return self


Profile = create_model("Profile", __base__=Shared, **{slug: (m.Config, ...) for slug, m in SECTIONS.items()})

FULL_DESCRIPTION = (
    "about 100 GPU-hours (4 days) on one CUDA GPU, unattended (resumable): the published settings on CIFAR-10 (45k train / 5k validation), 10 "
    "seeds, batch 128, Nesterov momentum 0.9. Claim 4: Bjorck et al. 2018's ResNet-110, rates 1e-5 … 3 (theirs: "
    "BN 0.1 ≈ 93%, none ≈ 1e-4 ≈ 81%), weight decay 1e-4. Claim 5: He et al. 2016's ResNet-20/32/44/56/110 "
    "and plain twins (their errors 8.75/7.51/7.17/6.97/6.43%) at rates 0.03/0.1/0.3, weight decay 1e-4. Claim 3: "
    "Wu & He 2018's 32/16/8/4/2 images per GPU as ghost batches of a batch of 128, beside GroupNorm. Claim 1: "
    "Santurkar et al. 2018's noisy BN, with the CIFAR ResNet-110 standing in for their VGG (bnlab.models has "
    "no VGG). Not replicated: the papers' ≈164-epoch step schedules and augmentation (20-epoch one-cycle "
    "sweeps, no augmentation). Budget: 1299 runs (the first round, then the other seeds of claims 1, 3 and 5 at "
    "their validated rates), then claim 2's 40 longer ones (claim 4's grid may add 40): ≈ 100 GPU-hours (4 days) at "
    "an assumed 0.2 s per network layer per epoch of 45k "
    "images (ResNet-110: 22 s per epoch; not measured here), 10 seeds throughout")

_SHARED = {
    "tiny": {"description": "about 30 seconds on 2 CPU cores: every code path on a synthetic dataset, 2 seeds (a "
                            "check of the pipeline, not a measurement: every verdict is no verdict)",
             "dataset": "synthetic", "seeds": [0, 1], "width": 0.25, "depth": 8, "val_size": 64,
             "val_eval_size": 64, "eval_every": 2, "image_size": 8, "image_train_size": 448},
    # sequential seeds as standard's: 6, then 10 for a claim with an undecided part. With one look of 6 seeds
    # (seeds 30-59) claim 4 missed its threshold by its low end (0.399 against 0.4) in one set and claim 5 at
    # depth 44 (1.50 [0.11, 2.89]) in another, where about 7-9 seeds would decide them
    # claim 3 has its own looks (10, 20, 40, 80; see claim_regularize.PRESETS), hence 80 seeds: the other
    # claims use the first 10
    "quick": {"description": "about 5 minutes on 2 idle CPU cores: MNIST-1D, 1-D ResNet-8 at width 0.5, 6 seeds "
                             "and 4 more where a part is undecided (claim 3: 10, then up to 80 for an undecided "
                             "part)",
              "dataset": "mnist1d", "seeds": list(range(80)), "tune_seeds": 2, "width": 0.5, "depth": 8,
              "val_size": 500, "val_eval_size": 500, "eval_every": 16, "image_size": 14, "image_train_size": 3500,
              "looks": [6, 10], "look_alphas": [0.02, 0.03]},
    # every claim in four settings at quick's budget per setting; sequential seeds in three looks, 6, 10, then 14
    # while a part is undecided (α 1.5/1.5/2%: a false decision in 1.98% of simulated null studies,
    # benchmarks/sequential_null.py). Two looks (6, 10) left claim 5 undecided on Fashion-MNIST at 0.77
    # [0.14, 1.40] decades (threshold 0.3) in a 20-minute run of seeds 0-9 (on 2,000 of its images), three looks
    # 0.94 [0.30, 1.57] at 14 seeds in 30.5 minutes: claim 5 now has looks of its own, up to 24, and claim 3
    # up to 80 (see their PRESETS)
    "standard": {"description": "about 40 minutes on 2 idle CPU cores: every claim on MNIST-1D and "
                                "Fashion-MNIST (14×14) at depths 8 and 14, 6 seeds, then 10 and 14 where a part is "
                                "undecided (claim 3: 10, then up to 80; claim 5: 6, then up to 24)",
                 "dataset": "mnist1d", "seeds": list(range(80)), "tune_seeds": 2, "width": 0.5, "depth": 8,
                 "val_size": 500, "val_eval_size": 500, "eval_every": 16, "image_size": 14,
                 "image_train_size": 3500, "looks": [6, 10, 14], "look_alphas": [0.015, 0.015, 0.02],
                 "settings": [{"dataset": "mnist1d", "depth": 8}, {"dataset": "mnist1d", "depth": 14},
                              {"dataset": "fashion-mnist", "depth": 8}, {"dataset": "fashion-mnist", "depth": 14}]},
    "full": {"description": FULL_DESCRIPTION, "dataset": "cifar10", "seeds": list(range(10)), "tune_seeds": 3,
             "width": 1.0,
             "depth": 110, "device": "cuda", "requires_cuda": True, "val_size": 5000, "val_eval_size": 2000,
             "eval_every": 100},
}

_NO_PRESET = [f"{m.__name__} has no {size!r} preset" for m in SECTIONS.values() for size in SIZES
              if size not in m.PRESETS]
if _NO_PRESET:
    raise TypeError(f"every claim's PRESETS has one section per profile size: {'; '.join(_NO_PRESET)}")

PROFILES: dict[str, dict] = {size: {"name": size, **_SHARED[size], **{slug: copy.deepcopy(m.PRESETS[size])
                                                                      for slug, m in SECTIONS.items()}}
                             for size in SIZES}


def _path(loc) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def validate(profile: dict, source: str = "profile") -> dict:
    """``profile`` checked against :data:`Profile` and its bounds (:func:`limits`) and returned as a plain dict
    with every default filled in; raises :class:`UserError` listing every problem with its JSON path
    (``lr.lrs.0``)."""
    problems: list[tuple[str, str]] = []
    model = None
    try:
        model = Profile.model_validate(profile)
    except ValidationError as error:
        problems = [(_path(e["loc"]), e["msg"] + (f" (got {e['input']!r})" if e["type"] not in
                                                  ("missing", "extra_forbidden", "value_error") else ""))
                    for e in error.errors()]
    if isinstance(profile, dict):
        named = {path for path, _ in problems}
        problems += [(path, message) for path, message in limits(profile) if path not in named]
    if problems:
        text = "; ".join(f"{path}: {message}" for path, message in problems)
        raise UserError(f"{source}: {len(problems)} problem(s): {text}. Start from one printed by "
                        f"`bnlab study --profile quick --show-profile`") from None
    return json.loads(model.model_dump_json())


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _numbers(value, path: str):
    """(path, number) for every number in ``value`` (a number, or lists and dicts of them)."""
    if _number(value):
        yield path, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")


def _grids(value, path: str):
    """(path, list) for ``value`` and every list inside it."""
    if isinstance(value, list):
        yield path, value
        for i, item in enumerate(value):
            yield from _grids(item, f"{path}.{i}")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _grids(item, f"{path}.{key}")


def _g(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _training_examples(profile: dict) -> list[tuple[str, int, int, bool]]:
    """(dataset, training examples, examples left for training, whether ``image_train_size`` bounds them) for
    each dataset the profile reads that bnlab knows, from the registry's sizes (nothing is loaded). Left:
    after the validation split, and on an image dataset at most ``image_train_size``."""
    import bnlab.data
    names = {profile.get("dataset")} | {s.get("dataset") for s in profile.get("settings") or []
                                        if isinstance(s, dict)}
    names |= {section.get(name) for slug, claim in SECTIONS.items() for name in claim.DATASET_FIELDS
              if isinstance(section := profile.get(slug), dict)}
    out = []
    for name in sorted(n for n in names if isinstance(n, str)):
        try:
            total = bnlab.data.split_sizes(name)[0]
        except UserError:  # an unknown dataset is reported where it is used (--dataset, settings)
            continue
        val = profile.get("val_size")
        left = total - int(val) if _number(val) and math.isfinite(val) and 0 < val < total else total
        train_size = profile.get("image_train_size")
        capped = bnlab.data.is_image(name) and _number(train_size) and 0 < train_size < left
        out.append((name, total, int(train_size) if capped else left, capped))
    return out


def limits(profile: dict) -> list[tuple[str, str]]:
    """(JSON path, what is wrong) for each value of ``profile`` beyond the bounds a study can run with (see the
    module docstring); empty when it is within them. Reads what it can of a profile that fails its schema."""
    problems: list[tuple[str, str]] = []
    for path, value in _numbers(profile, ""):
        if not math.isfinite(value):
            problems.append((path[1:], f"must be a finite number (got {value!r})"))
    sections = {slug: profile[slug] for slug in SECTIONS if isinstance(profile.get(slug), dict)}
    for path, grid in _grids({k: v for k, v in profile.items() if k != "seeds"}, ""):
        if len(grid) > MAX_GRID:
            problems.append((path[1:], f"at most {MAX_GRID} values (got {len(grid)})"))

    def bound(path: str, value, most, what: str) -> None:
        if _number(value) and math.isfinite(value) and value > most:
            problems.append((path, f"must be at most {_g(most)} (got {_g(value)}){what}"))

    def named(fields):  # (path, number) of the sections' fields called one of `fields`
        for slug, section in sections.items():
            for name in fields:
                yield from _numbers(section.get(name), f"{slug}.{name}")

    for path, value in named(LR_FIELDS):
        bound(path, value, MAX_LR, ": a larger learning rate only diverges")
    channels = "/".join(_g(base * MAX_WIDTH) for base in (16, 32, 64))
    bound("width", profile.get("width"), MAX_WIDTH, f": {_g(MAX_WIDTH)} already makes {channels} channels")
    depths = [("depth", profile.get("depth"))] + list(named(DEPTH_FIELDS))
    depths += [(f"settings.{i}.depth", s.get("depth")) for i, s in enumerate(profile.get("settings") or [])
               if isinstance(s, dict)]
    for path, value in depths:
        bound(path, value, MAX_DEPTH, ": He et al.'s deepest CIFAR ResNet has 1202 layers")
    bound("stack", profile.get("stack"), MAX_STACK, ": a stack's memory grows with its members, and 8 already "
                                                   "spreads a step's overhead thin")
    seeds = profile.get("seeds")
    if isinstance(seeds, list):
        if len(seeds) > MAX_SEEDS:
            problems.append(("seeds", f"at most {MAX_SEEDS} seeds (got {len(seeds)})"))
        problems += [(f"seeds.{i}", f"must be in [0, {_SEED_END}) (got {s})") for i, s in enumerate(seeds)
                     if _number(s) and math.isfinite(s) and not 0 <= s < _SEED_END][:3]
    for name, total, left, capped in _training_examples(profile):
        val = profile.get("val_size")
        if _number(val) and math.isfinite(val) and val >= total:
            problems.append(("val_size", f"must be less than {total}, the training examples of {name} "
                                         f"(got {_g(val)})"))
        sizes = list(named(BATCH_FIELDS)) + [(f"{slug}.subset", section.get("subset"))
                                              for slug, section in sections.items()]
        for path, value in sizes:
            bound(path, value, left, f", the training examples of {name} left after the validation split"
                                     f"{' and image_train_size' if capped else ''}")
    for slug, section in sections.items():
        subset = section.get("subset")
        if _number(subset) and math.isfinite(subset):
            for path, value in _numbers({name: section.get(name) for name in BATCH_FIELDS}, slug):
                bound(path, value, subset, f", {slug}.subset (the examples its runs train on)")
    first: dict[str, str] = {}
    for path, message in problems:   # one problem per path: the first (a smaller dataset's bound, say)
        first.setdefault(path, message)
    return list(first.items())


def get_profile(name_or_path: Union[str, Path]) -> dict:
    """Profile ``name`` (see :data:`PROFILES`), or the JSON file at that path, validated."""
    text = str(name_or_path)
    if text in PROFILES:
        return validate(copy.deepcopy(PROFILES[text]), f"profile {text}")
    path = Path(text)
    if path.suffix == ".json" and not path.is_file():
        raise UserError(f"--profile {path}: no such file" if not path.exists() else
                        f"--profile {path}: not a file")
    if path.suffix == ".json":
        try:
            profile = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise UserError(f"--profile {path}: not valid JSON ({error})") from None
        if not isinstance(profile, dict):
            raise UserError(f"--profile {path}: expected a JSON object with the profile's sections")
        profile.setdefault("name", path.stem)
        return validate(profile, f"--profile {path}")
    raise UserError(f"--profile must be one of {', '.join(PROFILES)} or a .json file (got {text!r})")


def with_overrides(profile: dict, dataset: Optional[str] = None, device: Optional[str] = None,
                   seeds: Optional[int] = None) -> dict:
    """The profile with ``--dataset``/``--device``/``--seeds`` applied (a new, validated dict). Fewer than
    3 seeds are allowed but every claim then gets "no verdict" (no interval from 1–2 seeds is trusted).
    ``--seeds`` makes the design one look of that many seeds (the profile's sequential looks are dropped)."""
    profile = with_dataset(profile, dataset) if dataset else copy.deepcopy(profile)
    if device:
        profile["device"] = device
    if seeds is not None:
        if seeds < 1:
            raise UserError(f"--seeds must be at least 1 (got {seeds})")
        profile["seeds"] = list(range(seeds))
        profile["looks"] = profile["look_alphas"] = None
        for slug in SECTIONS:          # a claim's own sequential design goes too: one look of N seeds for all
            if isinstance(profile.get(slug), dict) and "looks" in profile[slug]:
                profile[slug]["looks"] = profile[slug]["look_alphas"] = None
    given = [f"--{k} {v}" for k, v in (("dataset", dataset), ("device", device), ("seeds", seeds)) if v is not None]
    return validate(profile, f"profile {profile.get('name', '')} with {' '.join(given)}" if given else
                    f"profile {profile.get('name', '')}")


def with_dataset(profile: dict, dataset: str) -> dict:
    """A copy of ``profile`` on ``dataset``: its own and every claim section's dataset field
    (``DATASET_FIELDS``, e.g. claim 3's), as ``--dataset`` sets them."""
    profile = copy.deepcopy(profile)
    profile["dataset"] = dataset
    for slug, claim in SECTIONS.items():  # a claim whose section names a dataset of its own
        for name in claim.DATASET_FIELDS:
            profile[slug][name] = dataset
    return profile


def datasets(profile: dict) -> set[str]:
    """The datasets a profile's runs read: its own, and any a claim's section names (``DATASET_FIELDS``)."""
    own = {profile["dataset"]} | {s["dataset"] for s in profile.get("settings") or [] if s.get("dataset")}
    return own | {profile[slug].get(name) or profile["dataset"] for slug, claim in SECTIONS.items()
                  for name in claim.DATASET_FIELDS}
