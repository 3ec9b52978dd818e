"""What BN does, step by step: the four operations on one real channel of a network the study trained.

A training run of plain BN ends with a snapshot of one channel of its first residual block's first BN
(:func:`bnlab.study.runs.bn_snapshot`): the channel's input on a fixed batch, the batch's mean and variance,
γ, β, the running statistics and the layer's outputs with the batch's and with the running statistics.
:func:`pick` chooses the run the report shows (the first seed's longest BN run: claim 2's, in a full
study), :func:`stages` computes the four steps from the snapshot, and :func:`figure` draws them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from bnlab.study import style

__all__ = ["Stages", "pick", "stages", "figure", "numbers"]


def pick(rows: Mapping[str, dict]) -> Optional[dict]:
    """The stored run whose snapshot the report draws: among finished ``train`` runs of plain BN with a
    ``bn_snapshot``, the lowest seed's longest run (claim 2's BN run of the first seed when claim 2 ran);
    ``None`` when no run has one (a store written before runs recorded it)."""
    found = [(key, row) for key, row in rows.items()  # only training runs of plain BN record a snapshot
             if row.get("status") == "done" and (row.get("result") or {}).get("bn_snapshot")
             and row["spec"].get("norm", "bn") == "bn"]
    if not found:
        return None
    key, row = min(found, key=lambda kr: (kr[1]["spec"].get("seed", 0), -int(kr[1]["result"].get("steps") or 0),
                                          kr[0]))
    return row


@dataclass
class Stages:
    """The four steps on the snapshot's values (the kept, evenly spaced values of the channel)."""

    raw: np.ndarray          # 1. the channel's input x
    normalized: np.ndarray   # 2. (x − μ_B) / √(σ²_B + ε)
    output: np.ndarray       # 3. γ·x̂ + β: the layer's own output with the batch statistics (training mode)
    inference: np.ndarray    # 4. the layer's own output in eval mode, with the running statistics
    mean: float              # μ_B, over every value of the channel in the batch
    std: float               # √(σ²_B + ε)

    @property
    def difference(self) -> np.ndarray:
        """Eval-mode output − training-mode output, value by value."""
        return self.inference - self.output


def stages(snapshot: dict) -> Stages:
    """The four steps of ``snapshot`` (a :func:`bnlab.study.runs.bn_snapshot`): the normalized values from
    the stored batch statistics, the outputs as the layer computed them."""
    x = np.asarray(snapshot["x"], dtype=np.float64)
    std = math.sqrt(snapshot["batch_var"] + snapshot["eps"])
    return Stages(x, (x - snapshot["batch_mean"]) / std, np.asarray(snapshot["y_batch"], dtype=np.float64),
                  np.asarray(snapshot["y_eval"], dtype=np.float64), float(snapshot["batch_mean"]), std)


def numbers(snapshot: dict) -> list[list[str]]:
    """The table beside the figure: each quantity BN uses, for this channel."""
    s, st = snapshot, stages(snapshot)
    diff = st.difference
    return [["batch mean μ", "mean of the channel over the batch", f"{s['batch_mean']:.3g}"],
            ["batch variance σ²", "mean of (x − μ)² over the batch", f"{s['batch_var']:.3g}"],
            ["γ (weight)", "learned scale", f"{s['weight']:.3g}"],
            ["β (bias)", "learned shift", f"{s['bias']:.3g}"],
            ["running mean", "average of μ over training, used at inference", f"{s['running_mean']:.3g}"],
            ["running variance", "average of σ² over training (unbiased), used at inference",
             f"{s['running_var']:.3g}"],
            ["inference − training output", "same input, running instead of batch statistics",
             f"mean {diff.mean():+.3g}, largest |·| {np.abs(diff).max():.3g}"]]


def _hist(ax, values, color, label=None, bins=None, filled=True):
    kwargs = dict(bins=bins if bins is not None else 30, color=color, label=label)
    if filled:
        ax.hist(values, alpha=0.75, **kwargs)
    else:
        ax.hist(values, histtype="step", linewidth=1.6, **kwargs)


def figure(snapshot: dict) -> dict:
    """The four steps as four histograms (a report figure: ``{"title", "name", "figure", "caption"}``)."""
    st = stages(snapshot)
    colors = style.OKABE_ITO
    fig, axes = style.figure(ncols=2, nrows=2, width=4.2, height=2.5)
    a, b, c, d = axes
    _hist(a, st.raw, colors["grey"])
    a.axvline(st.mean, color="k", lw=1)
    a.axvspan(st.mean - st.std, st.mean + st.std, color=colors["grey"], alpha=0.15, lw=0)
    a.set(title=f"1. Input x of one channel: μ = {st.mean:.2f}, σ = {st.std:.2f}", xlabel="x", ylabel="values")
    _hist(b, st.normalized, colors["sky"])
    grid = np.linspace(min(-4.0, st.normalized.min()), max(4.0, st.normalized.max()), 200)
    width = np.ptp(st.normalized) / 30 if np.ptp(st.normalized) > 0 else 1.0
    b.plot(grid, len(st.normalized) * width * np.exp(-grid ** 2 / 2) / math.sqrt(2 * math.pi), "k--", lw=1,
           label="mean 0, variance 1")
    b.set(title="2. Normalized: x̂ = (x − μ) / σ", xlabel="x̂", ylabel="values")
    _hist(c, st.output, colors["blue"])
    c.axvline(snapshot["bias"], color="k", lw=1)
    c.set(title=f"3. Scaled and shifted: y = {snapshot['weight']:.2f}·x̂ + {snapshot['bias']:.2f}", xlabel="y",
          ylabel="values")
    bins = np.histogram_bin_edges(np.concatenate([st.output, st.inference]), bins=30)
    _hist(d, st.output, colors["blue"], "training: batch statistics", bins, filled=False)
    _hist(d, st.inference, colors["vermillion"], "inference: running statistics", bins, filled=False)
    diff = st.difference
    d.set(title=f"4. Output; at inference it moves by {diff.mean():+.2f} on average", xlabel="y", ylabel="values")
    style.legend_outside(fig, axes)
    caption = (f"Channel {snapshot['channel']} of `{snapshot['layer']}` on the first {snapshot['examples']} training "
               f"examples ({snapshot['values']} values; {len(st.raw)} evenly spaced ones drawn). Panel 4 shows the "
               f"layer's output in training mode and in eval mode on the same input; their difference is "
               f"{diff.mean():+.3g} on average, at most {np.abs(diff).max():.3g}.")
    return {"title": "BN's four steps on one channel of a trained network", "name": "bn_steps", "figure": fig,
            "caption": caption}
