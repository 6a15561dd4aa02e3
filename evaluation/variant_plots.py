"""Per-variant figures: loss curves, a reconstruction grid, prior samples (generative variants), a 2-D latent map.

Inputs are a model folder (`model.pt`, `config.json`, `history.json`), a few raw data rows and a feature
Parquet file; outputs are PNG paths. Figures are drawn on the Agg canvas without pyplot (thread-safe)
and written atomically.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ae_repr.checkpoint import LoadedModel, load_model
from ae_repr.io import FeatureFile, read_features, read_json
from ae_repr.models import Prior

from .inputs import dataset_of, model_dir, split_mask
from .plots import MAX_LEGEND_CLASSES, class_colours, class_legend, save_figure

log = logging.getLogger(__name__)

HISTORY = "history.json"
_DPI = 80
_MAP_ROWS = 2000  # points in the latent map: enough to see structure, cheap to draw
GAP_RGB = (0.30, 0.34, 0.42)  # slate seams: visible on black and on white backgrounds, never a gray-map pixel
HIDDEN_RGB = (0.95, 0.55, 0.10)  # NaN pixels (hidden by an inpainting mask)
_PAD_SHARE = 1 / 16  # seam width as a share of a tile's larger side (1 pixel for 8 x 8 digits, 4 for 64 x 64)
_CHAR_IN = 0.065  # width of one 8-point character, inches: margins sized to the labels, no tight_layout


def plot_loss_curves(
    history: list[dict[str, float]], path: str | os.PathLike[str], *, title: str = ""
) -> Path | None:
    """One panel per loss term (`train/<t>` and `val/<t>` against epoch); None for an empty history."""
    if not history:
        return None
    terms = sorted({k.split("/", 1)[1] for rec in history for k in rec if k.startswith(("train/", "val/"))})
    if not terms:
        return None
    epochs = [rec.get("epoch", i + 1) for i, rec in enumerate(history)]
    cols = min(3, len(terms))
    rows = math.ceil(len(terms) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.3 * rows + 0.5))
    # fixed margins instead of tight_layout, which costs more than drawing the curves
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.5 / fig.get_figheight() + 0.04, top=1 - 0.55 / fig.get_figheight(),
                        wspace=0.3, hspace=0.45)
    for i, term in enumerate(terms):
        ax = fig.add_subplot(rows, cols, i + 1)
        for split, style in (("train", "-"), ("val", "--")):
            ys = [rec.get(f"{split}/{term}", np.nan) for rec in history]
            if not np.all(np.isnan(ys)):
                ax.plot(epochs, ys, style, marker="o" if len(epochs) < 3 else None, ms=3, lw=1.2, label=split)
        ax.set_title(term, fontsize=9)
        ax.tick_params(labelsize=7)
        if i >= len(terms) - cols:
            ax.set_xlabel("epoch", fontsize=8)
    fig.axes[0].legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=_DPI)


def as_images(x: np.ndarray) -> np.ndarray:
    """Rows as displayable images: (N, H, W) or (N, H, W, 3); a flat row becomes a 1 x D strip."""
    if x.ndim == 4:  # (N, C, H, W)
        return x[:, 0] if x.shape[1] != 3 else np.transpose(x, (0, 2, 3, 1))
    return x.reshape(len(x), 1, -1)  # (N, 1, D)


@dataclass(frozen=True)
class GridPanel:
    """One tiled image grid: labelled rows of images, optional column labels, a heading and an axis caption."""

    rows: list[tuple[str, np.ndarray]]
    columns: list[str] | None = None
    heading: str = ""
    xlabel: str = ""


def seam(h: int, w: int) -> int:
    """Pixels between tiles of h x w images: thin, and still visible when large images are drawn smaller."""
    if min(h, w) == 1:  # 1 x D strips of tabular rows: a wider seam would dwarf the strip's one pixel row
        return 1
    return max(1, round(_PAD_SHARE * max(h, w)))


def tile(rows: list[np.ndarray], lo: float, hi: float, pad: int = 1) -> np.ndarray:
    """Rows of images (n_i, H, W[, 3]) as one RGB array in [0, 1], (R * (H + pad) - pad, C * (W + pad) - pad, 3).

    Every tile maps [lo, hi] to [0, 1]; the `pad`-pixel seams and missing cells of short rows are GAP_RGB,
    NaN pixels HIDDEN_RGB.
    """
    h, w = rows[0].shape[1:3]
    cols = max(len(r) for r in rows)
    out = np.empty((len(rows) * (h + pad) - pad, cols * (w + pad) - pad, 3), dtype=np.float32)
    out[:] = GAP_RGB
    for r, imgs in enumerate(rows):
        x = (np.asarray(imgs, dtype=np.float32) - lo) / (hi - lo or 1.0)
        rgb = x if x.ndim == 4 else np.repeat(x[..., None], 3, axis=-1)  # (n, H, W, 3)
        rgb = np.where(np.isnan(rgb), np.asarray(HIDDEN_RGB, dtype=np.float32), np.clip(rgb, 0.0, 1.0))
        for c, img in enumerate(rgb):
            out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = img
    return out


def _label_inches(labels: list[str]) -> float:
    return _CHAR_IN * max((len(s) for s in labels), default=0)


def _draw_panel(ax: Axes, panel: GridPanel, lo: float, hi: float, rotate: bool, xlabel: str) -> None:
    """One imshow of the panel's tiled array, rows labelled on the left and columns on top."""
    h, w = panel.rows[0][1].shape[1:3]
    pad = seam(h, w)
    ax.imshow(tile([imgs for _, imgs in panel.rows], lo, hi, pad), aspect="auto", interpolation="nearest")
    ax.set_yticks([r * (h + pad) + (h - 1) / 2 for r in range(len(panel.rows))], [lab for lab, _ in panel.rows])
    if panel.columns:
        ax.xaxis.tick_top()
        ax.set_xticks(
            [c * (w + pad) + (w - 1) / 2 for c in range(len(panel.columns))],
            panel.columns,
            rotation=90 if rotate else 0,
            fontsize=7,
        )
    else:
        ax.set_xticks([])
    ax.tick_params(length=0, pad=2)
    ax.tick_params(axis="y", labelsize=8)  # the column labels keep their smaller size
    for spine in ax.spines.values():
        spine.set_visible(False)
    if panel.heading:
        ax.set_title(panel.heading, fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)


