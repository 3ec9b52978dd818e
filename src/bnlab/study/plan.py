"""The plan of a study before anything is trained (``bnlab study --dry-run``).

What it says:

* **runs** — per claim, per kind (:mod:`bnlab.study.kinds`): each distinct run is counted once, with the
  first claim (in number order) that declares it, and the other claims show how many of their runs they
  share with it. Counted: the runner's first round, and the runs a claim tuned on seeds
  (``TUNED_ON_SEEDS``) adds once its tuning seeds have chosen each rate (the other seeds at one rate per
  arm: their number does not depend on the results). A claim that may add runs in later rounds declares
  what they are and their upper bound, which follows from the profile (``LATER_ROUNDS``, see
  :class:`bnlab.study.common.LaterRounds`): claim 4 extends its learning-rate grid while an arm is stable
  at the top, at most ``lr.max_extensions`` times; claim 2 trains each arm at the rate claim 4's sweep
  validated, falling back a rate while a seed diverges (:func:`later_rounds`).
* **time** — from a short calibration: for each class of spec (kind, depth, width, dataset, batch size,
  device) one representative (the costliest by :func:`bnlab.study.runner.estimated_cost`) trains a few
  steps on one thread, as every run does (:func:`calibrate`). A run's estimate is its training steps ×
  the class's step time, plus every example it evaluates × the class's forward time per example, plus
  its measurement steps (ICS runs'; each kind counts its own, :func:`estimate_seconds`). It is arithmetic
  on the calibration, so it is linear in the steps; it leaves out data loading and process start-up
  (seconds per run).
* **wall time** — the runs spread over ``jobs`` slots longest-first, as the runner orders them.
* **peak memory per run** — the peak resident-set increase of the calibration (``VmHWM``, reset before
  each class), dataset included; on CUDA ``torch.cuda.max_memory_allocated``.

A CUDA profile on a machine without a GPU is calibrated on the CPU, and the figures say so: no CPU→GPU
factor is applied (none is known for these networks), so GPU time is not estimated there.

A dataset read from files that is not on disk (CIFAR-10 before its download) is not downloaded: its classes
are calibrated on random tensors of its shape (:func:`bnlab.data.example_shape`, pooled to ``image_size``;
a step costs the same on any values), their peak memory counts the dataset as float32 arithmetic
(:func:`bnlab.data.split_sizes`) instead of loading it, and the plan says so.

**memory before building** — :func:`estimate_mb` estimates a run's memory from its network and batch
(:func:`bnlab.models.create`'s 16/32/64 × width channels, halving the resolution per stage) without building
anything. A class estimated beyond half the memory free here (:data:`CALIBRATE_WITHIN`) is not calibrated
(the plan names it and leaves its runs out of the hours), and :func:`check_memory` refuses a study whose runs do not fit the device at all.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

import torch

from bnlab.errors import UserError
from bnlab.study.claims import CLAIMS
from bnlab.study.common import narrowed
from bnlab.study.kinds import KINDS, kind_of
from bnlab.study.scope import design as scope_design, settings
from bnlab.study.sequential import every_look
from bnlab.study.specs import spec_key

__all__ = ["ClaimCount", "Calibration", "count_runs", "later_rounds", "spec_class", "calibrate", "steps_of",
           "estimate_seconds", "wall_seconds", "Plan", "make_plan", "format_plan", "estimate_mb", "check_memory",
           "data_sizes", "stand_in_data"]

CLASS_FIELDS = ("kind", "depth", "width", "dataset", "batch_size", "device")


# ------------------------------------------------------------------------------------------------ counts

@dataclass
class ClaimCount:
    """One claim's first-round runs: ``own`` (key → spec) are counted with it; ``shared`` maps an earlier
    claim to how many of this claim's runs it already counts."""

    number: int
    title: str
    own: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)

    def kinds(self) -> dict[str, int]:
        counts = {k: 0 for k in KINDS}
        for spec in self.own.values():
            counts[spec["kind"]] += 1
        return {k: v for k, v in counts.items() if v}


