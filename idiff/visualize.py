"""Pictures people look at: sample grids and loss curves."""

import io
import math

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


def plot_losses(rows: list[dict], path) -> None:
    """Loss curves (total, mse, vb and per-quartile loss) against the step, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [row["step"] for row in rows]
    for key in ("loss", "mse", "vb", "loss_q0", "loss_q3"):
        values = [row.get(key) for row in rows]
        if any(v is not None for v in values):
            ax.plot(steps, [np.nan if v is None else v for v in values], label=key,
                    linewidth=1.5 if key == "loss" else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(v is None or v > 0 for row in rows for v in (row.get("loss"),)):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.atomic_write_bytes(path, buffer.getvalue())
