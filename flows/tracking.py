"""MLflow tracking for the flow: one parent run per flow run, one nested child run per variant.

Tasks run in threads, and MLflow's fluent active run is thread-local, so everything here goes
through `MlflowClient` with explicit run ids, and every write goes through one background writer
(`tracking_writer.Writer`): training threads only enqueue, retries back off, and when the server stays
down the run completes on disk and `<out>/tracking_pending.json` says what was not logged, for
`ae-repr log-run OUT` (`upload_run`) to upload later. With tracking disabled every method is a no-op.

Per-epoch and evaluation metrics stream during the run (collected for a few seconds per write). The
Python-heavy part — figures, exporting and registering each encoder — waits for `log_results`, after
training and evaluation: run beside them, it held the GIL against their many short native calls and
slowed them by far more than its own CPU time.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from ae_repr.config import ExperimentConfig, TrackingConfig, validate_config
from ae_repr.errors import UserError
from ae_repr.io import read_json, write_json

from . import tracking_record as rec
from .tracking_writer import Writer

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
PENDING = "tracking_pending.json"
CHAMPION = "champion"
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens it in model-training view
MODEL_NAME = "encoder"
_ENV_DEFAULTS = {
    # mid-run: fail a request fast and let the writer's back-off decide (MLflow's own retries take minutes)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # log_model would list the names of environment variables read during inference in the model's files
    "MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING": "false",
    # ending a run prints its URL to stdout; the CLI prints the links that matter itself
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_EXAMPLE_ROWS = 8
_METRICS_FLUSH_S = 5.0  # metrics logged from the flow's threads reach MLflow at most this late


def registered_name(variant: str) -> str:
    """The registered model name of a variant's encoder."""
    return f"ae-repr-{variant}"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an SQLite store in the project root (absolute path)."""
    return os.environ.get(ENV_URI) or f"sqlite:///{rec.project_root() / 'mlflow.db'}"


def display_uri(uri: str) -> str:
    """The URI without credentials, for messages and tags."""
    return rec.redact(uri)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: `mlartifacts/` beside an SQLite file; the server decides otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return str((db.parent if db.is_absolute() else Path.cwd() / db.parent).resolve() / "mlartifacts")
    return None


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise UserError (one line) unless the tracking store answers within `timeout_s` seconds."""
    scheme = urlsplit(uri).scheme
    shown = display_uri(uri)
    if scheme in ("http", "https"):
        _check_http(uri, shown, timeout_s)
    elif scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            raise UserError(f"MLflow tracking URI {shown}: give the SQLite file as an absolute path "
                            "(sqlite:////abs/path/mlflow.db)")
        parent = next(p for p in (db.parent, *db.parent.parents) if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"MLflow tracking store {shown} is not writable")
    elif scheme in ("", "file"):
        raise UserError(f"MLflow tracking URI {shown}: the plain file store is not supported by MLflow 3.13+; "
                        "use sqlite:////abs/path/mlflow.db or http://host:port")