_FINISHED = {"status": "done", "result": {"final": {"val_acc": 0.5, "test_acc": 0.5, "train_acc": 1.0},
                                          "losses": [2.0, 2.0], "initial_loss": 2.0, "chance": 0.1}}


def _at_look(profile: dict, number: int, all_looks: bool) -> dict:
    """The profile claim ``number`` measures in the count: on its design's first look's seeds, or (``all_looks``)
    on every seed of its design's last look."""
    plan = scope_design(profile, CLAIMS[number])
    return narrowed(profile, plan.looks[-1] if all_looks else plan.looks[0])


def _count_into(out: dict[int, ClaimCount], owner: dict[str, int], profile: dict, claims: Sequence[int],
                all_looks: bool = False) -> None:
    narrowed = {number: _at_look(profile, number, all_looks) for number in sorted(claims)}
    with every_look() if all_looks else contextlib.nullcontext():  # every arm of every part, at every look
        first = {number: CLAIMS[number].measure(narrowed[number], None) for number in sorted(claims)}
        finished = {spec_key(spec): _FINISHED for specs in first.values() for spec in specs}
        for number in sorted(claims):
            count = out.setdefault(number, ClaimCount(number, CLAIMS[number].TITLE))
            specs = (CLAIMS[number].measure(narrowed[number], finished) if CLAIMS[number].TUNED_ON_SEEDS
                     else first[number])
            for spec in specs:
                key = spec_key(spec)
                if key not in owner:
                    owner[key] = number
                    count.own[key] = spec
                elif owner[key] != number and key not in count.own:
                    count.shared.setdefault(owner[key], set()).add(key)


def count_runs(profile: dict, claims: Sequence[int], all_looks: bool = False) -> dict[int, ClaimCount]:
    """claim → :class:`ClaimCount` for the first round plus the second round of the claims tuned on seeds
    (found by answering every first-round run with a finished placeholder: which rate wins does not
    change how many runs follow), in every setting of the profile (:mod:`bnlab.study.scope`), on the seeds
    of each claim's first look (``all_looks``: on every seed of its design, as if every look ran for every
    part). Without those claims, settings or looks the ``own`` runs are exactly
    :func:`bnlab.study.claims.collect_specs` (the claims are taken in number order, as there)."""
    owner: dict[str, int] = {}
    out: dict[int, ClaimCount] = {}
    for setting in settings(profile):
        _count_into(out, owner, setting.profile, claims, all_looks)
    for count in out.values():
        count.shared = {n: len(keys) for n, keys in count.shared.items()}
    return out


def later_looks(profile: dict, claims: Sequence[int]) -> dict[int, int]:
    """claim → the most runs its later looks may add (seeds beyond the first look while a part is
    undecided), counted like :func:`count_runs`; empty when no claim has more than one look."""
    if all(len(scope_design(profile, CLAIMS[n]).looks) == 1 for n in claims):
        return {}
    first, every = count_runs(profile, claims), count_runs(profile, claims, all_looks=True)
    return {n: len(every[n].own) - len(first[n].own) for n in every}


def later_rounds(profile: dict, claims: Sequence[int]) -> dict[int, int]:
    """claim → the most runs it may add after the first round (for the claims that declare
    ``LATER_ROUNDS``), in every setting, counted like :func:`count_runs`: what two claims may both add
    (claim 4's grid extensions at the first batch size, which claim 2 trains too) is counted once, with the
    first."""
    out = {}
    for setting in settings(profile):
        owner: dict[str, int] = {}
        for number in sorted(claims):
            later = CLAIMS[number].LATER_ROUNDS
            if later is None:
                continue
            out.setdefault(number, 0)
            for what, most in later.runs(_at_look(setting.profile, number, all_looks=False)).items():
                if owner.setdefault(what, number) == number:
                    out[number] += most
    return out


# ------------------------------------------------------------------------------------------- calibration

