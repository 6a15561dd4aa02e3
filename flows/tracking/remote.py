"""A variant run's per-epoch metrics and tags, logged from whichever process trains it (a Ray worker, too).

The flow's `Recorder` holds a writer thread and locks and stays in the flow's process. A task on another
process or machine gets a `RunLog` instead: the tracking URI and the run id, which pickle; in the task's
process it logs through an `MlflowClient` of its own with that explicit run id, on a writer thread of its
own (`writer.Writer`: the training loop never waits on the network), collecting metrics for a few seconds
per request. The flow later uploads whatever of the training history did not arrive (`logged_epochs`).
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Mapping
from typing import Any

from . import record as rec
from .writer import NotLogged, Writer

_FLUSH_S = 5.0  # metrics reach MLflow at most this late


def epoch_items(metrics: Mapping[str, float], step: int) -> list[tuple[str, float, int]]:
    """(key, value, step) of one epoch's metrics plus the process's peak memory and CPU seconds so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return [*((k, float(v), step) for k, v in metrics.items()),
            ("system/max_rss_mb", usage.ru_maxrss / 1024, step),
            ("system/process_cpu_s", usage.ru_utime + usage.ru_stime, step)]


class RunLog:
    """The trainer's per-epoch callback for one MLflow run, usable in any process (pickles as URI and run id)."""

    def __init__(self, uri: str, run_id: str, *, retries: int = 5, backoff_s: float = 1.0) -> None:
        self.uri, self.run_id, self.retries, self.backoff_s = uri, run_id, retries, backoff_s
        self._writer: Writer | None = None  # started at the first write, in the process that logs
        self._client: Any = None
        self._pending: list[Any] = []
        self._sent = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "retries": self.retries, "backoff_s": self.backoff_s}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state.pop("uri"), state.pop("run_id"), **state)  # type: ignore[misc]

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        """Collect one epoch's metrics; send what was collected once `_FLUSH_S` passed since the last send."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, v, now, s) for k, v, s in epoch_items(metrics, step) if math.isfinite(v)]
        if time.monotonic() - self._sent >= _FLUSH_S:
            self._send()

    def tag(self, tags: Mapping[str, str]) -> None:
        """Queue tags on the run."""
        from mlflow.entities import RunTag

        items = [RunTag(k, v) for k, v in rec.safe(tags).items()]
        self._open().submit(f"tags {', '.join(tags)}", lambda: self._client.log_batch(self.run_id, tags=items),
                            self.run_id)

    def close(self, timeout_s: float = 60.0) -> list[NotLogged]:
        """Send what is collected and wait for every queued write; returns the writes that were not logged."""
        if self._writer is None and not self._pending:
            return []
        self._send()
        writer, self._writer = self._open(), None
        writer.close(timeout_s)
        return list(writer.not_logged)

    def _send(self) -> None:
        batch, self._pending, self._sent = self._pending, [], time.monotonic()
        for i in range(0, len(batch), 1000):
            chunk = batch[i : i + 1000]
            self._open().submit("metrics", lambda c=chunk: self._client.log_batch(self.run_id, metrics=c), self.run_id)

    def _open(self) -> Writer:
        if self._writer is None:
            import mlflow

            from .session import _ENV_DEFAULTS

            for key, value in _ENV_DEFAULTS.items():
                os.environ.setdefault(key, value)
            self._client = mlflow.MlflowClient(self.uri)
            self._writer = Writer(retries=self.retries, backoff_s=self.backoff_s)
        return self._writer


def logged_epochs(client: Any, run_id: str, history: list[dict[str, float]]) -> int:
    """The last epoch of `history` that reached the run (0 if none): the latest step of its first metric."""
    keys = [k for k in (history[-1] if history else {}) if k != "epoch"]
    if not keys:
        return 0
    return max((int(m.step) for m in client.get_metric_history(run_id, keys[0])), default=0)
