"""One look for every figure of the report: a colour per arm, line styles, legends outside the data.

Colours come from the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies) and
are keyed by arm name, so an arm has the same colour in every figure. Doses of one arm (ghost-batch sizes,
noise strengths) get shades of that arm's hue. A second dimension (residual/plain, batch size) is drawn
with :data:`LINESTYLES`, never with a second colour. Claim modules draw with :func:`figure`, :func:`band`
and :func:`legend_outside`.
"""

from __future__ import annotations

import io
import math
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display: works on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex, to_rgb  # noqa: E402

__all__ = ["OKABE_ITO", "ARM_COLORS", "LINESTYLES", "RC", "DPI", "MAX_WIDTH", "arm_color", "figure", "band",
           "legend_outside", "png_bytes", "to_palette_png"]

OKABE_ITO = {"orange": "#E69F00", "sky": "#56B4E9", "green": "#009E73", "yellow": "#F0E442",
             "blue": "#0072B2", "vermillion": "#D55E00", "purple": "#CC79A7", "black": "#000000",
             "grey": "#999999"}

ARM_COLORS = {"bn": OKABE_ITO["blue"], "none": OKABE_ITO["vermillion"], "skipinit": OKABE_ITO["green"],
              "fixup": OKABE_ITO["purple"], "noisy_bn": OKABE_ITO["orange"], "groupnorm": OKABE_ITO["sky"],
              "layernorm": OKABE_ITO["yellow"], "frozen_bn": OKABE_ITO["grey"], "ghost": OKABE_ITO["blue"]}

LINESTYLES = ["-", "--", ":", "-."]

# One figure style, applied by :func:`figure`: small but legible text at the size figures are shown.
RC = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 8, "xtick.labelsize": 8,
      "ytick.labelsize": 8, "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
      "grid.alpha": 0.25, "grid.linewidth": 0.6, "lines.linewidth": 1.5, "figure.facecolor": "white",
      "savefig.facecolor": "white"}
DPI = 110          # pixels per inch of the saved PNGs
MAX_WIDTH = 10.0   # inches: 1100 px at DPI, within the report's text column, so figures are never scaled down
PALETTE_COLORS = 128  # colours of the saved palette PNGs: every line and band shade, and their antialiasing


def _shade(color: str, fraction: float) -> str:
    """``color`` mixed with white (fraction 0: the colour itself; 1: nearly white)."""
    r, g, b = to_rgb(color)
    f = min(max(fraction, 0.0), 0.75)
    return to_hex((r + (1 - r) * f, g + (1 - g) * f, b + (1 - b) * f))


def arm_color(arm: str, dose_index: int = 0, doses: int = 1) -> str:
    """The arm's colour; ``name:dose`` arms (``ghost:8``, ``noisy_bn:1.0``) and explicit dose indices get
    lighter shades of the base arm's hue (the first dose darkest)."""
    base = arm.split(":", 1)[0]
    color = ARM_COLORS.get(base, OKABE_ITO["black"])
    if doses > 1:
        return _shade(color, 0.6 * dose_index / (doses - 1))
    return color


def figure(ncols: int = 1, nrows: int = 1, width: float = 4.2, height: float = 3.2):
    """A figure of ``nrows × ncols`` panels sized for the report: ``width`` inches per panel, narrowed so the
    whole figure fits :data:`MAX_WIDTH` (shown at its own size, its text keeps the size :data:`RC` sets)."""
    plt.rcParams.update(RC)
    width = min(width, MAX_WIDTH / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, [ax for row in axes for ax in row]


def band(ax, x: Sequence[float], mean: Sequence[float], low: Sequence[float], high: Sequence[float],
         color: str, label: str, linestyle: str = "-", marker: str = "o") -> None:
    """A mean line with its 95% interval as a shaded band (points with no data are skipped)."""
    keep = [i for i, m in enumerate(mean) if m is not None and math.isfinite(m)]
    xs = [x[i] for i in keep]
    ax.plot(xs, [mean[i] for i in keep], color=color, label=label, linestyle=linestyle, marker=marker, ms=3)
    ax.fill_between(xs, [low[i] for i in keep], [high[i] for i in keep], color=color, alpha=0.18, linewidth=0)


def legend_outside(fig, axes) -> None:
    """One legend for the figure, below the panels, collecting every labelled line once."""
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), frameon=False,
                   bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.06 + 0.05 * ((len(labels) - 1) // 4), 1, 1))
    else:
        fig.tight_layout()


def png_bytes(fig, dpi: int = DPI) -> bytes:
    """``fig`` as a palette PNG (closing it): about a third of the RGBA PNG's size, the same picture to the eye."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return to_palette_png(buffer.getvalue())


def to_palette_png(png: bytes, colors: int = PALETTE_COLORS) -> bytes:
    """A PNG (figure or screenshot on an opaque background) re-encoded with a palette of ``colors``: plots and
    pages use a few flat colours, and the palette covers their antialiased edges and shaded bands."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    palette = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    out = io.BytesIO()
    palette.save(out, format="PNG", optimize=True)
    return out.getvalue()
