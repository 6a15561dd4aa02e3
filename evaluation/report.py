"""`report.md`: one table of representations x headline metrics (best per column in bold), plots, notes, failures."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ae_repr.config import EvalConfig
from ae_repr.io import atomic_path

from .inputs import BASELINE_NAMES
from .probe import knn_metric


@dataclass(frozen=True)
class Column:
    """One headline column: where its number lives in the summary and which direction is better."""

    title: str
    task: str
    metric: str
    k: int | None = None
    higher_is_better: bool = True
    fmt: str = ".3f"
    not_ranked: tuple[str, ...] = ()  # rows shown but not competing for the bold best
    descriptive: bool = False  # no better direction (rate, distortion): nothing is marked best


def headline_columns(cfg: EvalConfig) -> list[Column]:
    """The report's columns for this config."""
    cols = [
        Column("linear probe acc", "linear_probe", "accuracy"),
        Column("linear probe macro-F1", "linear_probe", "macro_f1"),
    ]
    if cfg.knn_k:
        cols.append(Column(f"kNN acc ({cfg.knn_k[0]}-NN)", "knn", knn_metric(cfg.knn_k[0])))
    if cfg.fewshot_k:
        k = 5 if 5 in cfg.fewshot_k else cfg.fewshot_k[0]
        cols += [
            Column(f"few-shot k={k} frozen", "fewshot_frozen", "accuracy", k),
            Column(f"few-shot k={k} finetune", "fewshot_finetune", "accuracy", k),
        ]
    cols += [
        Column("trustworthiness", "reduction", "trustworthiness", not_ranked=("raw",)),  # 1 by definition
        Column("recon MSE", "reduction", "recon_mse", higher_is_better=False, fmt=".4g"),
    ]
    return cols


def application_columns(cfg: EvalConfig) -> list[Column]:
    """The application table's columns (those without any value are dropped when the table is drawn)."""
    return [
        Column("anomaly AUROC", "anomaly", "auroc"),
        Column("anomaly AUPRC", "anomaly", "auprc"),
        Column("inpainting MSE", "inpainting", "mse_masked", higher_is_better=False, fmt=".4g"),
        Column("NLL (IS) nats", "generation", "nll_is", higher_is_better=False, fmt=".2f"),
        Column("sample classifier score", "generation", "classifier_score", fmt=".2f", not_ranked=("real_data",)),
        Column(f"augmentation Δacc k={cfg.augment_k}", "augmentation", "accuracy_delta", cfg.augment_k),
        Column("rate nats", "rate_distortion", "rate", fmt=".2f", descriptive=True),
        Column("distortion nats", "rate_distortion", "distortion", fmt=".2f", descriptive=True),
        Column("active units", "rate_distortion", "active_units", fmt=".0f", descriptive=True),
        Column("MIG", "disentanglement", "mig"),
        Column("DCI disent.", "disentanglement", "dci_disentanglement"),
        Column("DCI compl.", "disentanglement", "dci_completeness"),
        Column("DCI inform.", "disentanglement", "dci_informativeness"),
        Column("SAP", "disentanglement", "sap"),
    ]


# model-free references of the application tasks, listed after the feature baselines
REFERENCE_NAMES = ("isolation_forest", "mean_image", "real_data")


def representation_order(names: Sequence[str]) -> list[str]:
    """Learned representations alphabetically, then the baselines and references in their canonical order."""
    fixed = (*BASELINE_NAMES, *REFERENCE_NAMES)
    learned = sorted(n for n in names if n not in fixed)
    return learned + [b for b in fixed if b in names]


def headline_table(results: pd.DataFrame, cfg: EvalConfig, cols: Sequence[Column] | None = None) -> pd.DataFrame:
    """Representations x columns (the headline ones by default) of values; rows without any value dropped."""
    names = representation_order(list(results["representation"].unique()))
    table = pd.DataFrame(index=pd.Index(names, name="representation"))
    for col in headline_columns(cfg) if cols is None else cols:
        sel = (results["task"] == col.task) & (results["metric"] == col.metric)
        sel &= results["k"].isna() if col.k is None else (results["k"] == col.k).fillna(False)
        table[col.title] = results[sel].set_index("representation")["value"].astype(float).reindex(names)
    return table.dropna(how="all")


