"""The `pretrain-and-probe` Prefect flow: a thin DAG over ae_repr (train, extract) and evaluation.

data → for each variant in parallel: train → extract → evaluate; baselines → evaluate; then summary
and report. Tasks exchange paths and small dicts only; MLflow tracking goes through `flows.tracking`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

import ae_repr
from ae_repr.config import ExperimentConfig, load_config, validate_config
from ae_repr.data import Dataset, load_dataset
from ae_repr.features import extract_features
from ae_repr.io import write_json
from ae_repr.train import train_variant
from evaluation import evaluate_representation, summarize, write_baselines

from .tracking import Tracker

FLOW_NAME = "pretrain-and-probe"
log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4)
def _data(spec: str, test_fraction: float, seed: int) -> Dataset:
    # one load per process: the tasks of a flow run share it (threads), instead of each re-reading
    return load_dataset(spec, test_fraction=test_fraction, seed=seed)


def data_for(cfg: ExperimentConfig) -> Dataset:
    """The (process-cached) data set a config names."""
    return _data(cfg.data.dataset, cfg.data.test_fraction, cfg.data.split_seed)


def _cache_key(section: str, output: str):
    """A cache key over (config section, data sha256, package version, run dir, output present)."""

    def key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
        cfg: ExperimentConfig = params["cfg"]
        out = Path(params["out"])
        target = out / output.format(**params)
        parts = {
            "section": cfg.model_dump(mode="json")[section] if section != "all" else cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "data": data_for(cfg).sha256,
            "version": ae_repr.__version__,
            "out": str(out.resolve()),
            "task": ctx.task.name,
            "params": {k: str(v) for k, v in params.items() if k not in ("cfg", "out", "run_id")},
            "present": target.exists(),  # a deleted output is recomputed, never served stale from the cache
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()

    return key


@task(name="prepare-data", retries=2, retry_delay_seconds=[1, 5])
def prepare_data(cfg: ExperimentConfig, out: str) -> dict[str, Any]:
    """Load and validate the data, record the config; returns the data's identity."""
    data = data_for(cfg)
    write_json(Path(out) / "config.json", cfg.model_dump(mode="json"))
    return {"dataset": data.name, "sha256": data.sha256, "rows": len(data), "shape": list(data.shape),
            "labels": data.labels is not None}


@task(name="train", tags=["gpu"], persist_result=True,
      cache_key_fn=_cache_key("models", "models/{variant}/model.pt"), task_run_name="train-{variant}")
def train_task(variant: str, cfg: ExperimentConfig, out: str, run_id: str | None = None) -> str:
    """Train one variant; returns its model folder."""
    tracker = Tracker.current()
    res = train_variant(variant, data_for(cfg), cfg, Path(out) / "models" / variant,
                        log_fn=tracker.metric_logger(run_id), progress=False)
    if res.skipped:
        get_run_logger().info("%s: already trained for this config, skipped", variant)
    elif res.resumed_from is not None:
        get_run_logger().info("%s: resumed from epoch %d", variant, res.resumed_from)
    return str(res.model_dir)


@task(name="extract", retries=2, retry_delay_seconds=[1, 5], persist_result=True,
      cache_key_fn=_cache_key("models", "features/{variant}.parquet"), task_run_name="extract-{variant}")
def extract_task(variant: str, cfg: ExperimentConfig, out: str, model_dir: str, run_id: str | None = None) -> str:
    """Write the variant's features; returns the Parquet path."""
    path = extract_features(model_dir, data_for(cfg), Path(out) / "features" / f"{variant}.parquet", mlflow_run_id=run_id)
    return str(path)


@task(name="baselines", retries=2, retry_delay_seconds=[1, 5])
def baselines_task(cfg: ExperimentConfig, out: str, features: list[str]) -> list[str]:
    """Write the baseline feature files (raw, PCA, ICA, random projection) at the same width."""
    return [str(p) for p in write_baselines(Path(out) / "features", cfg.eval, seed=cfg.seed)]


@task(name="evaluate", task_run_name="evaluate-{name}")
def evaluate_task(name: str, feature_path: str, cfg: ExperimentConfig, out: str, run_id: str | None = None) -> str:
    """Every evaluation task for one representation; returns its tidy results file."""
    tracker = Tracker.current()
    path = evaluate_representation(Path(feature_path), cfg.eval, eval_dir=Path(out) / "eval" / "by_representation",
                                   seed=cfg.seed, log=tracker.eval_logger(run_id))
    return str(path)