def _check_http(uri: str, shown: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    error = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=max(0.5, min(3.0, left)))
        except requests.RequestException as e:
            error = e.__class__.__name__
        else:
            if resp.status_code in (401, 403):
                raise UserError(f"MLflow tracking server at {shown} refused access (HTTP {resp.status_code}); "
                                "check MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
            if resp.status_code < 500:
                return
            error = f"HTTP {resp.status_code}"
        if time.monotonic() + 1.0 > deadline:
            raise UserError(f"MLflow tracking server at {shown} is unreachable ({error} after {timeout_s:g}s); "
                            f"start it or fix {ENV_URI}")
        time.sleep(1.0)


def ui_view_url(uri: str, experiment_id: str) -> str | None:
    """The address of the experiment's variants view (runs table) when `uri` is an HTTP server."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    return f"{display_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={rec.VIEW_KEY}"


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast (UserError) when tracking is enabled and its store is unreachable: before any work starts."""
    if cfg.tracking.enabled:
        try:
            check_reachable(tracking_uri(), cfg.tracking.connect_timeout_s)
        except UserError as e:
            raise UserError(f"{e} (or run with --no-tracking)") from None


class Session:
    """One tracking store and experiment, and the writer every write goes through."""

    def __init__(self, uri: str, experiment: str, settings: TrackingConfig) -> None:
        import mlflow

        for key, value in _ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        self.uri = uri
        self.settings = settings
        self._metrics: dict[str, list[Any]] = {}  # run id -> metrics waiting for their queued write
        self._timers: dict[str, threading.Timer] = {}  # run id -> the timer that queues them
        self._metrics_lock = threading.Lock()
        # log_model and the registry resolve the process-wide URI, not the client's (the registry follows it
        # unless MLFLOW_REGISTRY_URI names another one)
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.MlflowClient(uri)
        self.writer = Writer(retries=settings.retries, backoff_s=settings.retry_backoff_s)
        exp_id = self.writer.call(f"experiment {experiment}", lambda: self._experiment(experiment))
        if exp_id is None:
            self.writer.close(1)
            raise UserError(f"MLflow at {display_uri(uri)}: cannot open experiment {experiment!r}: "
                            f"{self.writer.not_logged[-1].error if self.writer.not_logged else 'unknown error'}")
        self.experiment_id: str = exp_id

    def _experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location(self.uri),
                                                     tags=self._experiment_tags())
            except MlflowException as e:  # created meanwhile by a concurrent run
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise e from None
        if exp.lifecycle_stage == "deleted":
            raise UserError(f"MLflow experiment {name!r} is deleted; restore it or set tracking.experiment")
        for key, value in self._experiment_tags().items():
            if exp.tags.get(key) != value:
                self.client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    @staticmethod
    def _experiment_tags() -> dict[str, str]:
        return {**EXPERIMENT_TAGS, f"mlflow.sharedViewState.{rec.VIEW_KEY}": json.dumps(rec.variants_view())}

    def url(self, run_id: str | None) -> str | None:
        """The UI address of a run, for an HTTP tracking server."""
        if run_id is None or urlsplit(self.uri).scheme not in ("http", "https"):
            return None
        return f"{display_uri(self.uri).rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"

    def view_url(self) -> str | None:
        """The UI's runs table of every variant run with headline metric columns, for an HTTP tracking server."""
        return ui_view_url(self.uri, self.experiment_id)

    def create_run(self, name: str, tags: dict[str, str]) -> str | None:
        """A new run (waits for it); None when the server is down."""
        run = self.writer.call(f"create run {name}", lambda: self.client.create_run(
            self.experiment_id, run_name=name, tags=tags))
        return None if run is None else run.info.run_id

    def log_params(self, run_id: str | None, params: dict[str, str]) -> None:
        """Queue params, 100 per request."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            chunk = items[i : i + 100]
            self._queue(run_id, f"{len(chunk)} params", lambda c=chunk: self.client.log_batch(run_id, params=c))

    def log_tags(self, run_id: str | None, tags: dict[str, str]) -> None:
        """Queue tags."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in rec.safe(tags).items()]
        self._queue(run_id, f"tags {', '.join(tags)}", lambda: self.client.log_batch(run_id, tags=items))

    def log_metrics(self, run_id: str | None, items: Iterable[tuple[str, float, int]]) -> None:
        """Queue (key, value, step) metrics; those queued for a run before its write starts go in one request."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in items if np.isfinite(v)]
        if run_id is None or not metrics:
            return
        with self._metrics_lock:
            waiting = self._metrics.get(run_id)
            if waiting is not None:  # a write for this run is waiting and has not started: ride along
                waiting.extend(metrics)
                return
            self._metrics[run_id] = metrics
            if not self.writer.on_writer_thread():
                # collect for a few seconds: fewer, larger writes, and less Python work beside the training threads
                timer = threading.Timer(_METRICS_FLUSH_S, self._send_metrics, (run_id,))
                timer.daemon = True
                self._timers[run_id] = timer
                timer.start()
                return
        self._send_metrics(run_id)

    def _send_metrics(self, run_id: str) -> None:
        """Queue one write of every metric collected for a run."""
        with self._metrics_lock:
            self._timers.pop(run_id, None)
        batch: list[Any] = []

        def send() -> None:
            if not batch:  # taken once; a retry resends the same values
                with self._metrics_lock:
                    batch.extend(self._metrics.pop(run_id, []))
            for i in range(0, len(batch), 1000):
                self.client.log_batch(run_id, metrics=batch[i : i + 1000])

        self._queue(run_id, "metrics", send)

    def flush_metrics(self) -> None:
        """Queue the metrics still being collected now, instead of when their timers fire."""
        with self._metrics_lock:
            timers = list(self._timers.items())
            self._timers.clear()
        for run_id, timer in timers:
            timer.cancel()
            self._send_metrics(run_id)

    def close(self, timeout_s: float | None = None) -> bool:
        """Write everything queued and stop the writer; False when it did not finish in time."""
        self.flush_metrics()
        return self.writer.close(timeout_s)

    def log_dataset(self, run_id: str | None, info: dict[str, Any]) -> None:
        """Queue the data set as a dataset input: its name, digest (sha256 prefix) and sample shape."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.types import Schema, TensorSpec

        shape = tuple(info.get("shape") or ())
        schema = Schema([TensorSpec(np.dtype(np.float32), (-1, *shape), "x")]) if shape else None
        ds = MetaDataset(CodeDatasetSource(rec.safe({"dataset": info["dataset"], "sha256": info["sha256"],
                                                     "rows": info.get("rows")})),
                         name=rec.redact(str(info["dataset"]))[:500], digest=str(info["sha256"])[:32], schema=schema)
        item = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "train")])
        self._queue(run_id, "dataset input", lambda: self.client.log_inputs(run_id, datasets=[item]))

    def log_artifacts(self, run_id: str | None, files: list[tuple[Path, str | None]]) -> None:
        """Queue files, each under its artifact folder."""
        for path, folder in files:
            self._queue(run_id, f"artifact {path.name}",
                        lambda p=path, f=folder: self.client.log_artifact(run_id, str(p), f))

    def log_encoder(self, run_id: str | None, variant: str, model_dir: Path, example: np.ndarray,
                    info: dict[str, Any]) -> None:
        """Queue the variant's encoder (raw inputs -> representation) as an MLflow model, registered if configured."""
        self._queue(run_id, f"model {variant}", lambda: self._log_encoder(run_id, variant, model_dir, example, info))

    def _log_encoder(self, run_id: str, variant: str, model_dir: Path, example: np.ndarray,
                     info: dict[str, Any]) -> None:
        import mlflow
        import torch
        from mlflow.models import ModelSignature
        from mlflow.types import Schema, TensorSpec

        from ae_repr.encoder import Encoder

        enc = Encoder.from_dir(model_dir)
        x = np.ascontiguousarray(example, dtype=np.float32).reshape(-1, *enc.input_shape)  # (B, *input_shape)
        signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *enc.input_shape))]),
                                   outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, enc.latent_dim))]))
        register = self.settings.register_models
        model = mlflow.pytorch.log_model(
            enc, name=MODEL_NAME, run_id=run_id, signature=signature, input_example=x,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
            registered_model_name=registered_name(variant) if register else None,
            validate_serving_input=False,  # a reload + predict per model; the tests load and run the model
            metadata=rec.safe({"variant": variant, "latent_dim": enc.latent_dim, "dataset": info.get("dataset"),
                               "dataset_sha256": info.get("sha256"), "input": "raw rows, float32"}),
        )
        version = getattr(model, "registered_model_version", None)
        if register and version is not None:
            name = registered_name(variant)
            if CHAMPION not in self.client.get_registered_model(name).aliases:
                self.client.set_registered_model_alias(name, CHAMPION, str(version))

    def terminate(self, run_id: str | None, status: str) -> None:
        """Queue the end of a run (FINISHED, FAILED, KILLED)."""
        self._queue(run_id, f"end run ({status})", lambda: self.client.set_terminated(run_id, status))

    def upload_variant(self, run_id: str | None, variant: str, out_dir: Path, example: np.ndarray,
                       info: dict[str, Any], after_epoch: int = 0) -> None:
        """Queue what a variant's run holds beyond live metrics: history not yet logged, plots, files, model."""
        if run_id is None:
            return
        self.writer.submit(f"{variant}: plots and files",
                           lambda: self._upload_variant(run_id, variant, out_dir, example, info, after_epoch), run_id)

    def _upload_variant(self, run_id: str, variant: str, out_dir: Path, example: np.ndarray,
                        info: dict[str, Any], after_epoch: int) -> None:
        # runs on the writer thread: the figures are drawn off the training threads, then writes are queued
        model_dir = out_dir / "models" / variant
        history = read_json(model_dir / "history.json") if (model_dir / "history.json").is_file() else []
        self.log_metrics(run_id, rec.history_metrics(history, after_epoch))
        plots: list[Path] = []
        if self.settings.log_plots and (model_dir / "model.pt").is_file():
            from evaluation.variant_plots import variant_plots

            try:
                plots = variant_plots(model_dir, example, out_dir / "features" / f"{variant}.parquet",
                                      out_dir / "plots" / variant)
            except Exception as e:  # a figure must not cost the run its model and files
                log.warning("%s: plots failed: %s: %s", variant, e.__class__.__name__, e)
        self.log_artifacts(run_id, rec.variant_artifacts(out_dir, variant, plots))
        if self.settings.log_models and (model_dir / "model.pt").is_file():
            self.log_encoder(run_id, variant, model_dir, example, info)

    def log_parent_results(self, parent_id: str | None, out_dir: Path, variants: Iterable[str]) -> None:
        """Queue the parent's files (config, summary, verdict, report, comparison plots), headline metrics and
        the verdict as the run's description."""
        summary = rec.read_summary(out_dir)
        tags = rec.verdict_tags(out_dir)
        if summary is not None:
            metrics, best = rec.headline_metrics(summary, variants)
            self.log_metrics(parent_id, [(k, v, 0) for k, v in metrics.items()])
            tags.update(best)
        if tags:
            self.log_tags(parent_id, tags)
        self.log_artifacts(parent_id, rec.parent_artifacts(out_dir))

    def _queue(self, run_id: str | None, what: str, fn: Callable[[], Any]) -> None:
        if run_id is not None:
            self.writer.submit(what, fn, run_id)


