"""What a run records in MLflow, derived from the config and the run directory alone.

Live tracking and `ae-repr log-run` both build their params, tags, metrics and artifact lists here,
so an upload after the fact records the same things a live run does.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ae_repr.config import ExperimentConfig

PARENT_KIND, VARIANT_KIND, BASELINE_KIND = "parent", "variant", "baseline"
KIND_TAG = "ae_repr.run_kind"
RERUN_TAG = "ae_repr.rerun_of"  # on the parent run of a run that found the folder's previous one killed
HEADLINE = "linear_probe_accuracy"  # the parent's per-representation headline metric
HEADLINE_METRICS = ("eval/linear_probe_accuracy", "eval/linear_probe_macro_f1", "eval/knn_accuracy_5nn",
                    "eval/fewshot_frozen_accuracy_k5", "eval/fewshot_finetune_accuracy_k5",
                    "eval/reduction_trustworthiness", "val/loss")
INTERVAL = ("ci_low", "ci_high")  # `<metric>/ci_low`, `<metric>/ci_high`: the 95% interval of a logged number
BASELINE_PREFIX = "baseline/"  # the parent's `baseline/<name>/<task>_<metric>`: a baseline's headline numbers
# the parent's `seeds/<variant>/<task>_<metric>` and `seeds/<variant>/n_seeds`: a seed grid's mean over the seeds
AGGREGATE_PREFIX = "seeds/"
N_SEEDS = "n_seeds"
VERDICT = "verdict.md"  # evaluation.pipeline.VERDICT, named here so `ae-repr compare` does not import evaluation
VIEW_KEY = "variants"  # the experiment's shared UI view: `#/experiments/<id>/runs?viewStateShareKey=variants`
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|AUTH",
                          re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def project_root() -> Path:
    """The folder holding pyproject.toml above flows/, else the current directory."""
    here = Path(__file__).resolve().parents[2]  # flows/tracking/record.py -> the checkout
    return here if (here / "pyproject.toml").is_file() else Path.cwd().resolve()


def git_commit(root: Path | None = None) -> str:
    """`git rev-parse HEAD` of the code's checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root or project_root(), capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if re.fullmatch(r"[0-9a-f]{40,64}", sha) else "unknown"


def redact(value: str) -> str:
    """`value` without URL credentials or the value of any secret-looking environment variable."""
    value = _URL_USERINFO.sub(r"\g<scheme>***@", value)
    for name, secret in os.environ.items():
        if len(secret) >= 6 and _SECRET_NAME.search(name) and secret in value:
            value = value.replace(secret, "***")
    return value


def safe(d: Mapping[str, Any]) -> dict[str, str]:
    """String params/tags with credentials removed: environment variables and secrets never reach MLflow."""
    return {str(k): redact(str(v)) for k, v in d.items() if v is not None}


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested JSON-able values as `prefix.key` -> string (lists and empty dicts as JSON)."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for k, sub in value.items():
            out.update(flatten(f"{prefix}.{k}" if prefix else str(k), sub))
        return out
    return {prefix: json.dumps(value) if isinstance(value, (list, tuple, dict)) else str(value)}


def variant_params(cfg: ExperimentConfig, variant: str) -> dict[str, str]:
    """A child run's params: the flattened experiment config plus the variant's resolved model config."""
    return safe({**cfg.flat(), **flatten("model", cfg.models.model_config_for(variant).model_dump(mode="json")),
                 "variant": variant})


def parent_name(cfg: ExperimentConfig, info: Mapping[str, Any], out_dir: Path,
                flow_run: Mapping[str, str | None]) -> str:
    """The parent run's name: what ran (data set, variants) and which flow run (its name, else the run folder)."""
    return f"{info.get('dataset', cfg.data.dataset)}: {','.join(cfg.models.variants)} ({flow_run.get('name') or out_dir.name})"


def parent_tags(cfg: ExperimentConfig, info: Mapping[str, Any], out_dir: Path, flow_run: Mapping[str, str | None],
                commit: str) -> dict[str, str]:
    """The parent run's tags: Prefect flow run, data set identity, code version, run directory."""
    import ae_repr

    return safe({
        KIND_TAG: PARENT_KIND,
        "prefect.flow_run_id": flow_run.get("id"),
        "prefect.flow_run_name": flow_run.get("name"),
        "prefect.deployment_name": flow_run.get("deployment"),
        "dataset": info.get("dataset", cfg.data.dataset),
        "dataset_sha256": info.get("sha256"),
        "git_commit": commit,
        "mlflow.source.git.commit": commit if commit != "unknown" else None,
        "mlflow.source.name": "flows.pretrain_and_probe",
        "mlflow.source.type": "JOB",
        "ae_repr.version": ae_repr.__version__,
        "ae_repr.out_dir": str(out_dir),
        "ae_repr.variants": ",".join(cfg.models.variants),
        "mlflow.note.content": f"pretrain-and-probe on {info.get('dataset', cfg.data.dataset)}: "
                               f"{', '.join(cfg.models.variants)}; run directory {out_dir}",
    })


