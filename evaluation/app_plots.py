"""Run-level pictures of the application tasks, drawn from the picture arrays the tasks saved and the
result rows: reconstructions, prior samples, interpolations, inpainting, traversals, augmentation
examples, the rate-distortion plane, per-dimension KL, anomaly ROC curves, DCI importance matrices.

Picture keys are `<representation>/<name>`; every function returns None when there is nothing to draw.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from ae_repr.variants import registry

from .generation import traversals
from .plots import save_figure
from .report import representation_order
from .variant_plots import GridPanel, as_images, image_grid, image_panels, numbered, value_range

Pictures = dict[str, np.ndarray]
_DPI = 80


def by_name(pictures: Pictures, what: str) -> dict[str, np.ndarray]:
    """{representation: array} of one picture kind, in report order."""
    found = {k.rsplit("/", 1)[0]: v for k, v in pictures.items() if k.rsplit("/", 1)[-1] == what}
    return {n: found[n] for n in representation_order(list(found))}


def _rows(named: dict[str, np.ndarray], n: int | None = None) -> list[tuple[str, np.ndarray]]:
    return [(name, as_images(imgs[:n])) for name, imgs in named.items() if len(imgs)]


def _finish(fig: Figure, ax: Axes, path: Path, xlabel: str, ylabel: str, heading: str, **legend: Any) -> Path:
    """Label a one-panel figure, add its legend (`legend`: Axes.legend options) and save it."""
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(frameon=False, **legend)
    ax.set_title(heading, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, dpi=_DPI)


def plot_reconstructions(pictures: Pictures, path: Path) -> Path | None:
    """Test inputs (top) and every variant's reconstruction of them."""
    recon = _rows(by_name(pictures, "reconstructions"))
    if not recon or "inputs/originals" not in pictures:
        return None
    originals = as_images(pictures["inputs/originals"])
    return image_grid(
        [("input", originals), *recon], path, "reconstructions", columns=numbered(len(originals)),
        xlabel="test example", limits=value_range(originals),  # overshoots must not grey the inputs
    )


def plot_samples(pictures: Pictures, path: Path) -> Path | None:
    """Samples from each variant's prior (fitted priors for ae, dae and vq_vae)."""
    rows = _rows(by_name(pictures, "samples"), 12)
    if not rows:
        return None
    return image_grid(
        rows, path, "samples from the prior", columns=numbered(max(len(imgs) for _, imgs in rows)),
        xlabel="decoded draw from the model's prior; without one, from a Gaussian (vq: code frequencies) fitted to the "
        "train codes",
    )


def plot_interpolations(pictures: Pictures, path: Path) -> Path | None:
    """Decoded interpolations between two test pairs per variant (spherical for Gaussian latents)."""
    rows = []
    for name, grid in by_name(pictures, "interpolations").items():  # (pairs, steps, *shape)
        rows += [(f"{name} pair {i + 1}", as_images(pair)) for i, pair in enumerate(grid[:2])]
    if not rows:
        return None
    steps = max(len(imgs) for _, imgs in rows)
    t = np.linspace(0.0, 1.0, steps)
    columns = ["start (t=0)", *(f"t={v:.2f}" for v in t[1:-1]), "end (t=1)"] if steps > 1 else ["t=0"]
    return image_grid(
        rows, path, "interpolations between test pairs", columns=columns,
        xlabel="z(t) from the start's code to the end's (spherical for Gaussian priors), decoded; "
        "the ends are reconstructions",
    )


