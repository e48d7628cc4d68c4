"""Pictures: image grids (PIL) and training curves (matplotlib, headless)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .fileio import atomic_path


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """uint8 images [N, 3, H, W] -> one PIL image, `nrow` per row, white padding, integer upscale."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = arr[i] if c == 3 else arr[i].repeat(3, axis=-1)
    img = Image.fromarray(grid)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    return img


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, scale: int = 1) -> None:
    """Save uint8 images [N, 3, H, W] as one PNG grid, atomically."""
    with atomic_path(path) as tmp:
        image_grid(images, nrow=nrow, scale=scale).save(tmp, format="PNG")


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, imported when a picture is first drawn: matplotlib
    takes about half a second to import, which commands that draw nothing should not pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, title: str = "", dpi: int = 110) -> None:
    """Title, tight layout, PNG written atomically, figure closed: the end of every plot here."""
    plt = pyplot()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def plot_curves(
    records: Sequence[dict],
    keys: Sequence[str],
    path: str | os.PathLike,
    x: str = "step",
    title: str = "",
    logy: Sequence[str] = (),
) -> None:
    """One subplot per key of the JSONL log records, against `x`; saved as PNG."""
    plt = pyplot()
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        pts = [(r[x], r[key]) for r in records if key in r and x in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 30 else None)
        ax.set_xlabel(x)
        ax.set_title(key)
        if key in logy:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    save_figure(fig, path, title)


def plot_series(
    panels: dict[str, dict[str, Sequence[tuple[float, ...]]]],
    path: str | os.PathLike,
    xlabel: str,
    title: str = "",
    logx: bool = False,
) -> None:
    """One subplot per panel, one line per named series of (x, y) points; saved as PNG. Points given as
    (x, y, low, high) also draw a band from low to high (the spread over seeds).

    Used for the experiment report: FID / IS / accuracy against epochs per run, and the sweeps.
    """
    plt = pyplot()
    panels = {k: v for k, v in panels.items() if any(v.values())}
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, pts in series.items():
            pts = [p for p in pts if p[1] is not None]
            if pts:
                (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
                if all(len(p) == 4 for p in pts) and any(p[2] != p[3] for p in pts):  # min..max band
                    ax.fill_between(
                        [p[0] for p in pts],
                        [p[2] for p in pts],
                        [p[3] for p in pts],
                        color=line.get_color(),
                        alpha=0.2,
                        linewidth=0,
                    )
        ax.set_xlabel(xlabel)
        ax.set_title(name)
        if logx:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    save_figure(fig, path, title)


def plot_image_panels(panels: dict[str, Image.Image], path: str | os.PathLike, title: str = "") -> None:
    """Image grids side by side, each under its title (the report's samples-per-method figure)."""
    plt = pyplot()
    if not panels:
        return
    aspect = max(img.width / img.height for img in panels.values())
    fig, axes = plt.subplots(1, len(panels), figsize=((3.8 * aspect + 0.6) * len(panels), 4.3), squeeze=False)
    for ax, (name, img) in zip(axes[0], panels.items(), strict=True):
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    save_figure(fig, path, title, dpi=100)