@dataclass
class Calibration:
    """Seconds per training step and per evaluated example, and the run's peak memory (MB)."""

    step_seconds: float
    forward_seconds: float
    peak_mb: float
    device: str


def spec_class(spec: dict) -> tuple:
    """The fields that set a run's cost per step: runs in one class share a calibration."""
    return tuple(spec.get(name) for name in CLASS_FIELDS)


def _rss_mb(field_name: str) -> Optional[float]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux ≥ 4.0); False where it cannot be reset."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def calibrate(spec: dict, steps: int = 5, warmup: int = 2, budget: float = 3.0,
              baseline_mb: Optional[float] = None, stand_in: bool = False) -> Calibration:
    """Time ``steps`` SGD steps of ``spec``'s network on its data and batch size after ``warmup`` untimed
    ones (fewer of each once ``budget`` seconds are spent, at least one), and one forward pass in eval mode; on one
    thread, as every run (:func:`bnlab.study.kinds.execute`). Loads the data like the run does, or with
    ``stand_in`` uses random tensors of its shape (:func:`stand_in_data`; nothing is read or downloaded).

    ``peak_mb``: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the peak resident set (``VmHWM``,
    reset first) minus ``baseline_mb`` (default: the resident set before loading the data). Memory freed
    by earlier work stays resident, so calibrate classes from the smallest up with one baseline. With
    ``stand_in`` the dataset's own float32 size (:func:`data_sizes`) is added to it."""
    from bnlab.study import runs
    device = str(spec.get("device", "cpu"))
    cuda = device.startswith("cuda")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs._load.cache_clear()  # the dataset counts in the run's memory
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        resettable = _reset_peak_rss()
        if baseline_mb is not None:
            before = baseline_mb
        else:
            before = _rss_mb("VmRSS") if resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        torch.manual_seed(0)
        data = stand_in_data(spec) if stand_in else runs.load_data(spec)
        model = runs.build_model(spec, data)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        batch = int(spec.get("batch_size", 64))
        n = len(data.train_x)
        index = torch.randint(0, n, (batch,), generator=torch.Generator().manual_seed(0)).to(data.train_x.device)
        x, y = data.train_x[index], data.train_y[index]

        def step():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if cuda:
                torch.cuda.synchronize(device)

        started = time.perf_counter()
        for _ in range(warmup):  # at least one (first-call costs), fewer when one step is slow
            step()
            if time.perf_counter() - started > budget / 2:
                break
        timed, begin = 0, time.perf_counter()
        while timed < steps and (timed == 0 or time.perf_counter() - started < budget):
            step()
            timed += 1
        step_seconds = (time.perf_counter() - begin) / timed
        model.eval()
        with torch.no_grad():
            begin = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize(device)
            forward_seconds = (time.perf_counter() - begin) / batch
        if cuda:
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
        elif resettable:
            peak = _rss_mb("VmHWM") - before
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
        if stand_in:
            peak += _data_mb(spec)
        return Calibration(step_seconds, forward_seconds, max(0.0, peak), device)
    finally:
        torch.set_num_threads(threads)


def data_sizes(spec: dict) -> dict:
    """The ``train``, ``val`` and ``test`` examples of ``spec``'s data as :func:`bnlab.study.runs.load_data`
    makes them, from the registry's split sizes (nothing is loaded): the training set minus ``val_size``, then
    at most ``train_size``, then ``subset``; the test set whole."""
    import bnlab.data
    train, test = bnlab.data.split_sizes(spec["dataset"])
    val = int(spec.get("val_size") or 0)
    train -= val
    for size in (spec.get("train_size"), spec.get("subset")):
        if size is not None:
            train = min(train, int(size))
    return {"train": train, "val": val, "test": test}


def _example_shape(spec: dict) -> tuple[int, ...]:
    """One example's shape in ``spec``'s runs: the dataset's, pooled to at most ``image_size`` a side."""
    import bnlab.data
    shape = bnlab.data.example_shape(spec["dataset"])
    if len(shape) == 3 and spec.get("image_size") is not None:
        shape = (shape[0],) + tuple(min(side, int(spec["image_size"])) for side in shape[1:])
    return shape


