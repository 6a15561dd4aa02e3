"""One background thread that performs every MLflow write, with retries and back-off.

Training threads only enqueue (per-epoch metrics never wait on the network or on SQLite), and one
writer means one SQLite writer. When a write still fails after its retries the server is taken to be
down: the writer goes offline, records that write and every later one as not logged, and the run goes
on on disk (`ae-repr log-run OUT` uploads it later).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow error codes that no retry can fix: the request itself is wrong
_PERMANENT = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST", "BAD_REQUEST",
              "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED", "ENDPOINT_NOT_FOUND"}


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry may fix: connection failures, timeouts, 5xx, a locked database."""
    code = getattr(exc, "error_code", None)
    if code is not None:
        return code not in _PERMANENT
    return isinstance(exc, (OSError, TimeoutError)) or exc.__class__.__module__.startswith(("requests", "urllib3",
                                                                                           "sqlalchemy"))


@dataclass
class NotLogged:
    """One write that did not reach MLflow."""

    what: str
    run_id: str | None
    error: str
    at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))


class Writer:
    """A FIFO of MLflow writes run on one daemon thread, each retried with exponential back-off."""

    def __init__(self, *, retries: int = 5, backoff_s: float = 1.0, max_backoff_s: float = 16.0) -> None:
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.offline_since: str | None = None
        self.not_logged: list[NotLogged] = []
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, str | None, Callable[[], Any], Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="mlflow-writer", daemon=True)
        self._thread.start()

    @property
    def offline(self) -> bool:
        """True once a write failed for good: later writes are recorded, not attempted."""
        return self.offline_since is not None

    def on_writer_thread(self) -> bool:
        """True when called from a write being run (its own writes then run at once)."""
        return threading.current_thread() is self._thread

    def submit(self, what: str, fn: Callable[[], T], run_id: str | None = None) -> Future[T | None]:
        """Queue a write; the future resolves to its result, or None when it was not logged."""
        fut: Future[T | None] = Future()
        if self.on_writer_thread():
            # a write queued by a running write is part of it: run it now, or a drain could overtake it
            fut.set_result(self._run(what, run_id, fn))
        else:
            self._queue.put((what, run_id, fn, fut))
        return fut

    def call(self, what: str, fn: Callable[[], T], run_id: str | None = None) -> T | None:
        """Run a write in order with the queued ones and wait for it; None when it was not logged."""
        return self.submit(what, fn, run_id).result()

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is done; False on timeout."""
        done = self.submit("drain", lambda: True)
        try:
            return bool(done.result(timeout=timeout_s))
        except TimeoutError:
            return False

    def close(self, timeout_s: float | None = None) -> bool:
        """Finish the queue and stop the thread; False when it did not finish in time."""
        finished = self.drain(timeout_s)
        self._queue.put(None)
        return finished

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            what, run_id, fn, fut = item
            fut.set_result(self._run(what, run_id, fn))

    def _run(self, what: str, run_id: str | None, fn: Callable[[], T]) -> T | None:
        if what == "drain":
            return fn()
        if self.offline:
            self._record(what, run_id, f"not attempted: MLflow unreachable since {self.offline_since}")
            return None
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # every failure is recorded: the run must go on
                error = f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
                if not is_transient(e):
                    log.warning("MLflow: %s failed: %s", what, error)
                    self._record(what, run_id, error)
                    return None
                if attempt == self.retries:
                    self.offline_since = datetime.now(timezone.utc).isoformat(timespec="seconds")
                    log.warning("MLflow unreachable: %s failed after %d attempts (%s); the run goes on without "
                                "tracking", what, attempt + 1, error)
                    self._record(what, run_id, error)
                    return None
                log.info("MLflow: %s failed (%s); retrying in %.1fs", what, error, delay)
                time.sleep(delay)
                delay = min(delay * 2, self.max_backoff_s)
        return None  # unreachable: the loop returns

    def _record(self, what: str, run_id: str | None, error: str) -> None:
        with self._lock:
            self.not_logged.append(NotLogged(what, run_id, error))
