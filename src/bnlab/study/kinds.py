"""Run kinds: what each kind of run is, declared once.

A spec's ``kind`` names one of :data:`KINDS`. Its :class:`RunKind` says how a spec of that kind runs,
how many optimizer steps it takes and how many examples it passes forward without training (what the
plan multiplies its calibration by), and what a step costs beside a training step (the order the
runner starts runs in). The specs, the runner, the plan and the executors read these records; nothing
else branches on a kind.

* ``train`` — :func:`bnlab.study.runs.run_train`: :func:`bnlab.train.train` with a probe recording the
  loss every step and the validation/training accuracy every ``eval_every`` steps (claims 2–5);
* ``ics`` — claim 1's own SGD loop, which also measures distribution shift, gradient ICS and smoothness
  (:func:`bnlab.study.ics_loop.run_ics`);
* ``signal`` — one forward/backward at initialization recording per-block statistics
  (:func:`bnlab.study.signal.run_signal`).

A claim builds its runs with the kind itself (``TRAIN.spec(norm="bn", lr=0.1, ...)``); adding a kind is
one more record here.
"""

from __future__ import annotations

import json
import math
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from bnlab.study import ics_loop, runs, signal

__all__ = ["RunKind", "TRAIN", "ICS", "SIGNAL", "KINDS", "named", "kind_of", "execute", "execute_stack",
           "stack_group"]


def _no_measurements(spec: dict, steps: int) -> int:
    return 0


@dataclass(frozen=True)
class RunKind:
    """One kind of run.

    ``run(spec) -> (status, result)`` executes it; ``steps(spec, train_size)`` is its optimizer steps on
    ``train_size`` training examples; ``evaluated(spec, steps, sizes)`` the examples it passes forward
    without training (``sizes``: the ``train``, ``val`` and ``test`` examples of its data);
    ``measured_steps(spec, steps)`` the extra forward/backward passes its measurements take; ``cost`` a
    step's cost relative to a training step's (a rough guide for ordering runs, not an estimate).
    A kind whose runs can train together has ``run_stack(specs) -> [(status, result), ...]`` and
    ``stack_group(spec)``: specs with equal groups may form one stack (see :func:`execute_stack`).
    """

    name: str
    run: Callable[[dict], tuple[str, dict]]
    steps: Callable[[dict, int], int]
    evaluated: Callable[[dict, int, dict], int]
    measured_steps: Callable[[dict, int], int] = _no_measurements
    cost: float = 1.0
    run_stack: Optional[Callable[[list[dict]], list[tuple[str, dict]]]] = None
    stack_group: Optional[Callable[[dict], str]] = None

    def spec(self, **fields: Any) -> dict:
        """A spec of this kind. Values must be JSON scalars, lists or dicts. Every spec has ``init:
        "paired"``: its network's weights come from a generator seeded with the run's seed, so the arms of a
        seed start from the same weights wherever their architectures allow (see ``init_seed`` of
        :class:`bnlab.models.resnet.ResNet`); a stored spec without it was built from the global generator."""
        spec = {"kind": self.name, "init": "paired", **fields}
        json.dumps(spec)  # raises TypeError early for values that could not be stored
        return spec


# ------------------------------------------------------------------------------------------------ train