def _data_mb(spec: dict) -> float:
    """The float32 size of ``spec``'s examples (every split), MB."""
    return sum(data_sizes(spec).values()) * math.prod(_example_shape(spec)) * 4 / 2 ** 20


def stand_in_data(spec: dict, examples: Optional[int] = None):
    """A :class:`bnlab.data.Dataset` of random tensors with ``spec``'s example shape and classes (no file is
    read): what a calibration needs to time a step of the network the run builds, where the dataset is not
    on disk. ``examples`` per split (default: one batch)."""
    import bnlab.data
    name = bnlab.data.canonical_name(spec["dataset"])
    classes = bnlab.data.num_classes(name)
    n = int(examples or spec.get("batch_size", 64))
    shape = _example_shape(spec)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes

    def split():
        return torch.randn(n, *shape, generator=g), labels.clone()
    (train_x, train_y), (test_x, test_y), (val_x, val_y) = split(), split(), split()
    data = bnlab.data.Dataset(name, train_x, train_y, test_x, test_y, classes, shape[0],
                              f"random tensors of {name}'s shape (not on disk)", False)
    data = data.to(spec.get("device", "cpu"))
    data.val_x, data.val_y = val_x.to(data.train_x.device), val_y.to(data.train_x.device)
    return data


CALIBRATE_WITHIN = 0.5    # of the free memory: a class estimated beyond it is not calibrated (the estimate is
                          # within a factor of two of the peak, so building it could take the machine down)
TENSORS_PER_LAYER = 3.5   # what autograd keeps per conv (its input, the norm's input and output, the ReLU's):
                          # measured on the CPU for ResNet-8 to 110 at batch 32 to 128, 3.2 to 3.6