def _data_rows(cfg: ExperimentConfig, live: bool) -> tuple[np.ndarray, dict[str, Any]]:
    """A few raw test rows (input example, reconstructions) and the data set's identity."""
    if live:  # the flow's process-wide cache: no second copy of the data
        from .pretrain_and_probe import data_for

        data = data_for(cfg)
    else:
        from ae_repr.data import load_dataset

        data = load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)
    idx = data.test_idx[:_EXAMPLE_ROWS] if len(data.test_idx) else np.arange(min(len(data), _EXAMPLE_ROWS))
    info = {"dataset": data.name, "sha256": data.sha256, "rows": len(data), "shape": list(data.shape)}
    return data.x[idx].astype(np.float32), info


def _flow_run() -> dict[str, str | None]:
    """The current Prefect flow run's id and name (None outside a flow run)."""
    try:
        from prefect.runtime import deployment, flow_run

        return {"id": flow_run.id, "name": flow_run.name, "deployment": deployment.name}
    except Exception:  # tracking must not depend on Prefect's runtime being there
        return {"id": None, "name": None, "deployment": None}


class Tracker:
    """The flow's handle on MLflow (or on nothing, when tracking is disabled)."""

    _current: ClassVar[Tracker | None] = None

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, info: dict[str, Any]) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.info = info
        self.enabled = False
        self.parent_id: str | None = None
        self.parent_url: str | None = None
        self.tracking_uri: str | None = None  # without credentials
        self.runs: dict[str, str | None] = {}  # variant -> child run id
        self.flow_run: dict[str, str | None] = {}
        self._session: Session | None = None
        self._commit = "unknown"
        self._lock = threading.Lock()
        self._epochs: dict[str, int] = {}  # run id -> last epoch streamed live
        self._eval_logged: dict[str, dict[str, float]] = {}  # run id -> eval metrics streamed live
        self._uploaded: set[str] = set()  # variants whose files and model are queued
        self._finished = False

    @classmethod
    def start(cls, cfg: ExperimentConfig, out_dir: Path, info: dict[str, Any]) -> Tracker:
        """Open the parent run (when enabled) and make this the tracker tasks see; UserError if MLflow is down."""
        if cls._current is not None:
            cls._current._abandon()  # an earlier flow run in this process that never reached finish()
        tracker = cls(cfg, out_dir, info)
        if cfg.tracking.enabled:
            tracker._open()
        cls._current = tracker
        return tracker

    @classmethod
    def current(cls) -> Tracker:
        """The tracker of the flow run in this process."""
        assert cls._current is not None, "Tracker.start() was not called"
        return cls._current

    def _open(self) -> None:
        started = time.perf_counter()
        uri = tracking_uri()
        check_reachable(uri, self.cfg.tracking.connect_timeout_s)
        self._session = session = Session(uri, self.cfg.tracking.experiment, self.cfg.tracking)
        self.enabled = True
        self.tracking_uri = display_uri(uri)
        self._commit = rec.git_commit()
        self.flow_run = _flow_run()
        tags = rec.parent_tags(self.cfg, self.info, self.out_dir, self.flow_run, self._commit)
        self.parent_id = session.create_run(self.flow_run.get("name") or self.out_dir.name, tags)
        self.parent_url = session.url(self.parent_id)
        session.log_params(self.parent_id, rec.safe(self.cfg.flat()))
        session.log_dataset(self.parent_id, self.info)
        atexit.register(self._abandon)
        log.info("MLflow: experiment %r at %s, parent run %s (%.1fs)", self.cfg.tracking.experiment,
                 display_uri(uri), self.parent_url or self.parent_id, time.perf_counter() - started)
        if session.view_url():
            log.info("MLflow: every variant run with its headline metrics: %s", session.view_url())

    def start_variant(self, variant: str) -> str | None:
        """Open the variant's child run; returns its id."""
        if self._session is None or self.parent_id is None:
            return None
        session = self._session
        run_id = session.create_run(variant, rec.variant_tags(self.parent_id, variant, self.info, self._commit))
        self.runs[variant] = run_id
        session.log_params(run_id, rec.variant_params(self.cfg, variant))
        session.log_dataset(run_id, self.info)
        return run_id

    def metric_logger(self, run_id: str | None) -> Callable[[dict[str, float], int], None] | None:
        """A per-epoch metrics callback for the trainer (only enqueues: training never waits on MLflow)."""
        if self._session is None or run_id is None:
            return None
        session = self._session

        def log_epoch(metrics: dict[str, float], step: int) -> None:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            items = [(k, float(v), step) for k, v in metrics.items()]
            items += [("system/max_rss_mb", usage.ru_maxrss / 1024, step),
                      ("system/process_cpu_s", usage.ru_utime + usage.ru_stime, step)]
            session.log_metrics(run_id, items)
            with self._lock:
                self._epochs[run_id] = max(step, self._epochs.get(run_id, 0))

        return log_epoch

    def eval_logger(self, run_id: str | None) -> Callable[[dict[str, float]], None] | None:
        """An evaluation metrics callback (only enqueues)."""
        if self._session is None or run_id is None:
            return None
        session = self._session

        def log_eval(metrics: dict[str, float]) -> None:
            items = {rec.callback_key(k): float(v) for k, v in metrics.items()}
            with self._lock:
                self._eval_logged.setdefault(run_id, {}).update(items)
            session.log_metrics(run_id, [(k, v, 0) for k, v in items.items()])

        return log_eval

    def _upload(self, variant: str) -> None:
        with self._lock:
            if variant in self._uploaded or self._session is None:
                return
            self._uploaded.add(variant)
            run_id = self.runs.get(variant)
            after = self._epochs.get(run_id or "", 0)
        example, _ = _data_rows(self.cfg, live=True)
        self._session.upload_variant(run_id, variant, self.out_dir, example, self.info, after)

    def log_results(self, out_dir: Path, runs: dict[str, str | None], failures: dict[str, str]) -> None:
        """Artifacts, eval metrics and models of every variant, and the parent's summary."""
        if self._session is None:
            return
        session = self._session
        summary = rec.read_summary(out_dir)
        for variant, run_id in runs.items():
            if run_id is None:
                continue
            if (out_dir / "models" / variant / "model.pt").is_file():
                self._upload(variant)
            if summary is not None and variant not in failures:
                live = self._eval_logged.get(run_id, {})
                session.log_metrics(run_id, [(k, v, 0) for k, v in rec.eval_metrics(summary, variant).items()
                                             if live.get(k) != v])
        session.log_parent_results(self.parent_id, out_dir, [v for v in runs if v not in failures])

    def finish(self, failures: dict[str, str]) -> None:
        """Close the runs (FAILED for failed variants); if MLflow was down, write what was not logged and say so."""
        if self._session is None or self._finished:
            return
        self._finished = True
        atexit.unregister(self._abandon)
        session = self._session
        for variant, run_id in self.runs.items():
            if variant in failures:
                session.log_tags(run_id, {"failure_reason": failures[variant][:5000]})
            session.terminate(run_id, "FAILED" if variant in failures else "FINISHED")
        if failures:
            session.log_tags(self.parent_id, {"failed": ", ".join(sorted(failures))})
        session.terminate(self.parent_id, "FAILED" if failures else "FINISHED")
        self._close(session)

    def _close(self, session: Session) -> None:
        started = time.perf_counter()
        drained = session.close(self.cfg.tracking.flush_timeout_s)
        log.info("MLflow: queued writes finished in %.1fs", time.perf_counter() - started)
        pending = self.out_dir / PENDING
        if drained and not session.writer.not_logged:
            pending.unlink(missing_ok=True)  # an earlier attempt's record no longer applies
            return
        write_json(pending, {
            "tracking_uri": display_uri(session.uri),
            "experiment": self.cfg.tracking.experiment,
            "parent_run_id": self.parent_id,
            "runs": self.runs,
            "prefect": self.flow_run,
            "offline_since": session.writer.offline_since,
            "queue_drained": drained,
            "not_logged": [asdict(n) for n in session.writer.not_logged],
            "upload_with": f"ae-repr log-run {self.out_dir}",
        })
        log.warning("MLflow: %d writes were not logged (server %s unreachable since %s); the run is complete on "
                    "disk in %s; upload it with `ae-repr log-run %s`", len(session.writer.not_logged),
                    display_uri(session.uri), session.writer.offline_since or "-", self.out_dir, self.out_dir)

    def _abandon(self) -> None:
        """Without `finish` (the flow crashed; at exit or at the next start): end the open runs as FAILED."""
        if self._session is None or self._finished:
            return
        self._finished = True
        atexit.unregister(self._abandon)
        for run_id in (*self.runs.values(), self.parent_id):
            self._session.terminate(run_id, "FAILED")
        if self.out_dir.is_dir():
            self._close(self._session)
        else:  # removed meanwhile (a failed command cleans up): no record to write into it
            self._session.close(30)


