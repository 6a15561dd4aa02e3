"""`report.md`: the verdict, one table of representations x headline metrics with their intervals, plots, notes,
failures. A column's winner is bold only where its interval separates from every other (`evaluation.verdict`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ae_repr.config import EvalConfig
from ae_repr.io import atomic_path

from .inputs import BASELINE_NAMES
from .probe import CHANCE_NAME, knn_metric
from .results import CI_PRETRAINING_SEEDS
from .seeds import is_seed_row
from .verdict import Standing, at_chance, chance_accuracy, column_bounds, interval_text, standing


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
    vs_chance: bool = False  # an accuracy: compared with the majority-class rate


def headline_columns(cfg: EvalConfig) -> list[Column]:
    """The report's columns for this config."""
    cols = [
        Column("linear probe acc", "linear_probe", "accuracy", vs_chance=True),
        Column("linear probe macro-F1", "linear_probe", "macro_f1"),
    ]
    if cfg.knn_k:
        cols.append(Column(f"kNN acc ({cfg.knn_k[0]}-NN)", "knn", knn_metric(cfg.knn_k[0]), vs_chance=True))
    if cfg.fewshot_k:
        k = 5 if 5 in cfg.fewshot_k else cfg.fewshot_k[0]
        cols += [
            Column(f"few-shot k={k} frozen", "fewshot_frozen", "accuracy", k, vs_chance=True),
            Column(f"few-shot k={k} finetune", "fewshot_finetune", "accuracy", k, vs_chance=True),
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
        Column("dead codes", "generation", "dead_code_fraction", fmt=".2f", descriptive=True),
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


def training_columns() -> list[Column]:
    """The training table's columns: what each model's training took and the kept weights' validation terms."""
    return [
        Column("steps", "training", "steps", fmt=".0f", descriptive=True),
        Column("epochs", "training", "epochs", fmt=".0f", descriptive=True),
        Column("stopped on plateau", "training", "plateau", fmt=".0f", descriptive=True),
        Column("val ELBO nats", "training", "val_elbo", fmt=".2f", descriptive=True),
        Column("val recon NLL nats", "training", "val_recon", fmt=".2f", descriptive=True),
    ]


# model-free references (chance, and those of the application tasks), listed after the feature baselines
REFERENCE_NAMES = (CHANCE_NAME, "isolation_forest", "mean_image", "real_data", "factorized")


def representation_order(names: Sequence[str]) -> list[str]:
    """Learned representations alphabetically, then the baselines and references in their canonical order."""
    fixed = (*BASELINE_NAMES, *REFERENCE_NAMES)
    learned = sorted(n for n in names if n not in fixed)
    return learned + [b for b in fixed if b in names]


def headline_table(results: pd.DataFrame, cfg: EvalConfig, cols: Sequence[Column] | None = None) -> pd.DataFrame:
    """Representations x columns (the headline ones by default) of values; rows without any value dropped."""
    # a seed grid's variants by their aggregate rows (mean over the seeds); the per-seed rows are left to the summary
    names = representation_order([n for n in results["representation"].unique() if not is_seed_row(n)])
    table = pd.DataFrame(index=pd.Index(names, name="representation"))
    for col in headline_columns(cfg) if cols is None else cols:
        table[col.title] = column_bounds(results, col.task, col.metric, col.k)["value"].reindex(names)
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
    verdict: str | None = None,
) -> Path:
    """Write the markdown report atomically; plot links are relative to the report's folder."""
    path = Path(path)
    cols = headline_columns(cfg)
    table = headline_table(results, cfg)
    lines = ["# Evaluation report", ""]
    if verdict:
        lines += [f"**Verdict.** {_md(verdict)}", ""]
    chance = chance_accuracy(results)
    if len(table):
        n_base = sum(n in BASELINE_NAMES for n in table.index)
        lines += [
            f"{len(table)} representations ({len(table) - n_base} learned, {n_base} baselines), "
            "all scores on the test split, each with its 95% interval: over test rows (percentile bootstrap, "
            f"{cfg.bootstrap_samples} resamples) for the probe, kNN and reduction columns, over "
            f"{cfg.fewshot_seeds} episodes (Student-t) for few-shot. A column's best is in **bold** only when its "
            "interval lies clear of every other ranked representation's (lowest is best for recon MSE); otherwise "
            "the *winner* row names those tied with it, and *at chance* when no accuracy interval lies above the "
            "majority-class rate. kNN: cosine distance. Trustworthiness is measured against the raw input, so "
            "`raw` scores 1 by definition and is not ranked. Full results (with `ci_method`): `summary.parquet`.",
            "",
            *_seed_grid_lines(results),
            *_table_lines(table, cols, results, chance),
        ]
        if chance is not None:
            row = column_bounds(results, "chance", "accuracy").iloc[0]
            lines += [
                "Chance: always predicting the train split's most frequent class scores "
                f"{interval_text(*row)} test accuracy.",
                "",
            ]
    else:
        lines += ["No results.", ""]
    lines += _section(
        "Applications",
        "Anomaly detection: one-class protocol (models and baselines fitted on the normal classes' train "
        "rows; the held-out classes' test rows are the anomalies). Inpainting: mean squared error on the "
        "hidden pixels only. NLL: importance-sampled, nats per example in the data's own units (a probability "
        "of the observed levels for discrete data); `factorized` is independent per-dimension histograms (or "
        "Gaussians) with no latent: a model above it is worse than no model. "
        "Sample classifier score: exp(E KL(p(y|x) || p(y))) of a logistic classifier trained on real "
        "data, applied to prior samples (`real_data`: the test images themselves). Augmentation: "
        f"test-accuracy change of a k={cfg.augment_k} few-shot pixel classifier when generated neighbours "
        f"are added, mean over {cfg.fewshot_seeds} seeds with its 95% interval. Rate and distortion: the "
        "ELBO's KL and reconstruction terms on the test split. Winners as above: a column whose numbers carry "
        "no interval marks none. Notes below record each estimator's settings.",
        application_columns(cfg), results, cfg, chance,
    )
    lines += _section(
        "Training",
        "Each variant trains until its validation objective (the ELBO for the VAE family, else the "
        "reconstruction NLL; unweighted by KL warm-up or free bits) stops improving, within a step budget; "
        "the weights of its best validation epoch are kept. Validation terms in nats per example of the "
        "normalized data.",
        training_columns(), results, cfg, chance,
    )
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