def estimate_mb(spec: dict) -> float:
    """``spec``'s run memory (MB) estimated without building it: the activations autograd keeps for the
    backward pass (:data:`TENSORS_PER_LAYER` float32 tensors per convolution of the CIFAR-style ResNet of
    ``depth``: 16/32/64 × ``width`` channels, each stage halving the resolution), the parameters with their
    gradients and momentum, and the data (:func:`data_sizes`). A guide for what cannot fit (within ≈ 30% of
    the calibration's peak), not the peak itself."""
    shape = _example_shape(spec)
    pixels = math.prod(shape[1:])
    blocks = max(1, (int(spec.get("depth", 8)) - 2) // 6)
    width = float(spec.get("width", 1.0))
    base = 16 * width
    stage = (1.0, 0.5, 0.25) if len(shape) == 3 else (1.0, 1.0, 1.0)   # 2-D: 2× channels on ¼ the pixels
    layers = (2 * blocks + 1) * stage[0] + 2 * blocks * (stage[1] + stage[2])
    activations = TENSORS_PER_LAYER * int(spec.get("batch_size", 64)) * base * pixels * layers
    kernel = 9 if len(shape) == 3 else 3
    parameters = 2 * blocks * kernel * base ** 2 * (1 + 4 + 16) + kernel * shape[0] * base
    return (activations + 4 * parameters) * 4 / 2 ** 20 + _data_mb(spec)


def _device_memory_mb(device: str, free: bool) -> Optional[float]:
    """The memory of ``device`` (MB): free now (``free``) or in all; ``None`` where it cannot be read."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        if free:
            return torch.cuda.mem_get_info(torch.device(device))[0] / 2 ** 20
        return torch.cuda.get_device_properties(torch.device(device)).total_memory / 2 ** 20
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable" if free else "MemTotal"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        return None


def _gb(mb: float) -> str:
    return f"{mb / 1024:.3g} GB" if mb >= 1024 else f"{mb:.3g} MB"


def _describe(spec: dict) -> str:
    return (f"one {spec['kind']} run of depth {spec.get('depth')}, width {spec.get('width')}, batch "
            f"{spec.get('batch_size')} on {spec['dataset']}")


def _fields_holding(profile: dict, number: int, spec: dict) -> list[str]:
    """The JSON paths of ``profile`` whose values set ``spec``'s depth, width and batch size (claim
    ``number``'s section first): what to lower."""
    from bnlab.study.profiles import BATCH_FIELDS, DEPTH_FIELDS
    paths = [name for name in ("depth", "width") if profile.get(name) == spec.get(name)]
    slugs = [CLAIMS[number].SLUG] + [c.SLUG for c in CLAIMS.values() if c.SLUG != CLAIMS[number].SLUG]
    sized = [(BATCH_FIELDS, spec.get("batch_size"))]
    if "depth" not in paths:   # a depth of the claim's own (claim 5's grids), not the profile's
        sized.insert(0, (DEPTH_FIELDS, spec.get("depth")))
    for field_names, value in sized:
        for slug in slugs:
            section = profile.get(slug) or {}
            found = [f"{slug}.{name}" for name in field_names
                     if value == section.get(name) or value in (section.get(name) or [] if
                                                                isinstance(section.get(name), list) else [])]
            if found:
                paths += found
                break
    return paths


def check_memory(profile: dict, claims: Sequence[int]) -> None:
    """Raise :class:`UserError` if a run of the study cannot fit the memory of the device it runs on here
    (:func:`estimate_mb` against the CPU's RAM or the GPU's memory), before anything is built; the message
    names the run and the profile's fields that set its size."""
    device = str(profile.get("device", "cpu"))
    total = _device_memory_mb(device, free=False)
    if total is None:
        return
    worst = None
    for number, count in count_runs(profile, claims).items():
        for spec in count.own.values():
            mb = estimate_mb(spec)
            if worst is None or mb > worst[0]:
                worst = (mb, number, spec)
    if worst is not None and worst[0] > total:
        mb, number, spec = worst
        fields = ", ".join(_fields_holding(profile, number, spec)) or "depth, width or the batch size"
        raise UserError(f"profile {profile.get('name', '')!r}: {_describe(spec)} (claim {number}) needs ≈ {_gb(mb)} "
                        f"(estimated before building it), more than the {_gb(total)} of "
                        f"{'this GPU' if device.startswith('cuda') else 'memory on this machine'}; lower {fields}")


def steps_of(spec: dict, train_size: int) -> int:
    """The optimizer steps the run takes: epochs × steps per epoch (full batches), capped by
    ``max_steps``; an ICS run's ``steps``; a signal run's single forward/backward (its kind's ``steps``)."""
    return kind_of(spec).steps(spec, train_size)


def estimate_seconds(spec: dict, calibration: Calibration, sizes: dict) -> float:
    """The run's estimated seconds: (steps + measurement steps) × step time + evaluated examples × forward
    time, each as its kind counts them (an ICS run measures every ``measure_every`` steps, one step per
    measured layer and per smoothness step size). ``sizes``: the number of ``train``, ``val`` and ``test``
    examples the spec's data has."""
    kind = kind_of(spec)
    steps = kind.steps(spec, sizes["train"])
    train_steps = steps + kind.measured_steps(spec, steps)
    return train_steps * calibration.step_seconds + kind.evaluated(spec, steps, sizes) * calibration.forward_seconds


def wall_seconds(seconds: Sequence[float], jobs: int) -> float:
    """The makespan of ``seconds`` on ``jobs`` slots, longest first, each to the slot that frees first."""
    slots = [0.0] * max(1, int(jobs))
    for s in sorted(seconds, reverse=True):
        slots[slots.index(min(slots))] += s
    return max(slots)


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class Plan:
    profile: str
    device: str
    calibrated_on: Optional[str]
    jobs: int
    executor: str
    claims: list = field(default_factory=list)       # one dict per claim (see make_plan)
    total: dict = field(default_factory=dict)
    calibration: list = field(default_factory=list)  # one dict per class
    calibration_seconds: float = 0.0
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _not_on_disk(specs) -> list[str]:
    """The datasets of ``specs`` read from files with no copy on disk (a dry run downloads nothing)."""
    import bnlab.data
    return sorted(name for name in {s["dataset"] for s in specs}
                  if bnlab.data.from_files(name) and bnlab.data.locate(name) is None)


def make_plan(profile: dict, claims: Sequence[int], jobs: int, executor: str = "process",
              calibration: bool = True, gpus_per_run: Optional[float] = None,
              log: Callable[[str], None] = lambda _: None) -> Plan:
    """The study's plan (see the module docstring); creates nothing on disk."""
    from bnlab.study.runner import estimated_cost
    counts = count_runs(profile, claims)
    later = later_rounds(profile, claims)
    looks = later_looks(profile, claims)
    device = str(profile.get("device", "cpu"))
    cuda_wanted = device.startswith("cuda")
    on = device if (not cuda_wanted or torch.cuda.is_available()) else "cpu"
    plan = Plan(profile.get("name", "custom"), device, on if calibration else None, jobs, executor)
    seconds: dict[str, float] = {}
    peaks: dict[tuple, float] = {}
    if calibration:
        specs = {k: s for c in counts.values() for k, s in c.own.items()}
        stand_ins = _not_on_disk(specs.values())
        classes: dict[tuple, dict] = {}
        for spec in specs.values():
            cls = spec_class(spec)
            if cls not in classes or estimated_cost(spec) > estimated_cost(classes[cls]):
                classes[cls] = spec
        started = time.perf_counter()
        done: dict[tuple, Calibration] = {}
        too_big: dict[tuple, float] = {}   # class → its estimated MB, beyond the memory free here
        baseline = _rss_mb("VmRSS")
        free = _device_memory_mb(on, free=True)

        def activations(item):  # smallest first (see calibrate's peak_mb)
            spec = item[1]
            return spec.get("batch_size", 64) * spec.get("depth", 8) * spec.get("width", 1.0)
        for i, (cls, spec) in enumerate(sorted(classes.items(), key=activations)):
            estimate = estimate_mb({**spec, "device": on})
            if free is not None and estimate > CALIBRATE_WITHIN * free:
                too_big[cls] = estimate
                log(f"not calibrating {i + 1}/{len(classes)}: {_describe(spec)} needs ≈ {_gb(estimate)}, "
                    f"{_gb(free)} free on {on}")
                continue
            log(f"calibrating {i + 1}/{len(classes)}: {spec['kind']} depth {spec.get('depth')} width "
                f"{spec.get('width')} {spec['dataset']} batch {spec.get('batch_size')} on {on}"
                + (" (random tensors of its shape)" if spec["dataset"] in stand_ins else ""))
            done[cls] = calibrate({**spec, "device": on}, baseline_mb=None if on.startswith("cuda") else baseline,
                                  stand_in=spec["dataset"] in stand_ins)
            row = {f: v for f, v in zip(CLASS_FIELDS, cls)}
            row.update(device=on, **{k: round(v, 6) for k, v in asdict(done[cls]).items() if k != "device"},
                       estimated_mb=round(estimate, 1), stand_in=spec["dataset"] in stand_ins)
            plan.calibration.append(row)
        plan.calibration_seconds = time.perf_counter() - started
        for key, spec in specs.items():
            if spec_class(spec) in done:
                seconds[key] = estimate_seconds(spec, done[spec_class(spec)], data_sizes(spec))
        peaks = {cls: c.peak_mb for cls, c in done.items()}
        _stand_in_notes(plan, stand_ins, specs)
        if too_big:
            left_out = sum(1 for spec in specs.values() if spec_class(spec) in too_big)
            largest = max(too_big.values())
            plan.notes.append(f"Not calibrated: {len(too_big)} class(es) of run estimated to need more than "
                              f"{CALIBRATE_WITHIN:.0%} of the {_gb(free)} free on {on} (up to ≈ {_gb(largest)}, "
                              f"estimated before building: bnlab.study.plan.estimate_mb); their {left_out} runs "
                              f"are left out of the hours and the peak (marked >).")
    all_seconds = []
    for number, count in counts.items():
        row = {"claim": number, "title": count.title, "runs": len(count.own), "kinds": count.kinds(),
               "shared": count.shared, "later_max": later.get(number), "looks_max": looks.get(number)}
        if calibration:
            own = [seconds[k] for k in count.own if k in seconds]
            all_seconds += own
            row.update(hours=sum(own) / 3600, wall_hours=wall_seconds(own, jobs) / 3600,
                       peak_mb=max((peaks[spec_class(s)] for s in count.own.values() if spec_class(s) in peaks),
                                   default=None),
                       uncalibrated=len(count.own) - len(own))
        plan.claims.append(row)
    plan.total = {"runs": sum(r["runs"] for r in plan.claims),
                  "kinds": {k: sum(r["kinds"].get(k, 0) for r in plan.claims) for k in KINDS},
                  "later_max": sum(later.values()), "looks_max": sum(looks.values())}
    plan.total["kinds"] = {k: v for k, v in plan.total["kinds"].items() if v}
    if calibration:
        plan.total.update(hours=sum(all_seconds) / 3600, wall_hours=wall_seconds(all_seconds, jobs) / 3600,
                          peak_mb=max(peaks.values(), default=0.0),
                          uncalibrated=sum(r["uncalibrated"] for r in plan.claims))
    _notes(plan, later, cuda_wanted, on, gpus_per_run)
    if int(profile.get("stack", 1)) > 1:
        plan.notes.append(f"Runs that differ only in their seed and learning rate train in stacks of up to "
                          f"{int(profile['stack'])} (bnlab.models.stack); the hours count each run alone, an "
                          f"upper bound (a stack of 6 took 0.4–0.8× the CPU time of its runs alone here).")
    if any(s.get("stop_at_train_acc") for c in counts.values() for s in c.own.values()):
        plan.notes.append("Runs that stop once they fit their training examples (claim 3) are counted at their "
                          "step cap: an upper bound (most stop well before it).")
    places = settings(profile)
    if len(places) > 1:
        plan.notes.insert(0, f"Every claim in {len(places)} settings: {'; '.join(p.label for p in places)} "
                             f"(a run two settings share is counted once).")
    if looks:
        design = scope_design(profile)
        own = {n: scope_design(profile, CLAIMS[n]) for n in claims if CLAIMS[n].SLUG in profile
               and (profile[CLAIMS[n].SLUG] or {}).get("looks")}
        plan.notes.append(f"Sequential seeds: {design.text()}"
                          + "".join(f"; claim {n}: {d.text().split(';')[0]}"
                                    + (", each part stopping at the look that decides it"
                                       if hasattr(CLAIMS[n], "part_looks") else "") for n, d in own.items())
                          + f"; the counts are the first look's, and later looks may add up to "
                            f"{sum(looks.values())} runs (a claim runs them only while a part of it is undecided).")
    return plan


def _stand_in_notes(plan: Plan, names: Sequence[str], specs: dict) -> None:
    import bnlab.data
    for name in names:
        shapes = sorted({"×".join(map(str, _example_shape(s))) for s in specs.values() if s["dataset"] == name})
        train, test = bnlab.data.split_sizes(name)
        plan.notes.append(f"{name} is not on disk and a dry run downloads nothing: its runs were calibrated on random "
                          f"tensors of its shape ({', '.join(shapes)}; a step costs the same on any values), and "
                          f"their peak memory adds the examples each run holds as float32 without loading them "
                          f"(of its {train} training and {test} test examples).")


def _notes(plan: Plan, later: dict, cuda_wanted: bool, on: str, gpus_per_run: Optional[float]) -> None:
    notes = plan.notes
    tuned = ", ".join(str(n) for n, claim in CLAIMS.items() if claim.TUNED_ON_SEEDS)
    notes.append(f"The first round and the tuned claims' second round ({tuned}); shared runs are counted once, "
                 f"with the first claim that declares them.")
    for number, most in later.items():
        rounds = CLAIMS[number].LATER_ROUNDS
        notes.append(f"Claim {number} may add up to {most} runs in later rounds ({rounds.what})." if most
                     else f"Claim {number} adds no runs in later rounds here{rounds.none}")
    if plan.calibrated_on is None:
        notes.append("Not calibrated (--no-calibrate): run counts only.")
        return
    unit = "GPU" if plan.calibrated_on.startswith("cuda") else "CPU"
    notes.append(f"{unit}-hours: one {'GPU' if unit == 'GPU' else 'core'} per run; wall time at {plan.jobs} "
                 f"runs at once ({plan.executor} executor), longest first; data loading and process start-up "
                 f"are left out. Calibration took {plan.calibration_seconds:.1f} s.")
    if cuda_wanted and not on.startswith("cuda"):
        notes.append(f"The profile's device is {plan.device}, but this machine has no GPU: calibrated on the "
                     f"CPU, so the figures are CPU figures; GPU time is not estimated here.")
    peak = plan.total.get("peak_mb", 0.0)
    if plan.executor == "ray" and cuda_wanted:
        if gpus_per_run is not None:
            notes.append(f"Ray reserves {gpus_per_run:g} GPU per run (--gpus-per-run).")
        elif on.startswith("cuda") and peak > 0:
            total = torch.cuda.get_device_properties(torch.device(on)).total_memory / 2 ** 20
            per_gpu = max(1, math.floor(total / peak))
            notes.append(f"Peak {peak:.0f} MB of {total:.0f} MB GPU memory per run: {per_gpu} runs fit per GPU; "
                         f"suggest --gpus-per-run {1 / per_gpu:.3g} (the default reserves 1).")
        else:
            notes.append("Ray reserves 1 GPU per run (default); no GPU here to suggest a smaller "
                         "--gpus-per-run from its memory.")


def _hours(h: Optional[float]) -> str:
    return "-" if h is None else (f"{h:.3f}" if h < 10 else f"{h:.1f}")


def format_plan(plan: Plan) -> str:
    """The fixed-column table, totals and notes."""
    unit = "GPU" if (plan.calibrated_on or "").startswith("cuda") else "CPU"
    head = (f"{'claim':<44} {'runs':>5}  {'kinds':<26} {'est. ' + unit + '-h':>10} "
            f"{'wall-h@' + str(plan.jobs):>9} {'peak MB':>8}")
    lines = [f"study plan: profile {plan.profile}, device {plan.device}"
             + (f", calibrated on {plan.calibrated_on}" if plan.calibrated_on else ", not calibrated"),
             "", head, "-" * len(head)]

    def line(label, row):
        kinds = ", ".join(f"{k} {v}" for k, v in row["kinds"].items()) or "-"
        more = ">" if row.get("uncalibrated") else ""   # runs left out (not calibrated: beyond free memory)
        return (f"{label:<44.44} {row['runs']:>5}  {kinds:<26} {more + _hours(row.get('hours')):>10} "
                f"{more + _hours(row.get('wall_hours')):>9} "
                f"{(more + format(row['peak_mb'], '.0f') if row.get('peak_mb') is not None else '-'):>8}")
    for row in plan.claims:
        lines.append(line(f"{row['claim']}. {row['title']}", row))
        extra = [f"shared with claim {n}: {k}" for n, k in sorted(row["shared"].items())]
        if row.get("later_max"):
            extra.append(f"later rounds: up to +{row['later_max']}")
        if row.get("looks_max"):
            extra.append(f"later looks: up to +{row['looks_max']}")
        if extra:
            lines.append(f"{'':<5}{'; '.join(extra)}")
    lines += ["-" * len(head), line("total (counted rounds)", plan.total), ""]
    lines += [f"* {n}" for n in plan.notes]
    return "\n".join(lines)