@task(name="summarize", retries=2, retry_delay_seconds=[1, 5])
def summarize_task(cfg: ExperimentConfig, out: str, failures: dict[str, str]) -> str:
    """summary.parquet, eval/<task>.parquet, report.md and plots."""
    return str(summarize(Path(out), cfg.eval, failures=failures))


def resolve_config(config: ExperimentConfig | str | dict | None, **overrides: Any) -> ExperimentConfig:
    """The flow's `config` parameter (model, YAML path, dict or None) plus top-level overrides."""
    if config is None or isinstance(config, str):
        base = load_config(config)
    elif isinstance(config, dict):
        base = validate_config(config)
    else:
        base = config
    return base.with_overrides(**overrides)


@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=2), log_prints=True)
def pretrain_and_probe(
    config: ExperimentConfig | str | None = None,
    dataset: str | None = None,
    variants: list[str] | str | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    out: str | None = None,
) -> State:
    """Pretrain every configured variant, extract features, evaluate them against baselines, report."""
    cfg = resolve_config(config, dataset=dataset, variants=variants, epochs=epochs, latent_dim=latent_dim)
    out_dir = Path(out or Path("runs") / cfg.data.dataset.replace(":", "_").replace("/", "_")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    logger = get_run_logger()
    info = prepare_data(cfg, str(out_dir))
    tracker = Tracker.start(cfg, out_dir, info)
    runs = {v: tracker.start_variant(v) for v in cfg.models.variants}

    trained = {v: train_task.with_options(timeout_seconds=cfg.train.timeout_s).submit(v, cfg, str(out_dir), runs[v])
               for v in cfg.models.variants}
    extracted = {v: extract_task.submit(v, cfg, str(out_dir), trained[v], runs[v]) for v in cfg.models.variants}
    evaluated: dict[str, PrefectFuture] = {}
    failures: dict[str, str] = {}
    for v, fut in extracted.items():
        fut.wait()
        if fut.state.is_completed():
            evaluated[v] = evaluate_task.submit(v, fut.result(), cfg, str(out_dir), runs[v])
        else:
            failures[v] = _reason(trained[v]) or _reason(fut) or fut.state.name
    learned = [extracted[v].result() for v in evaluated]
    if not learned:
        tracker.finish(failures)
        return Failed(message=f"every variant failed: {failures}")
    baselines = baselines_task(cfg, str(out_dir), learned)
    for path in baselines:
        name = Path(path).stem
        evaluated[name] = evaluate_task.submit(name, path, cfg, str(out_dir), None)
    for name, fut in evaluated.items():
        fut.wait()
        if not fut.state.is_completed():
            failures[name] = _reason(fut) or "evaluation failed"
    summary = summarize_task(cfg, str(out_dir), failures)
    tracker.log_results(out_dir, runs, failures)
    _artifacts(out_dir, tracker)
    tracker.finish(failures)
    logger.info("summary: %s; report: %s", summary, out_dir / "report.md")
    if failures:
        return Failed(message="failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return Completed(message=str(summary), data=str(summary))


def _reason(fut: PrefectFuture) -> str | None:
    """The failure message of a future's final state, if it failed."""
    state = fut.state
    if state.is_completed() or not state.is_final():
        return None
    try:
        state.result(raise_on_failure=True)
    except Exception as e:
        return f"{e.__class__.__name__}: {e}"
    return state.message


def _artifacts(out_dir: Path, tracker: Tracker) -> None:
    """Prefect artifacts: the report's headline table and a link to the MLflow parent run."""
    report = out_dir / "report.md"
    if report.is_file():
        table = report.read_text().split("\n\n## ")[0]
        create_markdown_artifact(markdown=table, key="headline-results", description="pretrain-and-probe results")
    if tracker.parent_url:
        create_link_artifact(link=tracker.parent_url, link_text="MLflow parent run", key="mlflow-run")


def run_local(cfg: ExperimentConfig, out: Path) -> int:
    """`ae-repr run`: the flow in-process; returns the exit code."""
    state = pretrain_and_probe(config=cfg, out=str(out), return_state=True)
    report = out / "report.md"
    if report.is_file():
        print(f"report:  {report}")
    if state.is_completed():
        return 0
    print(f"ae-repr: run finished with failures: {state.message}")
    return 1
