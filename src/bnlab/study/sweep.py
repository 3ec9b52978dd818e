"""The learning-rate sweep: claim 4's runs, which claims 2 and 5 reuse.

A log-spaced learning-rate grid × arms (BN, none, SkipInit, Fixup) × batch sizes × seeds, each run with
the one-cycle schedule (20% linear warm-up, then linear decay), read at its final model. The grid is
*extended* upwards while an arm is stable at its top (:func:`grid`; the runner collects specs again
after each round), up to ``max_extensions`` extra rates, so that each arm's largest stable rate is
interior. Claim 2 trains each arm longer at the rate this sweep validated; claim 5's residual cells at the
profile's depth *are* sweep runs. All three build them with :func:`spec`, so equal runs have equal
specs and run once.

Its settings are the profile's ``lr`` section, claim 4's (:class:`bnlab.study.claim_lr.Config`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from bnlab.study.common import choose_lr, final_pct, lookup, stable, train_spec

__all__ = ["SECTION", "settings", "first_batch_size", "spec", "grid", "Table", "table", "extension_runs"]

SECTION = "lr"  # the profile section holding the sweep's settings


def settings(profile: dict) -> dict:
    """The profile's sweep settings (its ``lr`` section)."""
    return profile[SECTION]


def first_batch_size(profile: dict) -> int:
    """The batch size the claims reusing the sweep train at (and claim 4's accuracy part compares)."""
    return settings(profile)["batch_sizes"][0]


def spec(profile: dict, norm: str, lr: float, batch_size: int, seed: int) -> dict:
    """One run of the sweep (claims 2 and 5 reuse these exact specs, so they run once)."""
    cfg = settings(profile)
    fields = {"norm": norm, "lr": lr, "batch_size": batch_size, "seed": seed,
              "eval_every": 0}  # every choice reads the final model only: no curve is evaluated
    if cfg.get("epochs") is not None:
        fields["epochs"] = cfg["epochs"]
    if cfg.get("max_steps") is not None:
        fields["max_steps"] = cfg["max_steps"]
    if cfg.get("weight_decay"):  # only when set, so profiles without it keep their runs' keys
        fields["weight_decay"] = cfg["weight_decay"]
    if cfg.get("momentum", 0.9) != 0.9:
        fields["momentum"] = cfg["momentum"]
    return train_spec(profile, **fields)


def grid(profile: dict, results: Optional[dict], batch_size: int, norm: str) -> tuple[list[float], bool]:
    """(the arm's learning rates, whether they are final): the profile's grid, extended by its top ratio
    while any seed is stable at the top, at most ``max_extensions`` times. Final means every run of the
    grid has finished and no extension is pending (so choices made on it will not change)."""
    cfg, seeds = settings(profile), profile["seeds"]
    lrs = [float(v) for v in cfg["lrs"]]
    ratio = lrs[-1] / lrs[-2]

    def rows(lr):
        return [lookup(results, spec(profile, norm, lr, batch_size, s)) for s in seeds]
    complete = all(r is not None for lr in lrs for r in rows(lr))
    for _ in range(cfg.get("max_extensions", 0)):
        top = rows(lrs[-1])
        if not complete or not any(stable(r) for r in top):
            break
        lrs.append(float(f"{lrs[-1] * ratio:.3g}"))
        complete = all(r is not None for r in rows(lrs[-1]))
    return lrs, complete


@dataclass
class Table:
    """One arm's sweep at one batch size. Per learning rate (``lrs``, the final grid): per-seed validation
    and test accuracy (%) and stability; the validated rate (``best_lr``) and the per-seed accuracies at
    it; per seed the largest stable rate and its censoring (``"above"``: stable at the top of the final
    grid; ``"below"``: nothing stable; ``""``: interior)."""

    lrs: list[float]
    complete: bool
    val: dict[float, list[float]]
    test: dict[float, list[float]]
    stable: dict[float, list[bool]]
    best_lr: Optional[float]
    best_test: list[float]
    best_val: list[float]
    max_stable_lr: list[float]
    censored: list[str]


def table(profile: dict, results: dict, batch_size: int, norm: str) -> Table:
    """The :class:`Table` of ``norm``'s sweep at ``batch_size`` from ``results``."""
    seeds = profile["seeds"]
    lrs, complete = grid(profile, results, batch_size, norm)
    rows = {lr: [lookup(results, spec(profile, norm, lr, batch_size, s)) for s in seeds] for lr in lrs}
    val = {lr: [final_pct(r, "val_acc") for r in rows[lr]] for lr in lrs}
    test = {lr: [final_pct(r, "test_acc") for r in rows[lr]] for lr in lrs}
    ok = {lr: [stable(r) for r in rows[lr]] for lr in lrs}
    best = choose_lr(val)
    limits, censored = [], []
    for i in range(len(seeds)):
        good = [lr for lr in lrs if ok[lr][i]]
        finished = all(rows[lr][i] is not None for lr in lrs)
        limits.append(max(good) if good and finished else math.nan)
        censored.append("above" if good and max(good) == lrs[-1] else ("below" if finished and not good else ""))
    return Table(lrs, complete, val, test, ok, best,
                 best_test=test[best] if best is not None else [math.nan] * len(seeds),
                 best_val=val[best] if best is not None else [math.nan] * len(seeds),
                 max_stable_lr=limits, censored=censored)


def extension_runs(profile: dict, batch_sizes) -> dict[str, int]:
    """The most runs the grid's extensions may add at each of ``batch_sizes`` (every arm, every seed, each
    extra rate), keyed by what they are: claims reading the sweep at the same batch size share them."""
    cfg = settings(profile)
    per_batch = len(cfg["arms"]) * cfg.get("max_extensions", 0) * len(profile["seeds"])
    return {f"lr-sweep extensions at batch {b}": per_batch for b in batch_sizes}