@dataclass(frozen=True)
class Upload:
    """What `upload_run` created."""

    parent_id: str
    url: str | None
    runs: dict[str, str | None]


def upload_run(out_dir: str | os.PathLike[str], experiment: str | None = None) -> Upload:
    """Upload a finished run directory to MLflow with everything a live run records (`ae-repr log-run`)."""
    out = Path(out_dir).expanduser().resolve()
    if not (out / "config.json").is_file():
        raise UserError(f"{out_dir}: not a run directory (no config.json)")
    try:
        raw = read_json(out / "config.json")
    except ValueError:
        raise UserError(f"{out / 'config.json'}: not valid JSON") from None
    cfg = validate_config(raw, source=str(out / "config.json"))
    settings = cfg.tracking if experiment is None else cfg.tracking.model_copy(update={"experiment": experiment})
    variants = [v for v in cfg.models.variants if (out / "models" / v).is_dir()]
    if not variants:
        raise UserError(f"{out_dir}: no trained models under {out / 'models'}")
    pending = read_json(out / PENDING) if (out / PENDING).is_file() else {}
    example, info = _data_rows(cfg, live=False)
    uri = tracking_uri()
    check_reachable(uri, settings.connect_timeout_s)
    session = Session(uri, settings.experiment, settings)
    commit = rec.git_commit()
    flow_run = pending.get("prefect") or {}
    tags = {**rec.parent_tags(cfg, info, out, flow_run, commit), "ae_repr.uploaded_by": "log-run",
            "ae_repr.replaces": pending.get("parent_run_id")}
    parent_id = session.create_run(flow_run.get("name") or out.name, rec.safe(tags))
    if parent_id is None:
        session.close(5)
        raise RuntimeError(f"MLflow at {display_uri(uri)}: could not create the parent run")
    session.log_params(parent_id, rec.safe(cfg.flat()))
    session.log_dataset(parent_id, info)
    summary = rec.read_summary(out)
    runs: dict[str, str | None] = {}
    failed: dict[str, str] = {}
    for v in cfg.models.variants:
        run_id = session.create_run(v, rec.variant_tags(parent_id, v, info, commit))
        runs[v] = run_id
        session.log_params(run_id, rec.variant_params(cfg, v))
        session.log_dataset(run_id, info)
        if not (out / "models" / v / "model.pt").is_file():
            failed[v] = "no trained model in the run directory"
        elif summary is None or not (summary["representation"] == v).any():
            failed[v] = "no evaluation results in summary.parquet"
        session.upload_variant(run_id, v, out, example, info)
        if summary is not None:
            session.log_metrics(run_id, [(k, val, 0) for k, val in rec.eval_metrics(summary, v).items()])
        if v in failed:
            session.log_tags(run_id, {"failure_reason": failed[v]})
        session.terminate(run_id, "FAILED" if v in failed else "FINISHED")
    session.log_parent_results(parent_id, out, [v for v in runs if v not in failed])
    if failed:
        session.log_tags(parent_id, {"failed": ", ".join(sorted(failed))})
    session.terminate(parent_id, "FAILED" if failed else "FINISHED")
    _supersede(session, pending, parent_id)
    drained = session.close(settings.flush_timeout_s)
    if not drained or session.writer.not_logged:
        first = session.writer.not_logged[0] if session.writer.not_logged else None
        raise RuntimeError(f"MLflow at {display_uri(uri)}: {len(session.writer.not_logged)} writes failed during the "
                           f"upload{f' (first: {first.what}: {first.error})' if first else ''}; run log-run again")
    (out / PENDING).unlink(missing_ok=True)
    return Upload(parent_id, session.url(parent_id), runs)