def _md(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def write_report(
    path: str | os.PathLike[str],
    results: pd.DataFrame,
    cfg: EvalConfig,
    *,
    plots: Sequence[Path] = (),
    notes: Sequence[str] = (),
    failures: Mapping[str, str] | None = None,
) -> Path:
    """Write the markdown report atomically; plot links are relative to the report's folder."""
    path = Path(path)
    cols = headline_columns(cfg)
    table = headline_table(results, cfg)
    lines = ["# Evaluation report", ""]
    if len(table):
        n_base = sum(n in BASELINE_NAMES for n in table.index)
        lines += [
            f"{len(table)} representations ({len(table) - n_base} learned, {n_base} baselines), "
            "all scores on the test split. Best per column in **bold** (lowest for recon MSE). "
            f"Few-shot: mean over {cfg.fewshot_seeds} seeds, +/- the 95% Student-t half-width. "
            "kNN: cosine distance. Trustworthiness is measured against the raw input, so `raw` scores 1 "
            "by definition and is not ranked. Full results: `summary.parquet`.",
            "",
            *_table_lines(table, cols, results),
        ]
    else:
        lines += ["No results.", ""]
    app_cols = application_columns(cfg)
    app_table = headline_table(results, cfg, app_cols).dropna(axis=1, how="all")
    if len(app_table):
        app_cols = [c for c in app_cols if c.title in app_table.columns]
        lines += [
            "## Applications",
            "",
            "Anomaly detection: one-class protocol (models and baselines fitted on the normal classes' train "
            "rows; the held-out classes' test rows are the anomalies). Inpainting: mean squared error on the "
            "hidden pixels only. NLL: importance-sampled, nats per example in normalized data space. "
            "Sample classifier score: exp(E KL(p(y|x) || p(y))) of a logistic classifier trained on real "
            "data, applied to prior samples (`real_data`: the test images themselves). Augmentation: "
            f"test-accuracy change of a k={cfg.augment_k} few-shot pixel classifier when generated neighbours "
            f"are added, mean over {cfg.fewshot_seeds} seeds ± 95% half-width. Rate and distortion: the "
            "ELBO's KL and reconstruction terms on the test split. Notes below record each estimator's settings.",
            "",
            *_table_lines(app_table, app_cols, results),
        ]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({os.path.relpath(p, path.parent)})" for p in plots]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in notes] + [""]
    if failures:
        lines += ["## Failed representations", ""]
        lines += [f"- **{_md(name)}**: {_md(why)}" for name, why in sorted(failures.items())] + [""]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


def _table_lines(table: pd.DataFrame, cols: Sequence[Column], results: pd.DataFrame) -> list[str]:
    """A markdown table of `table`'s rows and `cols`, the best per ranked column in bold, CIs as ±."""
    lines = ["| representation | " + " | ".join(c.title for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    half = _half_widths(results, cols)
    for name in table.index:
        cells = []
        for c in cols:
            v = table.at[name, c.title]
            if pd.isna(v):
                cells.append("–")
                continue
            ranked = table[c.title].drop(index=[n for n in c.not_ranked if n in table.index])
            best = ranked.max() if c.higher_is_better else ranked.min()
            text = format(v, c.fmt)
            h = half.get((name, c.title))
            if h is not None and not math.isnan(h):
                text += f" ± {h:.3f}"
            is_best = not c.descriptive and name not in c.not_ranked and math.isclose(v, best, rel_tol=0, abs_tol=1e-12)
            cells.append(f"**{text}**" if is_best else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _half_widths(results: pd.DataFrame, cols: Sequence[Column]) -> dict[tuple[str, str], float]:
    out = {}
    for c in cols:
        if c.k is None:
            continue
        sel = (
            (results["task"] == c.task)
            & (results["metric"] == c.metric)
            & (results["k"] == c.k).fillna(False)
        )
        for _, r in results[sel].iterrows():
            if pd.notna(r["ci_high"]):
                out[(r["representation"], c.title)] = float(r["ci_high"]) - float(r["value"])
    return out
