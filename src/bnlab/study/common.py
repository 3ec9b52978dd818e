"""Pieces the claim modules share: building specs from a profile, reading rows back, plotting."""

from __future__ import annotations

import math
from typing import Iterable, Optional

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from bnlab.study.metrics import mean_ci  # noqa: E402
from bnlab.study.specs import make_spec, spec_key  # noqa: E402

__all__ = ["base_fields", "train_spec", "lookup", "final_loss", "final_acc", "chance", "figure",
           "plot_mean_band", "ARM_LABELS", "arm_label", "fmt", "fmt_ci", "ARM_COLORS"]

ARM_LABELS = {"bn": "BN", "none": "no norm (He init)", "skipinit": "SkipInit", "fixup": "Fixup",
              "noisy_bn": "noisy BN", "frozen_bn": "BN, frozen stats"}
ARM_COLORS = {"bn": "tab:blue", "none": "tab:red", "skipinit": "tab:green", "fixup": "tab:purple",
              "noisy_bn": "tab:orange", "frozen_bn": "tab:gray"}


def arm_label(norm: str, plain: bool = False) -> str:
    label = f"ghost BN ({norm.split(':')[1]})" if norm.startswith("ghost:") else ARM_LABELS.get(norm, norm)
    return f"{label}, plain" if plain else label


def base_fields(profile: dict, dataset: Optional[str] = None) -> dict:
    """Settings every run of a profile shares."""
    return {"dataset": dataset or profile["dataset"], "device": profile.get("device", "cpu"),
            "width": profile["width"], "depth": profile["depth"], "eval_every": profile["eval_every"]}


def train_spec(profile: dict, **fields) -> dict:
    """A ``train`` spec: the profile's shared settings, then ``fields`` (norm, lr, seed, …)."""
    spec = base_fields(profile, fields.pop("dataset", None))
    spec.update(fields)
    return make_spec("train", **spec)


def lookup(results: dict, spec: dict) -> Optional[dict]:
    """The stored row for ``spec`` (``None`` if it was not run or failed)."""
    row = results.get(spec_key(spec))
    return row if row is not None and row["status"] in ("done", "diverged") else None


def final_loss(result: dict) -> float:
    """Mean training loss over the last tenth of the steps (single batches are noisy)."""
    losses = [v for v in result.get("losses", []) if v is not None]
    if not losses:
        return math.nan
    tail = losses[-max(1, len(losses) // 10):]
    return float(np.mean(tail))


def chance(result: dict) -> float:
    return result.get("chance", 0.1)


def final_acc(row: Optional[dict]) -> float:
    """Final test accuracy (%); a diverged run counts as chance level."""
    if row is None:
        return math.nan
    result = row["result"] or {}
    accs = result.get("curve", {}).get("test_acc", [])
    if row["status"] == "diverged" or not accs or accs[-1] is None:
        return 100.0 * chance(result)
    return 100.0 * accs[-1]


def figure(width: float = 5.5, height: float = 3.6, ncols: int = 1):
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def plot_mean_band(ax, x: Iterable[float], per_seed: list[list[float]], label: str, color=None,
                   marker: str = "o") -> None:
    """Mean over seeds with a 95% CI band (per_seed[i] aligned with x)."""
    x = list(x)
    stats = [mean_ci([s[i] for s in per_seed if i < len(s)]) for i in range(len(x))]
    mean = [m for m, _, _ in stats]
    ax.plot(x, mean, marker=marker, label=label, color=color, ms=3)
    ax.fill_between(x, [lo for _, lo, _ in stats], [hi for _, _, hi in stats], alpha=0.2, color=color)


def fmt(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def fmt_ci(triple, digits: int = 2, unit: str = "") -> str:
    mean, low, high = triple
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}{unit} [{low:.{digits}f}, {high:.{digits}f}]"