def image_panels(
    panels: list[GridPanel],
    path: str | os.PathLike[str],
    title: str,
    *,
    limits: tuple[float, float] | None = None,
) -> Path:
    """Tiled image grids stacked in one figure on one shared intensity range (`limits`, else all pixels'), laid out
    in inches from their labels."""
    images = [imgs for panel in panels for _, imgs in panel.rows]
    lo, hi = limits or (
        min(float(np.nanmin(imgs)) for imgs in images),
        max(float(np.nanmax(imgs)) for imgs in images),
    )
    h, w = images[0].shape[1:3]
    flat = h == 1  # tabular rows are 1 x D strips: wider cells, a fixed strip height
    n_cols = max(len(imgs) for imgs in images)
    cell_w = min(3.0, 11.0 / n_cols) if flat else min(0.8, 11.0 / n_cols)
    pad = seam(h, w)
    x_in, y_in = cell_w / (w + pad), (0.3 if flat else cell_w) / (h + pad)  # inches per pixel
    left = 0.25 + _label_inches([lab for panel in panels for lab, _ in panel.rows])
    layout = []  # per panel: inches above the grid (heading, column labels), grid height, inches below, rotated, caption
    for panel in panels:
        rotate = bool(panel.columns) and _label_inches(panel.columns or []) > 0.95 * cell_w
        col_in = 0.0 if not panel.columns else (_label_inches(panel.columns) if rotate else 0.18) + 0.06
        grid_w = (max(len(imgs) for _, imgs in panel.rows) * (w + pad) - pad) * x_in
        grid_h = (len(panel.rows) * (h + pad) - pad) * y_in
        caption = textwrap.fill(panel.xlabel, max(int((grid_w + left) / _CHAR_IN), 30))  # fits under the grid
        below = 0.12 + (0.16 * (caption.count("\n") + 1) + 0.1 if caption else 0.0)
        layout.append(((0.28 if panel.heading else 0.05) + col_in, grid_w, grid_h, below, rotate, caption))
    top = 0.4
    width = left + n_cols * (w + pad) * x_in + 0.2
    height = top + sum(above + grid_h + below for above, _, grid_h, below, _, _ in layout)
    fig = Figure(figsize=(max(width, 0.09 * len(title) + 0.4), height))
    fw = fig.get_figwidth()
    fig.suptitle(title, fontsize=10, y=1 - 0.1 / height, va="top")
    y = height - top
    for panel, (above, grid_w, grid_h, below, rotate, caption) in zip(panels, layout, strict=True):
        y -= above + grid_h
        ax = fig.add_axes((left / fw, y / height, grid_w / fw, grid_h / height))
        _draw_panel(ax, panel, lo, hi, rotate, caption)
        y -= below
    return save_figure(fig, path, dpi=_DPI)


