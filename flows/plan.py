"""How a flow run lays out its work in one process: task runs side by side, models training at once, torch
threads per task. Light to import (no Prefect, no torch): `ae-repr run` sizes a run with it before the
temporary API and the flow's modules load."""

from __future__ import annotations

import os

from ae_repr.config import ExperimentConfig
from ae_repr.seeds import grid_members

TASK_WORKERS = 2  # task runs side by side in one flow run (threads)


def beta_sweep(cfg: ExperimentConfig) -> tuple[float, ...]:
    """The betas of the rate-distortion sweep, when the sweep applies (rate_distortion on, betas given)."""
    return cfg.eval.rd_betas if "rate_distortion" in cfg.eval.applications else ()


def trainings_at_once(cfg: ExperimentConfig) -> int:
    """Models that may train side by side in one process: the thread pool's task runs (a Ray task holds one)."""
    if cfg.orchestration.executor == "ray":
        return 1
    return min(TASK_WORKERS, len(grid_members(cfg)) + len(beta_sweep(cfg)))


def threads_per_task() -> int:
    """Torch threads for each task thread: the process's cores shared by the task runs side by side.

    Each Python thread that calls torch gets its own OpenMP team of torch's thread count: two task runs
    with two threads each on two cores ran training steps 4x slower (measured on digits) than with one.
    """
    return max(1, len(os.sched_getaffinity(0)) // TASK_WORKERS)