def variant_tags(parent_id: str, variant: str, info: Mapping[str, Any], commit: str) -> dict[str, str]:
    """A child run's tags: nesting, the variant, the data set identity."""
    return safe({
        "mlflow.parentRunId": parent_id,
        KIND_TAG: VARIANT_KIND,
        "variant": variant,
        "representation": variant,
        "dataset": info.get("dataset"),
        "dataset_sha256": info.get("sha256"),
        "git_commit": commit,
        "mlflow.source.git.commit": commit if commit != "unknown" else None,
    })


def eval_key(task: str, metric: str, k: Any = None) -> str:
    """The MLflow name of one summary number: `eval/<task>_<metric>[_k<k>]`."""
    has_k = k is not None and not pd.isna(k)
    return f"eval/{task}_{metric}" + (f"_k{int(k)}" if has_k else "")


def callback_key(key: str) -> str:
    """The evaluation callback's `eval/<task>/<metric>[_k<k>]` as an MLflow name (`eval/<task>_<metric>...`)."""
    head, _, rest = key.partition("/")
    return f"{head}/{rest.replace('/', '_')}" if head == "eval" and rest else key


def _finite(v: Any) -> bool:
    return v is not None and not pd.isna(v) and math.isfinite(float(v))


def eval_metrics(summary: pd.DataFrame, representation: str) -> dict[str, float]:
    """Every summary number of one representation, by MLflow name, with `<name>/ci_low` and `<name>/ci_high`
    where the number has an interval."""
    rows = summary[summary["representation"] == representation]
    out: dict[str, float] = {}
    for r in rows.itertuples(index=False):
        if not _finite(r.value):
            continue
        key = eval_key(r.task, r.metric, r.k)
        out[key] = float(r.value)
        if _finite(r.ci_low) and _finite(r.ci_high):
            out[f"{key}/{INTERVAL[0]}"], out[f"{key}/{INTERVAL[1]}"] = float(r.ci_low), float(r.ci_high)
    return out


def interval_of(key: str) -> tuple[str, str | None]:
    """(the metric, `ci_low` | `ci_high` | None) of an MLflow metric name."""
    head, _, last = key.rpartition("/")
    return (head, last) if head and last in INTERVAL else (key, None)


def baseline_names(summary: pd.DataFrame, variants: Iterable[str]) -> list[str]:
    """The representations of a summary that are not trained variants and have a headline number (raw, pca, ...)."""
    learned = set(variants)
    out = []
    for name in summary["representation"].unique():
        if name in learned or "@" in name:  # a variant, or one pretraining seed of one
            continue
        if any(interval_of(key)[0] in HEADLINE_METRICS for key in eval_metrics(summary, name)):
            out.append(str(name))
    return out


def baseline_metrics(summary: pd.DataFrame, variants: Iterable[str]) -> dict[str, float]:
    """The parent's `baseline/<name>/<task>_<metric>[/ci_low|/ci_high]`: the headline numbers of every
    representation that is not a trained variant (raw, pca, ...), so `ae-repr compare` can show them."""
    out: dict[str, float] = {}
    for name in baseline_names(summary, variants):
        for key, value in eval_metrics(summary, name).items():
            if interval_of(key)[0] in HEADLINE_METRICS:
                out[f"{BASELINE_PREFIX}{name}/{key.removeprefix('eval/')}"] = value
    return out


def baseline_run_name(name: str) -> str:
    """A baseline's child run name: the representation, marked as a baseline where runs are listed."""
    return f"{name} (baseline)"


def baseline_tags(parent_id: str, name: str, info: Mapping[str, Any], commit: str) -> dict[str, str]:
    """A baseline's child run tags: nesting, the kind, the representation, the data set identity."""
    return safe({
        "mlflow.parentRunId": parent_id,
        KIND_TAG: BASELINE_KIND,
        "representation": name,
        "dataset": info.get("dataset"),
        "dataset_sha256": info.get("sha256"),
        "git_commit": commit,
        "mlflow.source.git.commit": commit if commit != "unknown" else None,
    })


