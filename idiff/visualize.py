"""Pictures people look at: sample grids and loss curves."""

import io
import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from . import storage


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] float NCHW -> uint8 NHWC, truncating as the original's image_sample.py does."""
    return ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, path, ncol: int | None = None, pad: int = 2) -> None:
    """Save uint8 NHWC images as one PNG grid."""
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncol)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    buffer = io.BytesIO()
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(buffer, format="PNG")
    storage.atomic_write_bytes(path, buffer.getvalue())


class Curve(NamedTuple):
    """A loss curve, one point per group of log rows: the mean step, and the mean, min and max of the value."""

    steps: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]


def plot_losses(curves: dict[str, Curve], path) -> None:
    """Loss curves (total, mse, vb and per-quartile loss, as TrainingLog keeps them) against the step, log scale;
    the total loss is drawn with the band of its min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, curve in curves.items():
        line, = ax.plot(curve.steps, curve.mean, label=key, linewidth=1.5 if key == "loss" else 0.8)
        if key == "loss":
            ax.fill_between(curve.steps, curve.low, curve.high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(low > 0 for curve in curves.values() for low in curve.low):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.atomic_write_bytes(path, buffer.getvalue())
