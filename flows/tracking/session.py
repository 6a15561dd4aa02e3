"""One tracking store and experiment, and the MLflow writes of a run, each queued on the writer.

Tasks run in threads, and MLflow's fluent active run is thread-local, so everything here goes through
`MlflowClient` with explicit run ids, and every write goes through one background writer
(`writer.Writer`): training threads only enqueue, and retries back off.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ae_repr.config import TrackingConfig
from ae_repr.errors import UserError

from . import record as rec
from .models import log_encoder
from .store import artifact_location, display_uri, run_url, ui_view_url
from .writer import Writer

EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens it in model-training view
_ENV_DEFAULTS = {
    # mid-run: fail a request fast and let the writer's back-off decide (MLflow's own retries take minutes)
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    # log_model would list the names of environment variables read during inference in the model's files
    "MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING": "false",
    # ending a run prints its URL to stdout; the CLI prints the links that matter itself
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
_METRICS_FLUSH_S = 5.0  # metrics logged from the flow's threads reach MLflow at most this late


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
        return run_url(self.uri, self.experiment_id, run_id)

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
                    info: dict[str, Any], seed: int | None = None) -> None:
        """Queue the variant's encoder (raw inputs -> representation) as an MLflow model, registered if configured
        (tagged with its pretraining `seed` in a seed grid)."""
        register = self.settings.register_models
        self._queue(run_id, f"model {variant}", lambda: log_encoder(self.client, run_id, variant, model_dir, example,
                                                                    info, register=register, seed=seed))

    def terminate(self, run_id: str | None, status: str) -> None:
        """Queue the end of a run (FINISHED, FAILED, KILLED)."""
        self._queue(run_id, f"end run ({status})", lambda: self.client.set_terminated(run_id, status))

    def _queue(self, run_id: str | None, what: str, fn: Callable[[], Any]) -> None:
        if run_id is not None:
            self.writer.submit(what, fn, run_id)