def aggregate_metrics(summary: pd.DataFrame, variants: Iterable[str]) -> dict[str, float]:
    """The parent's `seeds/<variant>/<task>_<metric>[/ci_low|/ci_high]` and `seeds/<variant>/n_seeds`: the
    headline numbers of each seed-grid variant's aggregate row (mean over its pretraining seeds, with the interval
    over the seeds), so `ae-repr compare` shows one row per variant instead of one per seed."""
    out: dict[str, float] = {}
    for v in sorted(set(variants)):
        for key, value in eval_metrics(summary, v).items():
            if interval_of(key)[0] in HEADLINE_METRICS:
                out[f"{AGGREGATE_PREFIX}{v}/{key.removeprefix('eval/')}"] = value
        probe = summary[(summary["representation"] == v) & (summary["task"] == "linear_probe")
                        & (summary["metric"] == "accuracy")]
        if len(probe) and _finite(probe["n_seeds"].iloc[0]):
            out[f"{AGGREGATE_PREFIX}{v}/{N_SEEDS}"] = float(probe["n_seeds"].iloc[0])
    return out


def headline_metrics(summary: pd.DataFrame, variants: Iterable[str]) -> tuple[dict[str, float], dict[str, str]]:
    """The parent's metrics (`<representation>/linear_probe_accuracy`, the best variant's, the baselines' headline
    numbers) and tags."""
    variants = list(variants)
    rows = summary[(summary["task"] == "linear_probe") & (summary["metric"] == "accuracy")]
    # one pretraining seed's row (`<variant>@seed=<s>`) is not a valid MLflow name, and would fail the whole write:
    # the aggregate row under the plain name stands for it
    metrics = {f"{r.representation}/{HEADLINE}": float(r.value) for r in rows.itertuples(index=False)
               if "@" not in r.representation}
    metrics.update(baseline_metrics(summary, variants))
    learned = {v: metrics[f"{v}/{HEADLINE}"] for v in variants if f"{v}/{HEADLINE}" in metrics}
    tags: dict[str, str] = {}
    if learned:
        best = max(learned, key=learned.__getitem__)
        metrics[f"best_{HEADLINE}"] = learned[best]
        tags["best_variant"] = best
    return metrics, tags


def history_metrics(history: list[dict[str, float]], after_epoch: int = 0) -> list[tuple[str, float, int]]:
    """(key, value, epoch) of every per-epoch number in a training history after `after_epoch`."""
    out = []
    for i, rec in enumerate(history):
        epoch = int(rec.get("epoch", i + 1))
        if epoch > after_epoch:
            out += [(k, float(v), epoch) for k, v in rec.items() if k != "epoch" and isinstance(v, (int, float))]
    return out


def parent_artifacts(out_dir: Path) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of the parent run: config, summary, verdict, report, comparison plots."""
    names = ("config.json", "summary.parquet", VERDICT, "report.md")
    files: list[tuple[Path, str | None]] = [(out_dir / n, None) for n in names]
    files += [(p, "plots") for p in sorted((out_dir / "plots").glob("*.png"))]
    return [(p, a) for p, a in files if p.is_file()]


def variant_artifacts(out_dir: Path, variant: str, plots: Iterable[Path]) -> list[tuple[Path, str | None]]:
    """(file, artifact folder) of a child run: features, training history, model description, plots."""
    model_dir = out_dir / "models" / variant
    files: list[tuple[Path, str | None]] = [(out_dir / "features" / f"{variant}.parquet", "features"),
                                            (model_dir / "history.json", None), (model_dir / "config.json", "model")]
    files += [(Path(p), "plots") for p in plots]
    return [(p, a) for p, a in files if p.is_file()]


def verdict_tags(out_dir: Path) -> dict[str, str]:
    """The parent's description (`mlflow.note.content`, shown as the run's description): the run's verdict."""
    path = out_dir / VERDICT
    text = path.read_text().strip() if path.is_file() else ""
    return {"mlflow.note.content": text} if text else {}


def read_summary(out_dir: Path) -> pd.DataFrame | None:
    """`summary.parquet` of a run directory, or None when it is not there."""
    path = out_dir / "summary.parquet"
    return pd.read_parquet(path) if path.is_file() else None


def variants_view() -> dict[str, Any]:
    """The MLflow UI's runs-table state listing every variant and baseline run side by side, best linear probe
    first, the headline columns shown (a baseline run carries the same `eval/*` names as a variant's).

    Stored as the experiment tag `mlflow.sharedViewState.<VIEW_KEY>`; a sort key other than the start time
    makes the table list child runs flat instead of folded under their parents.
    """
    return {
        "searchFilter": f"tags.`{KIND_TAG}` != '{PARENT_KIND}'",
        "orderByKey": f"metrics.`{HEADLINE_METRICS[0]}`",
        "orderByAsc": False,
        "selectedColumns": [f"tags.`{KIND_TAG}`", "tags.`dataset`", *(f"metrics.`{m}`" for m in HEADLINE_METRICS)],
    }


def variant_plots(out_dir: Path, variant: str) -> list[Path]:
    """The per-variant figures the flow drew under `plots/<variant>/`."""
    return sorted((out_dir / "plots" / variant).glob("*.png"))
