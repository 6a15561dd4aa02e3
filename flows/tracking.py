"""MLflow tracking for the flow: one parent run per flow run, one nested child run per variant.

Tasks run in threads, and MLflow's fluent active run is thread-local, so everything here goes
through `MlflowClient` with explicit run ids. With tracking disabled every method is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from ae_repr.config import ExperimentConfig

log = logging.getLogger(__name__)


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

    @classmethod
    def start(cls, cfg: ExperimentConfig, out_dir: Path, info: dict[str, Any]) -> Tracker:
        """Open the parent run (when enabled) and make this the tracker tasks see."""
        tracker = cls(cfg, out_dir, info)
        cls._current = tracker
        return tracker

    @classmethod
    def current(cls) -> Tracker:
        """The tracker of the flow run in this process."""
        assert cls._current is not None, "Tracker.start() was not called"
        return cls._current

    def start_variant(self, variant: str) -> str | None:
        """Open the variant's child run; returns its id."""
        return None

    def metric_logger(self, run_id: str | None) -> Callable[[dict[str, float], int], None] | None:
        """A per-epoch metrics callback for the trainer."""
        return None

    def eval_logger(self, run_id: str | None) -> Callable[[dict[str, float]], None] | None:
        """An evaluation metrics callback."""
        return None

    def log_results(self, out_dir: Path, runs: dict[str, str | None], failures: dict[str, str]) -> None:
        """Artifacts, eval metrics and models of every variant, and the parent's summary."""

    def finish(self, failures: dict[str, str]) -> None:
        """Close the runs: FAILED for failed variants."""
