"""Per-variant figures: loss curves, a reconstruction grid, prior samples (generative variants), a 2-D latent map.

Inputs are a model folder (`model.pt`, `config.json`, `history.json`), a few raw data rows and a feature
Parquet file; outputs are PNG paths. Figures are drawn on the Agg canvas without pyplot (thread-safe)
and written atomically.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure

from ae_repr.checkpoint import LoadedModel, load_model
from ae_repr.io import FeatureFile, read_features, read_json
from ae_repr.models import Prior

from .inputs import dataset_of, model_dir, split_mask
from .plots import save_figure

log = logging.getLogger(__name__)

HISTORY = "history.json"
_DPI = 80
_MAP_ROWS = 2000  # points in the latent map: enough to see structure, cheap to draw


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


def _mosaic(imgs: np.ndarray, pad: int = 1) -> np.ndarray:
    """Images side by side with `pad` columns of NaN (drawn white) between them, (H, n * (W + pad) - pad[, 3])."""
    n, h, w = imgs.shape[:3]
    out = np.full((h, n * (w + pad) - pad, *imgs.shape[3:]), np.nan, dtype=np.float32)
    for i, img in enumerate(imgs):
        out[:, i * (w + pad) : i * (w + pad) + w] = img
    return out


def image_grid(rows: list[tuple[str, np.ndarray]], path: str | os.PathLike[str], title: str) -> Path:
    """Images in labelled rows on one shared intensity range, drawn as one mosaic per row (cheap to render)."""
    lo = min(float(np.nanmin(imgs)) for _, imgs in rows)
    hi = max(float(np.nanmax(imgs)) for _, imgs in rows)
    flat = rows[0][1].shape[1] == 1  # tabular rows are 1 x D strips
    n = max(len(imgs) for _, imgs in rows)
    fig = Figure(figsize=(min(1.0 * n, 12.0), (0.5 if flat else 1.1) * len(rows) + 0.5))
    for r, (label, imgs) in enumerate(rows):
        ax = fig.add_subplot(len(rows), 1, r + 1)
        tile = imgs[:, 0].astype(np.float32) if flat else _mosaic(imgs.astype(np.float32))  # flat: (n, D)
        if tile.ndim == 3:  # RGB
            ax.imshow(np.clip((np.nan_to_num(tile, nan=hi) - lo) / (hi - lo or 1.0), 0, 1))
        else:
            cmap = matplotlib.colormaps["gray"].with_extremes(bad="white")
            ax.imshow(
                tile, cmap=cmap, vmin=lo, vmax=hi, aspect="auto" if flat else "equal", interpolation="nearest"
            )
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    return save_figure(fig, path, dpi=_DPI)


@torch.inference_mode()
def plot_reconstructions(
    loaded: LoadedModel, x_raw: np.ndarray, path: str | os.PathLike[str], *, n: int = 8
) -> Path:
    """Originals (top) and their reconstructions (bottom), in normalized data space."""
    x = loaded.normalizer.numpy(np.asarray(x_raw[:n]))
    xt = torch.from_numpy(x).reshape(-1, *loaded.model.input_shape)  # (B, *input_shape)
    recon = loaded.model.reconstruct(xt).float().numpy().reshape(x.shape)
    return image_grid(
        [("input", as_images(x)), ("recon", as_images(recon))], path, f"{loaded.variant}: reconstructions"
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
    rows = [("samples", imgs[i : i + per_row]) for i in range(0, len(imgs), per_row)]
    return image_grid(rows, path, f"{loaded.variant}: samples from the prior")


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
        xy, axes = np.column_stack([z[:, 0], np.zeros(len(z))]), ("z_000", "")
    elif z.shape[1] == 2:
        xy, axes = z, ("z_000", "z_001")
    else:
        zc = z - z.mean(axis=0)
        _, s, vt = np.linalg.svd(zc, full_matrices=False)  # principal axes: cheap and deterministic
        xy = zc @ vt[:2].T
        share = s[:2] ** 2 / max(float((s**2).sum()), 1e-12)
        axes = (f"PC1 ({share[0]:.0%})", f"PC2 ({share[1]:.0%})")
    fig = Figure(figsize=(4.0, 3.8))
    fig.subplots_adjust(left=0.19, right=0.97, bottom=0.12, top=0.92)  # fixed margins: tight_layout costs more
    ax = fig.add_subplot(1, 1, 1)
    lab = None if labels is None else np.asarray(labels)[rows]
    if lab is not None and not np.any(lab < 0):
        classes = np.unique(lab)
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        ax.scatter(xy[:, 0], xy[:, 1], c=lab, s=4, cmap=cmap, linewidths=0)
        if len(classes) <= 20:  # each class named at its median point: cheaper and clearer than a colorbar
            for c in classes:
                mx, my = np.median(xy[lab == c], axis=0)
                ax.text(mx, my, str(c), fontsize=9, weight="bold", ha="center", va="center",
                        bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7})
    else:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color="0.4", linewidths=0)
    ax.set_xlabel(axes[0], fontsize=8)
    ax.set_ylabel(axes[1], fontsize=8)
    ax.tick_params(labelsize=7)
    ax.set_title(title or "latent map", fontsize=10)
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