def _seed_grid_lines(results: pd.DataFrame) -> list[str]:
    """What a seed grid's rows show (nothing without one)."""
    seeds = results.loc[(results["ci_method"] == CI_PRETRAINING_SEEDS).fillna(False), "n_seeds"]
    if seeds.empty:
        return []
    n = int(seeds.max())
    return [
        f"Seed grid: each learned representation was pretrained with {n} seeds; its row is the **mean over the "
        f"{n} seeds** with a 95% Student-t interval **over pretraining seeds** (`ci_method` `pretraining_seeds`, "
        "the spread between models, not the test-row noise of each), in every table, and the winners are decided "
        "on those intervals. Each seed's own rows (`<variant>@seed=<s>`) are in `summary.parquet`; figures "
        "show the first seed's model.",
        "",
    ]


def _section(
    title: str, intro: str, cols: Sequence[Column], results: pd.DataFrame, cfg: EvalConfig, chance: float | None
) -> list[str]:
    """A titled table of `cols` (those without any value dropped); nothing when no column has a value."""
    table = headline_table(results, cfg, cols).dropna(axis=1, how="all")
    if not len(table):
        return []
    kept = [c for c in cols if c.title in table.columns]
    return [f"## {title}", "", intro, "", *_table_lines(table, kept, results, chance)]


def _table_lines(table: pd.DataFrame, cols: Sequence[Column], results: pd.DataFrame, chance: float | None) -> list[str]:
    """A markdown table of `table`'s rows and `cols` with intervals, each column's separated winner in bold,
    and a last row naming each column's winner, its ties, or chance level."""
    lines = ["| representation | " + " | ".join(c.title for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    bounds = {c.title: column_bounds(results, c.task, c.metric, c.k) for c in cols}
    ranked = {c.title: bounds[c.title].reindex([n for n in table.index if n not in c.not_ranked]) for c in cols}
    standings = {
        c.title: None if c.descriptive else standing(ranked[c.title], higher_is_better=c.higher_is_better)
        for c in cols
    }
    chance_cols = {c.title for c in cols if c.vs_chance and at_chance(ranked[c.title].dropna(subset=["value"]), chance)}
    for name in table.index:
        cells = []
        for c in cols:
            if name not in bounds[c.title].index or pd.isna(bounds[c.title].at[name, "value"]):
                cells.append("–")
                continue
            v, lo, hi = bounds[c.title].loc[name]
            text = format(v, c.fmt) if pd.isna(lo) or pd.isna(hi) else f"{v:{c.fmt}} [{lo:{c.fmt}}, {hi:{c.fmt}}]"
            st = standings[c.title]
            won = st is not None and st.winner == name and c.title not in chance_cols
            cells.append(f"**{text}**" if won else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    winners = [_winner_cell(standings[c.title], c.title in chance_cols) for c in cols]
    lines.append("| *winner* | " + " | ".join(winners) + " |")
    return [*lines, ""]


def _winner_cell(st: Standing | None, chance: bool) -> str:
    """One column's verdict: the separated winner, a tie (with whom), at chance, or why there is none."""
    if st is None or st.n_ranked < 2:
        return "–"
    if not st.complete:
        return "no interval"
    if chance:
        return "tie at chance"
    if st.winner is not None:
        return f"**{st.winner}**"
    return "tie: " + ", ".join((st.best, *st.tied))
