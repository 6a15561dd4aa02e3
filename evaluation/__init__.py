"""Pure functions over feature Parquet files -> tidy result tables, small plots and a report.

Imports ae_repr only (never prefect or mlflow); metrics go out through an optional `log` callback.
"""

from __future__ import annotations

from .applications import BASELINES_NAME
from .baselines import write_baselines
from .fewshot import fewshot_frozen
from .finetune import fewshot_finetune, fewshot_scratch
from .pipeline import (
    SWEEP_NAME,
    TASKS,
    EvaluationFailed,
    drop_stale,
    evaluate_application_baselines,
    evaluate_beta_sweep,
    evaluate_dir,
    evaluate_representation,
    representations_dir,
    rerender_report,
    summarize,
)
from .probe import knn, linear_probe
from .reduction import reduction
from .results import RESULT_COLUMNS, RESULT_DTYPES, RESULT_SCHEMA

__all__ = [
    "BASELINES_NAME",
    "RESULT_COLUMNS",
    "RESULT_DTYPES",
    "RESULT_SCHEMA",
    "TASKS",
    "SWEEP_NAME",
    "EvaluationFailed",
    "drop_stale",
    "evaluate_beta_sweep",
    "evaluate_application_baselines",
    "evaluate_dir",
    "evaluate_representation",
    "rerender_report",
    "fewshot_finetune",
    "fewshot_frozen",
    "fewshot_scratch",
    "knn",
    "linear_probe",
    "reduction",
    "representations_dir",
    "summarize",
    "write_baselines",
]