def plot_inpainting(pictures: Pictures, path: Path) -> Path | None:
    """One grid per mask kind: rows are test examples; columns the original, the observed part and every fill."""
    original = pictures.get("inputs/inpaint_original")
    if original is None:
        return None
    n = min(len(original), 6)
    kinds = sorted(k.removeprefix("inputs/inpaint_mask_") for k in pictures if k.startswith("inputs/inpaint_mask_"))
    panels = []
    for kind in kinds:
        fills = by_name(pictures, f"inpaint_fill_{kind}")
        if not fills:
            continue
        observed = np.where(pictures[f"inputs/inpaint_mask_{kind}"][:n] > 0, original[:n], np.nan)
        stack = [as_images(original[:n]), as_images(observed), *(as_images(f[:n]) for f in fills.values())]
        cells = np.stack(stack, axis=1)  # (examples, columns, H, W[, 3]): one row per example
        panels.append(
            GridPanel(
                [(f"example {i + 1}", row) for i, row in enumerate(cells)],
                ["original", "masked", *fills],
                heading=f"{kind} mask (hidden pixels orange)",
            )
        )
    if not panels:
        return None
    # the data's range: one fill's outlier pixel must not grey every other picture
    return image_panels(panels, path, "inpainting: each method fills the hidden pixels", limits=value_range(original))


def traversal_offsets(steps: int) -> np.ndarray:
    """The offsets (in units of the dimension's scale) that generation's traversals place their `steps` columns at."""
    # the pictures keep no values: read them off the function that drew them, so the labels cannot drift
    span = inspect.signature(traversals).parameters["span"].default
    return np.linspace(-span, span, steps)


def plot_traversals(pictures: Pictures, out_dir: Path) -> list[Path]:
    """One grid per variant: each row moves one latent dimension across its range, the rest fixed."""
    made = []
    dims = by_name(pictures, "traversal_dims")
    for name, grid in by_name(pictures, "traversals").items():  # (dims, steps, *shape)
        if not len(grid):
            continue
        labels = dims.get(name, np.arange(len(grid)))
        rows = [(f"z_{int(d):03d}", as_images(g)) for d, g in zip(labels, grid, strict=False)]
        made.append(
            image_grid(
                rows, out_dir / f"traversals_{name}.png", f"{name}: latent traversals",
                columns=[f"{o:+.2f}".rstrip("0").rstrip(".") for o in traversal_offsets(grid.shape[1])],
                xlabel="z_d = centre + offset x scale: prior N(0, 1) for Gaussian-prior models (z_d = offset), "
                "else train mean and std of z_d",
            )
        )
    return made


def plot_augmentation(pictures: Pictures, path: Path) -> Path | None:
    """Per variant: a labelled example followed by the neighbours decoded from perturbed latents."""
    rows = []
    for name, grid in by_name(pictures, "augment_examples").items():  # (shots, 1 + neighbours, *shape)
        rows += [(f"{name} #{i + 1}", as_images(g)) for i, g in enumerate(grid[:2])]
    if not rows:
        return None
    neighbours = max(len(imgs) for _, imgs in rows) - 1
    return image_grid(
        rows, path, "augmentation: example, then generated neighbours",
        columns=["example", *(f"n{i + 1}" for i in range(neighbours))],
        xlabel="n1.. decoded from the example's code plus Gaussian noise (scaled by the train codes' std)",
    )


SWEEP_VARIANT = "beta_vae"  # the beta sweep's models are this variant at other betas (`<variant>@beta=<b>`)