def _train_steps(spec: dict, train_size: int) -> int:
    """Epochs × steps per epoch (full batches), capped by ``max_steps``."""
    per_epoch = max(1, train_size // int(spec["batch_size"]))
    if spec.get("max_steps") is not None:
        return int(spec["max_steps"])
    return int(spec.get("epochs", 1)) * per_epoch


def _train_evaluated(spec: dict, steps: int, sizes: dict) -> int:
    """The probe's evaluations (validation and training subsets), then the final validation and test sets."""
    val, test = sizes["val"], sizes["test"]
    evals = steps // int(spec.get("eval_every", 10) or 10 ** 9) + 1
    per_eval = min(val, spec.get("val_eval_size") or val) + min(sizes["train"], spec.get("train_eval_size") or 0)
    return evals * per_eval + val + min(test, spec.get("test_eval_size") or test)


# ------------------------------------------------------------------------------------------------ ics

def _run_ics(spec: dict) -> tuple[str, dict]:
    return ics_loop.run_ics(spec, runs.load_data(spec), runs.build_model)


def _run_ics_stack(specs: list[dict]) -> list[tuple[str, dict]]:
    return ics_loop.run_ics_stack(specs, runs.load_data(specs[0]), runs.build_model)


def _ics_steps(spec: dict, train_size: int) -> int:
    return int(spec["steps"])


def _ics_evaluated(spec: dict, steps: int, sizes: dict) -> int:
    """Each evaluation re-estimates BN's statistics on clean batches first; the test set once at the end."""
    val, test = sizes["val"], sizes["test"]
    evals = steps // int(spec.get("eval_every") or 10 ** 9) + 1
    recal = int(spec.get("recal_batches", 20)) * int(spec["batch_size"]) if spec.get("norm") != "none" else 0
    return evals * (min(val, spec.get("val_eval_size") or val) + recal) + test


def _ics_measured(spec: dict, steps: int) -> int:
    """Every ``measure_every`` steps, one step per measured layer and per smoothness step size."""
    if not spec.get("measure_every"):
        return 0
    layers = len(spec.get("ics_layers", [0.25, 0.5, 0.75]))
    extra = layers + len(spec.get("step_sizes", [0.05, 0.1, 0.2, 0.4]))
    probes = [eta for eta in spec.get("probe_steps") or [] if eta != spec.get("lr")]   # the lr's is reused
    extra += len(probes) * layers + len(spec.get("probe_steps") or []) // 2   # + a forward per probe: ½ a step
    return math.ceil(steps / int(spec["measure_every"])) * extra


# ------------------------------------------------------------------------------------------------ signal

def _run_signal(spec: dict) -> tuple[str, dict]:
    return signal.run_signal(spec, runs.load_data(spec), runs.build_model)


# ------------------------------------------------------------------------------------------------ the kinds

TRAIN = RunKind("train", runs.run_train, _train_steps, _train_evaluated, run_stack=runs.run_train_stack,
                stack_group=runs.stack_group)
ICS = RunKind("ics", _run_ics, _ics_steps, _ics_evaluated, _ics_measured, cost=3.0, run_stack=_run_ics_stack,
              stack_group=runs.stack_group)
SIGNAL = RunKind("signal", _run_signal, steps=lambda spec, train_size: 1, evaluated=lambda spec, steps, sizes: 0,
                 cost=0.02)

KINDS: dict[str, RunKind] = {kind.name: kind for kind in (TRAIN, ICS, SIGNAL)}


def named(name: str) -> RunKind:
    """The :class:`RunKind` called ``name``; raises :class:`ValueError` for any other name."""
    if name not in KINDS:
        raise ValueError(f"spec kind must be one of {', '.join(KINDS)} (got {name!r})")
    return KINDS[name]


def kind_of(spec: dict) -> RunKind:
    """The :class:`RunKind` of ``spec`` (its ``kind``); raises :class:`ValueError` for an unknown one."""
    return named(spec.get("kind"))


def stack_group(spec: dict) -> Optional[str]:
    """What ``spec`` must share with others to train in one stack with them, or ``None`` when its kind
    runs alone."""
    kind = kind_of(spec)
    return None if kind.run_stack is None else f"{kind.name}:{kind.stack_group(spec)}"


def execute_stack(specs: list[dict]) -> list[tuple[str, dict, Optional[str]]]:
    """Run ``specs`` (one :func:`stack_group`) as one stack: [(status, result, error), ...] in their order.
    An exception fails every run of the stack, each with the traceback."""
    groups = {stack_group(spec) for spec in specs}
    if len(groups) != 1 or None in groups:
        raise ValueError(f"execute_stack: the specs must share one stack group (got {len(groups)})")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [(status, result, None) for status, result in kind_of(specs[0]).run_stack(specs)]
    except Exception:  # noqa: BLE001 — recorded in the store with its traceback
        error = traceback.format_exc()
        return [("failed", {}, error) for _ in specs]
    finally:
        torch.set_num_threads(previous_threads)


def execute(spec: dict) -> tuple[str, dict, Optional[str]]:
    """Run ``spec``; returns (status, result, error). Exceptions become status ``failed`` with the
    traceback as the error, so one broken run never stops a study."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per run: --jobs N runs use N cores, and results are reproducible
    try:
        status, result = kind_of(spec).run(spec)
        return status, result, None
    except Exception:  # noqa: BLE001 — recorded in the store with its traceback
        return "failed", {}, traceback.format_exc()
    finally:
        torch.set_num_threads(previous_threads)