def value_range(x: np.ndarray) -> tuple[float, float]:
    """(min, max) of the finite values: the data's own range, which fills and decodings are shown on."""
    return float(np.nanmin(x)), float(np.nanmax(x))


def numbered(n: int) -> list[str]:
    """Column labels `#1` .. `#n`."""
    return [f"#{i + 1}" for i in range(n)]


def image_grid(
    rows: list[tuple[str, np.ndarray]],
    path: str | os.PathLike[str],
    title: str,
    *,
    columns: list[str] | None = None,
    xlabel: str = "",
    limits: tuple[float, float] | None = None,
) -> Path:
    """One labelled image grid (rows of images on one shared intensity range) as a figure."""
    return image_panels([GridPanel(rows, columns, xlabel=xlabel)], path, title, limits=limits)


@torch.inference_mode()
def plot_reconstructions(
    loaded: LoadedModel, x_raw: np.ndarray, path: str | os.PathLike[str], *, n: int = 8
) -> Path:
    """Originals (top) and their reconstructions (bottom), in normalized data space."""
    x = loaded.normalizer.numpy(np.asarray(x_raw[:n]))
    xt = torch.from_numpy(x).reshape(-1, *loaded.model.input_shape)  # (B, *input_shape)
    recon = loaded.model.reconstruct(xt).float().numpy().reshape(x.shape)
    return image_grid(
        [("input", as_images(x)), ("reconstruction", as_images(recon))],
        path,
        f"{loaded.variant}: reconstructions",
        columns=numbered(len(x)),
        xlabel="test example (normalized data space)",
        limits=value_range(x),  # the data's range: a reconstruction's overshoot must not grey the inputs
    )


@torch.inference_mode()
def plot_prior_samples(
    loaded: LoadedModel, path: str | os.PathLike[str], *, n: int = 16, seed: int = 0
) -> Path | None:
    """Decoded draws from the model's prior; None for a model without the `Prior` capability."""
    if not isinstance(loaded.model, Prior):
        return None
    samples = loaded.model.sample(n, generator=torch.Generator().manual_seed(seed)).float().numpy()
    imgs = as_images(samples)
    per_row = 8
    rows = [(f"draws {i + 1}-{i + len(imgs[i : i + per_row])}", imgs[i : i + per_row]) for i in range(0, len(imgs), per_row)]
    return image_grid(rows, path, f"{loaded.variant}: samples from the prior", xlabel=f"decoded draws z ~ p(z), seed {seed}")