def rate_distortion_points(
    results: pd.DataFrame, betas: Mapping[str, float] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The rate-distortion plane: (the sweep's model family, one curve: `beta`, `rate`, `distortion` sorted by beta;
    every other model, a marker each). `betas`: {representation: beta} of the trained variants (a sweep member's
    beta is in its name); a family member of unknown beta is drawn as a marker of its own."""
    rd = results[results["task"] == "rate_distortion"].pivot_table(
        index="representation", columns="metric", values="value", aggfunc="first"
    )
    if rd.empty or not {"rate", "distortion"} <= set(rd.columns):
        return pd.DataFrame(columns=["beta", "rate", "distortion"]), pd.DataFrame(columns=["rate", "distortion"])
    rd = rd[["rate", "distortion"]].dropna()
    beta = pd.Series([_beta_of(str(n), betas or {}) for n in rd.index], index=rd.index, dtype=float)
    family = np.array([_in_sweep_family(str(n)) for n in rd.index], dtype=bool) & beta.notna().to_numpy()
    curve = rd[family].assign(beta=beta[family])[["beta", "rate", "distortion"]].sort_values(["beta", "rate"])
    return curve, rd[~family]


def _beta_of(name: str, betas: Mapping[str, float]) -> float:
    swept = name.partition("@beta=")[2]
    return float(swept) if swept else float(betas.get(name, np.nan))


def _in_sweep_family(name: str) -> bool:
    """Whether `name`'s variant is the sweep's model class: vae and beta_vae differ by beta alone (config, not code)."""
    entries = registry()
    variant = name.split("@", 1)[0]
    return variant in entries and entries[variant].target == entries[SWEEP_VARIANT].target


def plot_rate_distortion(results: pd.DataFrame, path: Path, betas: Mapping[str, float] | None = None) -> Path | None:
    """Rate (KL) against distortion (reconstruction NLL), both nats per example: the VAE family (vae, beta_vae and
    the beta sweep) as one curve ordered by beta, each point labelled with its beta; other models as markers."""
    curve, others = rate_distortion_points(results, betas)
    if curve.empty and others.empty:
        return None
    fig = Figure(figsize=(6.2, 3.8))
    ax = fig.add_subplot(1, 1, 1)
    if len(curve):
        swept = curve.index.str.contains("@beta=")
        variants = [v for v in registry() if any(str(n).split("@", 1)[0] == v for n in curve.index)]
        ax.plot(curve["rate"], curve["distortion"], "-", color="C0", lw=1.2, zorder=1,
                label=f"{' / '.join(variants)} at each β")
        if not swept.all():
            ax.plot(curve.loc[~swept, "rate"], curve.loc[~swept, "distortion"], "o", color="C0", ms=6, zorder=2,
                    label="the run's variants")
        if swept.any():  # trained within eval.rd_budget of the steps: marked apart, as the report's note says
            ax.plot(curve.loc[swept, "rate"], curve.loc[swept, "distortion"], "o", mfc="white", mec="C0", ms=5,
                    zorder=2, label="β sweep (eval.rd_budget of the steps)")
        for name, r in curve.iterrows():  # below left of the falling curve: other models, no better than it, sit above
            text = f"β={r['beta']:g}" + ("" if "@beta=" in str(name) else f" {name}")
            ax.annotate(text, (r["rate"], r["distortion"]), fontsize=6, color="0.25", xytext=(-4, -4),
                        textcoords="offset points", ha="right", va="top")
    for i, (name, r) in enumerate(others.iterrows()):
        ax.plot(r["rate"], r["distortion"], "sD^vP*"[i % 6], color=f"C{i % 9 + 1}", ms=6, label=name)
    ax.margins(0.1)  # room for the labels left of the points
    # zero rate (the posterior collapsed onto the prior) is the end the curve heads to: always in view
    ax.set_xlim(left=min(ax.get_xlim()[0], 0.0))
    return _finish(fig, ax, path, "rate: KL(q(z|x) || p(z)) [nats per example]",
                   "distortion: -log p(x|z) [nats per example]", "rate-distortion (test split)", fontsize=7,
                   loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # outside: covers no point


def plot_kl_per_dim(pictures: Pictures, path: Path) -> Path | None:
    """Mean KL per latent dimension (sorted), one panel per VAE-family model: how many units carry information."""
    kls = by_name(pictures, "kl_per_dim")
    if not kls:
        return None
    fig = Figure(figsize=(3.2 * len(kls), 2.6))
    ax0 = None
    for i, (name, kl) in enumerate(kls.items()):
        ax = fig.add_subplot(1, len(kls), i + 1, sharey=ax0)  # one scale: the panels are compared
        ax0 = ax0 or ax
        order = np.argsort(-kl)
        ax.bar(np.arange(len(kl)), kl[order], color=f"C{i % 10}")
        ax.set_xticks(np.arange(len(kl)), [str(j) for j in order], fontsize=5)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("latent dimension (sorted)", fontsize=7)
        ax.tick_params(labelsize=6)
        if i == 0:
            ax.set_ylabel("mean KL [nats]", fontsize=8)
        else:
            ax.tick_params(labelleft=False)
    fig.tight_layout()
    return save_figure(fig, path, dpi=_DPI)


def plot_anomaly_roc(pictures: Pictures, path: Path) -> Path | None:
    """ROC curves of every anomaly score under the one-class protocol."""
    scores, truth = by_name(pictures, "anomaly_scores"), by_name(pictures, "anomaly_truth")
    names = [n for n in scores if n in truth and 0 < truth[n].sum() < len(truth[n])]
    if not names:
        return None
    fig = Figure(figsize=(4.6, 4.0))
    ax = fig.add_subplot(1, 1, 1)
    for i, name in enumerate(names):
        fpr, tpr, _ = roc_curve(truth[name], scores[name])
        auc = roc_auc_score(truth[name], scores[name])
        ax.plot(fpr, tpr, lw=1.2, color=f"C{i % 10}", label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], ":", color="0.6", lw=1)
    return _finish(fig, ax, path, "false positive rate", "true positive rate", "anomaly detection (held-out classes)",
                   fontsize=6, title="AUROC", title_fontsize=7, loc="lower right")


def plot_dci_importance(pictures: Pictures, path: Path) -> Path | None:
    """The DCI importance matrix (latent dimension x factor) of each representation."""
    mats = by_name(pictures, "dci_importance")
    if not mats:
        return None
    factor_names = [str(f) for f in pictures.get("inputs/factor_names", [])]
    cols = min(4, len(mats))
    rows = math.ceil(len(mats) / cols)
    fig = Figure(figsize=(2.6 * cols + 0.8, 3.2 * rows))
    top = max(float(np.max(m)) for m in mats.values()) or 1.0  # one colour scale: the panels are compared
    for i, (name, m) in enumerate(mats.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0.0, vmax=top)
        names = factor_names[: m.shape[1]] or [str(j) for j in range(m.shape[1])]
        ax.set_xticks(np.arange(m.shape[1]), names, fontsize=6, rotation=45)
        ax.set_ylabel("latent dimension", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.set_title(name, fontsize=9)
    fw = fig.get_figwidth()
    fig.tight_layout(rect=(0, 0, 1 - 0.8 / fw, 1))
    bar = fig.colorbar(image, cax=fig.add_axes((1 - 0.6 / fw, 0.15, 0.12 / fw, 0.7)))
    bar.set_label("importance", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return save_figure(fig, path, dpi=_DPI)


def application_plots(
    pictures: Pictures, results: pd.DataFrame, out_dir: str | os.PathLike[str],
    betas: Mapping[str, float] | None = None,
) -> list[Path]:
    """Every application figure there is data for, written to `out_dir`; stale ones are removed (`betas`: see
    `rate_distortion_points`)."""
    out_dir = Path(out_dir)
    single: list[tuple[str, Callable[[Path], Path | None]]] = [
        ("reconstructions.png", lambda p: plot_reconstructions(pictures, p)),
        ("prior_samples.png", lambda p: plot_samples(pictures, p)),
        ("interpolations.png", lambda p: plot_interpolations(pictures, p)),
        ("inpainting.png", lambda p: plot_inpainting(pictures, p)),
        ("augmentation.png", lambda p: plot_augmentation(pictures, p)),
        ("rate_distortion.png", lambda p: plot_rate_distortion(results, p, betas)),
        ("kl_per_dim.png", lambda p: plot_kl_per_dim(pictures, p)),
        ("anomaly_roc.png", lambda p: plot_anomaly_roc(pictures, p)),
        ("dci_importance.png", lambda p: plot_dci_importance(pictures, p)),
    ]
    made: list[Path] = []
    for name, draw in single:
        path = draw(out_dir / name)
        if path is None:
            (out_dir / name).unlink(missing_ok=True)
        else:
            made.append(path)
    for stale in out_dir.glob("traversals_*.png"):
        stale.unlink()
    return made + plot_traversals(pictures, out_dir)
