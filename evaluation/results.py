"""The tidy result table every task returns (DESIGN section 5): one row per number, fixed dtypes.

`ci_low`/`ci_high` bound a 95% interval; `ci_method` says what it is over and `n_seeds` counts those
repetitions: `test_bootstrap` (percentile bootstrap over test rows, `n_seeds` = resamples),
`fewshot_episodes` (Student-t over few-shot episodes), `pretraining_seeds` (Student-t over models
pretrained with different seeds). Empty when a row has no interval.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ae_repr.io import META_PREFIX, atomic_path

# Parquet types are pinned (string, not large_string); pandas dtypes are the nullable ones.
RESULT_SCHEMA = pa.schema(
    [
        ("representation", pa.string()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("k", pa.int64()),
        ("n_seeds", pa.int64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("ci_method", pa.string()),
    ]
)
RESULT_DTYPES: dict[str, str] = {
    "representation": "string",
    "task": "string",
    "metric": "string",
    "value": "float64",
    "k": "Int64",
    "n_seeds": "Int64",
    "ci_low": "Float64",
    "ci_high": "Float64",
    "ci_method": "string",
}
RESULT_COLUMNS = list(RESULT_DTYPES)
NOTES_KEY = f"{META_PREFIX}notes"
# what an interval is over (the `ci_method` vocabulary)
CI_TEST_BOOTSTRAP = "test_bootstrap"
CI_FEWSHOT_EPISODES = "fewshot_episodes"
CI_PRETRAINING_SEEDS = "pretraining_seeds"
CI_METHODS = (CI_TEST_BOOTSTRAP, CI_FEWSHOT_EPISODES, CI_PRETRAINING_SEEDS)


def result_row(
    representation: str,
    task: str,
    metric: str,
    value: float,
    *,
    k: int | None = None,
    n_seeds: int | None = None,
    ci_low: float | None = None,
    ci_high: float | None = None,
    ci_method: str | None = None,
) -> dict[str, Any]:
    """One tidy result row."""
    if ci_method is not None and ci_method not in CI_METHODS:
        raise ValueError(f"ci_method {ci_method!r}; expected one of {', '.join(CI_METHODS)}")
    return {
        "representation": representation,
        "task": task,
        "metric": metric,
        "value": float(value),
        "k": k,
        "n_seeds": n_seeds,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "ci_method": ci_method,
    }


def result_frame(rows: Iterable[Mapping[str, Any]] | pd.DataFrame = ()) -> pd.DataFrame:
    """Rows (or a frame) as a result table with the contract's columns and dtypes."""
    frame = (
        rows.copy() if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows), columns=RESULT_COLUMNS)
    )
    frame = frame.reindex(columns=RESULT_COLUMNS)
    # float NaN from pandas' own concat means "absent" in the nullable columns
    return frame.astype(RESULT_DTYPES).reset_index(drop=True)


def concat_results(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate result tables, keeping the dtypes (an empty list gives an empty table)."""
    frames = [f for f in frames if len(f)]
    return result_frame(pd.concat(frames, ignore_index=True) if frames else ())


def write_results(path: str | os.PathLike[str], frame: pd.DataFrame, *, notes: Sequence[str] = ()) -> Path:
    """Write a result table atomically with pinned Parquet types; `notes` go into the file metadata."""
    table = pa.Table.from_pandas(result_frame(frame), schema=RESULT_SCHEMA, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    if notes:
        meta[NOTES_KEY.encode()] = json.dumps(list(notes)).encode()
    with atomic_path(path) as tmp:
        pq.write_table(table.replace_schema_metadata(meta), tmp)
    return Path(path)


def read_results(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, list[str]]:
    """Read a result table and its notes."""
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(NOTES_KEY.encode())
    return result_frame(table.to_pandas()), (json.loads(raw) if raw else [])
