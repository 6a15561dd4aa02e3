"""Small PNG figures: 2-D maps of each representation coloured by label, and few-shot accuracy vs k.

Maps embed at most `map_max_rows` test rows (the same rows for every representation, see
`inputs.subsample`) with t-SNE (`sklearn.manifold.TSNE`, PCA init, `map_iters` iterations, seeded), or UMAP when
`map_method="umap"` and the `umap` package is installed (else t-SNE, with a warning).
Figures are drawn on the Agg canvas without pyplot (thread-safe) and written atomically.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.lines import Line2D

from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile, atomic_path

from .inputs import single_thread, subsample

log = logging.getLogger(__name__)

FEWSHOT_ARMS = ("fewshot_frozen", "fewshot_finetune", "fewshot_scratch")
METHOD_NAMES = {"tsne": "t-SNE", "umap": "UMAP"}
MAX_LEGEND_CLASSES = 20  # above this a legend is a wall of text; colours cycle and the legend is left out
_DPI = 100


def embed_2d(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame | None:
    """2-D coordinates (`sample_id`, `label`, `x`, `y`, and the `method` used) of a bounded test subsample, or None
    when disabled."""
    if cfg.map_method == "none":
        return None
    rows = subsample(ff, "test", cfg.map_max_rows, seed)
    if len(rows) < 5:
        log.warning("%s: too few test rows (%d) for a 2-D map", ff.name, len(rows))
        return None
    z = ff.z[rows]
    method = cfg.map_method
    if method == "umap" and importlib.util.find_spec("umap") is None:
        log.warning("map_method 'umap' but the umap package is not installed; using t-SNE")
        method = "tsne"
    with single_thread():
        if method == "umap":
            import umap

            xy = umap.UMAP(n_components=2, random_state=seed).fit_transform(z)
        else:
            from sklearn.manifold import TSNE

            perplexity = min(30.0, (len(rows) - 1) / 3)
            xy = TSNE(
                n_components=2, init="pca", perplexity=perplexity, max_iter=cfg.map_iters, random_state=seed
            ).fit_transform(z)
    return pd.DataFrame(
        {
            "sample_id": ff.frame["sample_id"].to_numpy()[rows],
            "label": ff.frame["label"].iloc[rows].astype("Int64").reset_index(drop=True),
            "x": xy[:, 0].astype(np.float32),
            "y": xy[:, 1].astype(np.float32),
            # the method actually used (umap falls back to tsne), for the figure to name
            "method": method,
        }
    )


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = _DPI) -> Path:
    """Render a Figure on the Agg canvas (no pyplot: thread-safe) and write the PNG atomically."""
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def class_colours(classes: list[int]) -> dict[int, tuple[float, float, float, float]]:
    """One fixed colour per class (tab10 up to 10 classes, else tab20, cycling), the same in every panel."""
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(classes)}


def class_legend(fig: Figure, colours: dict[int, tuple[float, float, float, float]]) -> Legend | None:
    """A figure legend with one marker per class, right of the panels; None for too many classes."""
    if not colours or len(colours) > MAX_LEGEND_CLASSES:
        return None
    handles = [Line2D([], [], ls="", marker="o", ms=5, color=col, label=str(c)) for c, col in colours.items()]
    return fig.legend(
        handles=handles, title="label", loc="center right", fontsize=7, title_fontsize=8, frameon=False
    )


def map_method(maps: dict[str, pd.DataFrame]) -> str:
    """The embedding method(s) the maps were made with, as readers know them."""
    found = sorted({str(m) for frame in maps.values() if "method" in frame for m in frame["method"].unique()})
    return ", ".join(METHOD_NAMES.get(m, m) for m in found) or "method not recorded"


def plot_latent_maps(maps: dict[str, pd.DataFrame], path: str | os.PathLike[str]) -> Path | None:
    """One grid figure of 2-D maps, one panel per representation, coloured by label with one class legend."""
    if not maps:
        return None
    n = len(maps)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    labels = {name: pd.to_numeric(m["label"], errors="coerce") for name, m in maps.items()}
    labelled = all(lab.notna().all() for lab in labels.values())
    classes = sorted({int(c) for lab in labels.values() for c in lab.unique()}) if labelled else []
    colours = class_colours(classes)
    legend_in = 0.9 if 0 < len(colours) <= MAX_LEGEND_CLASSES else 0.0
    fig = Figure(figsize=(2.6 * cols + legend_in, 2.6 * rows + 0.4))
    for i, (name, m) in enumerate(sorted(maps.items())):
        ax = fig.add_subplot(rows, cols, i + 1)
        if labelled:
            ax.scatter(m["x"], m["y"], c=[colours[int(c)] for c in labels[name]], s=3, linewidths=0)
        else:
            ax.scatter(m["x"], m["y"], s=3, color="0.4", linewidths=0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])  # embedding coordinates have no units worth reading
        ax.set_yticks([])
    method = map_method(maps)
    fig.suptitle(f"test codes embedded in 2-D ({method}), coloured by label", fontsize=10)
    class_legend(fig, colours)
    fig.tight_layout(rect=(0, 0, 1 - legend_in / fig.get_figwidth(), 1 - 0.15 / fig.get_figheight()))
    return save_figure(fig, path, dpi=80)  # many panels: keep the file small


def plot_fewshot(results: pd.DataFrame, path: str | os.PathLike[str]) -> Path | None:
    """Few-shot test accuracy vs k with 95% confidence bands, one panel per arm, one line per representation."""
    fs = results[
        results["task"].isin(FEWSHOT_ARMS) & (results["metric"] == "accuracy") & results["k"].notna()
    ]
    if fs.empty:
        return None
    arms = [a for a in FEWSHOT_ARMS if (fs["task"] == a).any()]
    names = sorted(fs["representation"].unique())
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig = Figure(figsize=(3.4 * len(arms) + 1.4, 3.0))
    ax0 = None
    for i, arm in enumerate(arms):
        ax = fig.add_subplot(1, len(arms), i + 1, sharey=ax0)
        ax0 = ax0 or ax
        for name in names:
            d = fs[(fs["task"] == arm) & (fs["representation"] == name)].sort_values("k")
            if d.empty:
                continue
            k = d["k"].to_numpy(dtype=float)
            ax.plot(k, d["value"], marker="o", ms=3, lw=1.2, color=colors[name], label=name)
            lo, hi = (
                d["ci_low"].to_numpy(dtype=float, na_value=np.nan),
                d["ci_high"].to_numpy(dtype=float, na_value=np.nan),
            )
            ax.fill_between(k, lo, hi, color=colors[name], alpha=0.15, linewidth=0)
        ax.set_xscale("log")
        ks = sorted(fs["k"].dropna().astype(int).unique())
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_title(arm.removeprefix("fewshot_"), fontsize=9)
        ax.set_xlabel("labelled examples per class (k)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.set_ylabel("test accuracy", fontsize=8)
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0, 1 - 1.3 / fig.get_figwidth(), 1))
    return save_figure(fig, path)
