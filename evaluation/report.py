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


def representation_order(names: Sequence[str]) -> list[str]:
    """Learned representations alphabetically, then the baselines in their canonical order."""
    learned = sorted(n for n in names if n not in BASELINE_NAMES)
    return learned + [b for b in BASELINE_NAMES if b in names]


def headline_table(results: pd.DataFrame, cfg: EvalConfig) -> pd.DataFrame:
    """Representations x headline columns of values (NaN where absent)."""
    names = representation_order(list(results["representation"].unique()))
    table = pd.DataFrame(index=pd.Index(names, name="representation"))
    for col in headline_columns(cfg):
        sel = (results["task"] == col.task) & (results["metric"] == col.metric)
        sel &= results["k"].isna() if col.k is None else (results["k"] == col.k).fillna(False)
        table[col.title] = results[sel].set_index("representation")["value"].astype(float).reindex(names)
    return table


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
            "| representation | " + " | ".join(c.title for c in cols) + " |",
            "|---|" + "---:|" * len(cols),
        ]
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
                is_best = name not in c.not_ranked and math.isclose(v, best, rel_tol=0, abs_tol=1e-12)
                cells.append(f"**{text}**" if is_best else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    else:
        lines += ["No results.", ""]
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
