"""Seed grids in the results: each variant's mean over its pretraining seeds, with a 95% interval over the seeds.

The rows of one grid member are named `<variant>@seed=<s>` (`ae_repr.seeds`). For every variant with such rows,
`seed_aggregates` adds one row per (task, metric, k) under the plain variant name: `value` is the mean of the
seeds' values, `n_seeds` the number of seeds with a finite value, and `ci_low`/`ci_high` the Student-t interval
mean -/+ t(0.975, n-1) * sd / sqrt(n) over those values (`ci_method` `pretraining_seeds`; no interval from one
seed). The interval is over pretraining seeds only: it says how much the score moves with the seed (Locatello
et al. 2019 found the seed moves disentanglement scores as much as the model), not how precisely each seed's
own number is measured on the test rows.

The report, the verdict and `ae-repr compare` rank the aggregate rows; the per-seed rows stay in summary.parquet.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from ae_repr.seeds import split_seed_name

from .fewshot import t_interval
from .results import CI_PRETRAINING_SEEDS, concat_results, read_results, result_frame, result_row

_KEY = ["variant", "task", "metric", "k", "nth"]


def is_seed_row(name: str) -> bool:
    """A grid member's name (`<variant>@seed=<s>`), whose variant's aggregate row stands for it."""
    return split_seed_name(name)[1] is not None


def seed_aggregates(results: pd.DataFrame) -> pd.DataFrame:
    """One row per grid variant and (task, metric, k): the mean over its seeds, `n_seeds`, and the 95% Student-t
    interval over the seeds (`ci_method` `pretraining_seeds`)."""
    parsed = [split_seed_name(n) for n in results["representation"]]
    rows = results.assign(variant=[v for v, _ in parsed], seed=[s for _, s in parsed])
    rows = rows[rows["seed"].notna()]
    if rows.empty:
        return result_frame()
    # a task may write several rows with the same (task, metric, k) for one representation: pair them by position
    rows = rows.assign(nth=rows.groupby(["representation", "task", "metric", "k"], dropna=False).cumcount())
    out = []
    for (variant, task, metric, k, _), group in rows.groupby(_KEY, dropna=False, sort=False):
        values = group["value"].to_numpy(dtype=np.float64)
        values = values[np.isfinite(values)]
        if not len(values):
            continue
        mean, lo, hi = t_interval(values)
        interval = {"ci_low": lo, "ci_high": hi, "ci_method": CI_PRETRAINING_SEEDS} if len(values) > 1 else {}
        out.append(result_row(variant, task, metric, mean, k=None if pd.isna(k) else int(k), n_seeds=len(values),
                              **interval))
    return result_frame(out)


def with_seed_aggregates(results: pd.DataFrame) -> pd.DataFrame:
    """`results` plus the aggregate rows of its seed grids (unchanged when it has none)."""
    return concat_results([results, seed_aggregates(results)])


def without_seed_rows(results: pd.DataFrame) -> pd.DataFrame:
    """`results` without the per-seed rows (the aggregates stand for them)."""
    return results[[not is_seed_row(n) for n in results["representation"]]]


def first_seed_names(names: Iterable[str]) -> list[str]:
    """`names` with each grid variant's members cut down to its first (smallest) seed: whose pictures are shown."""
    names = list(names)
    first: dict[str, int] = {}
    for name in names:
        variant, seed = split_seed_name(name)
        if seed is not None:
            first[variant] = min(seed, first.get(variant, seed))
    return [n for n in names if (s := split_seed_name(n))[1] is None or first[s[0]] == s[1]]


def representative_member(summary: pd.DataFrame, variant: str) -> str:
    """The grid member standing for `variant` where one model must (the retrain's champion candidate): the seed
    whose linear-probe accuracy is nearest the variant's aggregate (mean over seeds), the smaller seed on a tie;
    the first seed without a probe; `variant` itself without a grid."""
    names = sorted({n for n in summary["representation"] if split_seed_name(n)[0] == variant and is_seed_row(n)},
                   key=lambda n: split_seed_name(n)[1])
    if not names:
        return variant
    probe = summary[(summary["task"] == "linear_probe") & (summary["metric"] == "accuracy")]
    acc = probe.drop_duplicates("representation").set_index("representation")["value"].astype(float)
    found = [n for n in names if n in acc.index and np.isfinite(acc[n])]
    if not found:
        return names[0]
    mean = acc[variant] if variant in acc.index else acc[found].mean()
    # min keeps the first (smaller seed) of equal distances; rounding: equal up to the mean's float error
    return min(found, key=lambda n: round(abs(acc[n] - mean), 12))


def representative_members(out: Path, variants: Iterable[str]) -> dict[str, str]:
    """`representative_member` of each variant from `out/summary.parquet` (each variant itself without one)."""
    path = Path(out) / "summary.parquet"
    summary = read_results(path)[0] if path.is_file() else None
    return {v: v if summary is None else representative_member(summary, v) for v in variants}