def _supersede(session: Session, pending: dict[str, Any], parent_id: str) -> None:
    """Mark the partial runs of a live attempt as replaced by the upload (when the server has them)."""
    from mlflow.exceptions import MlflowException

    old = [r for r in (pending.get("parent_run_id"), *(pending.get("runs") or {}).values()) if r]

    def mark() -> None:
        for run_id in old:
            try:
                session.client.set_tag(run_id, "ae_repr.superseded_by", parent_id)
                if session.client.get_run(run_id).info.status == "RUNNING":
                    session.client.set_terminated(run_id, "FAILED")
            except MlflowException:  # never created, or deleted since: nothing to mark
                continue

    if old:
        session.writer.submit("mark the partial runs superseded", mark)


@dataclass(frozen=True)
class Comparison:
    """Variants x headline metrics across recent flow runs, and where the UI shows the same."""

    table: pd.DataFrame
    ui_url: str | None


def compare_runs(experiment: str, last: int = 5) -> Comparison:
    """Variants x headline metrics of the last `last` parent runs of an experiment, read back with search_runs."""
    import mlflow

    if last <= 0:
        raise UserError(f"--last must be > 0, got {last}")
    uri = tracking_uri()
    check_reachable(uri, 10.0)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at {display_uri(uri)}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{rec.KIND_TAG}` = '{rec.PARENT_KIND}'",
                                 order_by=["attributes.start_time DESC"], max_results=last + 20)
    # a live attempt that `log-run` re-uploaded is not a run of its own
    parents = [p for p in parents if "ae_repr.superseded_by" not in p.data.tags][:last]
    rows: list[dict[str, Any]] = []
    for p in parents:
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{p.info.run_id}'",
                                      max_results=1000)
        for c in sorted(children, key=lambda r: r.data.tags.get("variant", "")):
            rows.append({
                "run": p.info.run_name, "started": pd.Timestamp(p.info.start_time, unit="ms").floor("s"),
                "variant": c.data.tags.get("variant", c.info.run_name), "status": c.info.status,
                "parent_run_id": p.info.run_id, "run_id": c.info.run_id, **c.data.metrics,
            })
    frame = pd.DataFrame(rows)
    url = ui_view_url(uri, exp.experiment_id)
    if frame.empty:
        return Comparison(frame, url)
    keep = [m for m in rec.HEADLINE_METRICS if m in frame.columns and frame[m].notna().any()]
    if not keep:  # another evaluation protocol: show every eval metric there is
        keep = sorted(c for c in frame.columns if c.startswith("eval/"))
    return Comparison(frame[["run", "started", "variant", "status", *keep, "parent_run_id", "run_id"]], url)


def format_table(frame: pd.DataFrame) -> str:
    """A compare table as terminal text (rich when installed), metrics to 4 digits, ids left out."""
    shown = frame.drop(columns=["parent_run_id", "run_id"], errors="ignore")
    cells = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
    headers = [c.removeprefix("eval/") for c in shown.columns]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)
    table = Table(show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i >= 4 else "left", no_wrap=True, min_width=len(h))
    for r in cells:
        table.add_row(*r)
    console = Console(width=10_000, record=True, color_system=None, file=io.StringIO())  # the table sets the width
    console.print(table)
    return console.export_text().rstrip()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4f}"
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)

