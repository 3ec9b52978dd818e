"""Study profiles: how big each claim's experiment is, as data.

A profile is a plain dict (one per size below, or a JSON file passed as ``--profile path.json``); the
claim modules read their own section and never branch on the profile's name. Sizes:

* ``tiny``     — seconds; drives the whole pipeline in the tests (2 seeds; its verdicts mean nothing);
* ``quick``    — the default: ≤ 5 minutes on 2 CPU cores (about 2 on an idle machine); MNIST-1D (4k
  sequences of length 40), narrow 1-D ResNet-8s, 3 seeds, every verdict;
* ``standard`` — ≤ 1 hour on CPU: three epochs per run, eight learning rates, depths to 44, and
  Fashion-MNIST for the small-data claim;
* ``full``     — one GPU: Fashion-MNIST, CIFAR-depth ResNets up to 110, 5 seeds.

Units: ``steps`` are optimizer steps; ``lr`` is the SGD learning rate (Nesterov momentum 0.9 and a
one-cycle schedule for ``train`` runs; plain SGD for claim 1's loop, whose per-arm rates were tuned
once on seed 0 over {0.03, 0.1, 0.3, 1}); ``width`` multiplies the base widths 16/32/64;
``eval_every`` is in steps. Claim 5's training runs reuse claim 4's budget and first batch size.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Union

from bnlab.study import claim_ics

__all__ = ["PROFILES", "get_profile", "with_overrides"]

PROFILES: dict[str, dict] = {
    "tiny": {
        "description": "seconds: exercises every code path on a synthetic dataset (not a measurement)",
        "dataset": "synthetic", "seeds": [0, 1], "width": 0.25, "depth": 8, "eval_every": 2, "val_size": 128,
        "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.01, 1.0], "batch_sizes": [32],
               "max_steps": 6},
        "regularize": {"dataset": None, "subset": 128, "batch_size": 32, "ghost_sizes": [8, 32],
                       "max_steps": 8, "lr": 0.05, "weight_decay": 5e-4, "freeze_after": 4},
        "residual": {"signal_depths": [8, 14], "train_depths": [8], "signal_batch": 64, "lrs": [0.01]},
    },
    "quick": {
        "description": "≤ 5 minutes on 2 CPU cores: MNIST-1D, 1-D ResNet-8 at width 0.5, 3 seeds, two epochs per run",
        "dataset": "mnist1d", "seeds": [0, 1, 2], "width": 0.5, "depth": 8, "eval_every": 6,
        "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.003, 0.03, 0.3, 3.0],
               "batch_sizes": [64, 256], "epochs": 2},
        "regularize": {"dataset": None, "subset": 1000, "batch_size": 128, "ghost_sizes": [8, 32, 128],
                       "max_steps": 120, "lr": 0.1, "weight_decay": 5e-4, "freeze_after": 40, "eval_every": 12},
        "residual": {"signal_depths": [8, 20, 56, 110], "train_depths": [8, 20], "signal_batch": 128,
                     "lrs": [0.03, 0.3]},
    },
    "standard": {
        "description": "≤ 1 hour on CPU: MNIST-1D, 3 epochs per run, 8 learning rates, depths to 44, "
                       "Fashion-MNIST for claim 3",
        "dataset": "mnist1d", "seeds": [0, 1, 2], "width": 0.5, "depth": 8, "eval_every": 10,
        "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
               "batch_sizes": [64, 256], "epochs": 3},
        "regularize": {"dataset": "fashion-mnist", "subset": 1000, "batch_size": 128,
                       "ghost_sizes": [8, 32, 128], "max_steps": 150, "lr": 0.1, "weight_decay": 5e-4,
                       "freeze_after": 50, "test_eval_size": 1000, "eval_every": 25},
        "residual": {"signal_depths": [8, 20, 56, 110, 218], "train_depths": [8, 20, 44], "signal_batch": 256,
                     "lrs": [0.03, 0.3]},
    },
    "full": {
        "description": "one GPU: Fashion-MNIST, ResNet-20, 5 seeds, CIFAR depths up to 110",
        "dataset": "fashion-mnist", "seeds": [0, 1, 2, 3, 4], "width": 1.0, "depth": 20, "eval_every": 100,
        "lr": {"arms": ["bn", "none", "skipinit", "fixup"], "lrs": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
               "batch_sizes": [128, 512], "epochs": 15},
        "regularize": {"dataset": "fashion-mnist", "subset": 2000, "batch_size": 128,
                       "ghost_sizes": [8, 32, 128], "max_steps": 3000, "lr": 0.1, "weight_decay": 5e-4,
                       "freeze_after": 200},
        "residual": {"signal_depths": [20, 56, 110, 218, 434], "train_depths": [20, 56, 110],
                     "signal_batch": 256, "lrs": [0.03, 0.3]},
    },
}


for _name, _profile in PROFILES.items():  # each claim module owns its section's defaults
    _profile["ics"] = copy.deepcopy(claim_ics.PRESETS[_name])


def get_profile(name_or_path: Union[str, Path]) -> dict:
    """A deep copy of profile ``name`` (see :data:`PROFILES`), or the JSON file at that path."""
    text = str(name_or_path)
    if text in PROFILES:
        profile = copy.deepcopy(PROFILES[text])
        profile["name"] = text
        return profile
    path = Path(text)
    if path.suffix == ".json" and path.is_file():
        try:
            profile = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--profile {path}: not valid JSON ({error})") from None
        missing = [k for k in ("dataset", "seeds", "ics", "lr", "regularize", "residual") if k not in profile]
        if missing:
            raise ValueError(f"--profile {path}: missing sections {', '.join(missing)}; "
                             f"start from one printed by `bnlab study --profile quick --show-profile`")
        profile.setdefault("name", path.stem)
        return profile
    raise ValueError(f"--profile must be one of {', '.join(PROFILES)} or a .json file (got {text!r})")


def with_overrides(profile: dict, dataset: str | None = None, device: str | None = None,
                   seeds: int | None = None) -> dict:
    """The profile with ``--dataset``/``--device``/``--seeds`` applied (a new dict)."""
    profile = copy.deepcopy(profile)
    if dataset:
        profile["dataset"] = dataset
        profile["regularize"]["dataset"] = dataset
    if device:
        profile["device"] = device
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds must be at least 1 (got {seeds})")
        profile["seeds"] = list(range(seeds))
    return profile