def plot_latent_map(
    z: np.ndarray, labels: np.ndarray | None, path: str | os.PathLike[str], *, title: str = "", seed: int = 0
) -> Path | None:
    """The representation projected on its first two principal axes (as is when 2-D), coloured by label."""
    z = np.asarray(z, dtype=np.float64)
    if len(z) < 3 or z.ndim != 2:
        return None
    rows = np.random.default_rng(seed).permutation(len(z))[:_MAP_ROWS]
    z = z[rows]
    if z.shape[1] == 1:
        xy, axes, method = np.column_stack([z[:, 0], np.zeros(len(z))]), ("z_000", ""), "as is"
    elif z.shape[1] == 2:
        xy, axes, method = z, ("z_000", "z_001"), "as is"
    else:
        zc = z - z.mean(axis=0)
        _, s, vt = np.linalg.svd(zc, full_matrices=False)  # principal axes: cheap and deterministic
        xy = zc @ vt[:2].T
        share = s[:2] ** 2 / max(float((s**2).sum()), 1e-12)
        axes = (f"PC1 ({share[0]:.0%} of variance)", f"PC2 ({share[1]:.0%} of variance)")
        method = "PCA"
    lab = None if labels is None else np.asarray(labels)[rows]
    if lab is not None and np.any(lab < 0):  # a missing label (-1) leaves the map uncoloured
        lab = None
    colours = {} if lab is None else class_colours(sorted(int(c) for c in np.unique(lab)))
    legend_in = 0.7 if 0 < len(colours) <= MAX_LEGEND_CLASSES else 0.0
    fig = Figure(figsize=(4.0 + legend_in, 3.8))
    fw = fig.get_figwidth()  # fixed margins: tight_layout costs more
    fig.subplots_adjust(left=0.76 / fw, right=1 - (0.12 + legend_in) / fw, bottom=0.12, top=0.92)
    ax = fig.add_subplot(1, 1, 1)
    if lab is not None:
        ax.scatter(xy[:, 0], xy[:, 1], c=[colours[int(c)] for c in lab], s=4, linewidths=0)
        class_legend(fig, colours)
        if len(colours) <= MAX_LEGEND_CLASSES:  # each class also named at its median point: where it sits
            for c in colours:
                mx, my = np.median(xy[lab == c], axis=0)
                ax.text(mx, my, str(c), fontsize=9, weight="bold", ha="center", va="center",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color="0.4", linewidths=0)
    ax.set_xlabel(axes[0], fontsize=8)
    ax.set_ylabel(axes[1], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(f"{title or 'latent map'} ({method})", fontsize=10)
    return save_figure(fig, path, dpi=_DPI)


def variant_plots(
    model_dir: str | os.PathLike[str],
    x_raw: np.ndarray,
    feature_path: str | os.PathLike[str] | None,
    out_dir: str | os.PathLike[str],
) -> list[Path]:
    """Every figure for one trained variant, written to `out_dir`; returns the PNG paths made."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    loaded = load_model(model_dir)
    made: list[Path | None] = []
    history_path = model_dir / HISTORY
    if history_path.is_file():
        made.append(
            plot_loss_curves(read_json(history_path), out_dir / "loss_curves.png", title=loaded.variant)
        )
    if len(x_raw):
        made.append(plot_reconstructions(loaded, x_raw, out_dir / "reconstructions.png"))
    made.append(plot_prior_samples(loaded, out_dir / "prior_samples.png"))
    if feature_path is not None and Path(feature_path).is_file():
        ff = read_features(feature_path)
        labels = ff.frame["label"].to_numpy(dtype=float, na_value=-1).astype(np.int64)
        made.append(
            plot_latent_map(ff.z, labels, out_dir / "latent_map.png", title=f"{loaded.variant}: latent map")
        )
    return [p for p in made if p is not None]


def feature_file_plots(ff: FeatureFile, out_dir: str | os.PathLike[str], *, n_rows: int = 8) -> list[Path]:
    """`variant_plots` for a learned feature file: its model folder and raw test rows found from its metadata."""
    mdir = model_dir(ff)
    if mdir is None or not mdir.is_dir():
        return []
    ds, pos = dataset_of(ff)
    test = pos[split_mask(ff, "test")]
    rows = (test if len(test) else pos)[:n_rows]
    return variant_plots(mdir, ds.x[rows], ff.path, out_dir)
