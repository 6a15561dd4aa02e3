"""What a flow run is doing, for the people watching it: task runs finished of the planned total, the running
ones and what each is at (a training epoch, an evaluation sub-task), and the plain lines that say so.

Pure bookkeeping and formatting, safe across threads; `flows.progress_log` feeds it from log records and
shows it. Nothing here knows Prefect.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# how a final state reads in a line; any other state (Failed, Crashed, TimedOut, Cancelled) is a failure
VERBS = {"Completed": "done", "Cached": "cached", "NotReady": "not run"}  # NotReady: an input of it failed


@dataclass
class Running:
    """One running task run and the latest news of it."""

    name: str
    phase: str
    since: float
    reported: float  # when a line last listed it
    epoch: int | None = None
    step: int | None = None
    val_loss: float | None = None
    subtask: str | None = None


@dataclass(frozen=True)
class View:
    """A running task run as a display shows it: name, what it is at, elapsed seconds, share of its budget."""

    name: str
    phase: str
    detail: str
    elapsed_s: float
    fraction: float | None  # training: the larger of epochs/cap and steps/budget; None when unknown


def duration(seconds: float) -> str:
    """`12.3 s`, `4m05s` or `1h02m`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


class Progress:
    """Task runs finished of `planned` (names, repeats allowed), the running ones, and throttled plain lines."""

    def __init__(self, planned: Sequence[str], *, epochs: int, max_steps: int, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.planned = list(planned)
        self.epochs, self.max_steps = epochs, max_steps
        self.interval_s = interval_s
        self.clock = clock
        self.started = clock()
        self.done = 0
        self._remaining = Counter(self.planned)
        self._running: dict[str, Running] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """How many task runs the flow submits when nothing fails."""
        return len(self.planned)

    def start(self, key: str, name: str, phase: str) -> None:
        """Task run `key` (named `name`) began its work in `phase` (a retry starts afresh)."""
        now = self.clock()
        with self._lock:
            self._running[key] = Running(name, phase, since=now, reported=now)

    def epoch(self, key: str, epoch: int, metrics: dict[str, float]) -> None:
        """A training epoch ended: the trainer's metrics (`step`, `val/loss`...) for that epoch."""
        with self._lock:
            if (run := self._running.get(key)) is not None:
                run.epoch = epoch
                run.step = int(metrics["step"]) if "step" in metrics else run.step
                run.val_loss = metrics.get("val/loss", run.val_loss)

    def subtask(self, key: str, task: str) -> None:
        """An evaluation sub-task (linear_probe, knn, fewshot_finetune...) of task run `key` began."""
        with self._lock:
            if (run := self._running.get(key)) is not None:
                run.subtask = task

    def finish(self, key: str, name: str, state: str) -> str:
        """Task run `key` reached its final state (`Completed`, `Cached`, `Failed`...): counted; the event's text."""
        with self._lock:
            run = self._running.pop(key, None)
            self.done += 1
            self._tick_off(name)
            verb = VERBS.get(state) or ("FAILED" if state == "Failed" else f"FAILED ({state})")
            took = f" ({duration(self.clock() - run.since)})" if run is not None else ""
            return f"{verb} {name}{took}"

    def close(self) -> str | None:
        """At the end of the flow run: the planned task runs that never ran (an input failed), now counted."""
        with self._lock:
            missing = sorted(self._remaining.elements())
            self.done += len(missing)
            self._remaining.clear()
            self._running.clear()
        return f"not run: {', '.join(missing)}" if missing else None

    def _tick_off(self, name: str) -> None:
        # a run that never began has no name of its own yet (Prefect's `extract-5de` for `extract-vae` whose input
        # failed): it takes the place of a planned run of the same task
        if name not in self._remaining:
            task = name.rsplit("-", 1)[0] + "-"
            name = next((n for n in sorted(self._remaining) if n.startswith(task)), name)
        self._remaining -= Counter({name: 1})

    def views(self) -> list[View]:
        """The running task runs, oldest first."""
        now = self.clock()
        with self._lock:
            runs = sorted(self._running.values(), key=lambda r: r.since)
            return [View(r.name, r.phase, self._detail(r), now - r.since, self._fraction(r)) for r in runs]

    def counter(self) -> str:
        """`[ 7/31]`: task runs finished of the total."""
        width = len(str(self.total))
        return f"[{self.done:>{width}}/{self.total}]"

    def line(self, event: str | None = None, *, running: bool = True) -> str:
        """One plain line: the counter, `event` if any, then (with `running`) the running task runs and phases."""
        parts = [event] if event else []
        if running:
            views = self.views()
            with self._lock:
                now = self.clock()
                for r in self._running.values():
                    r.reported = now
            if views:
                parts.append("running: " + ", ".join(
                    f"{v.name}{' ' + v.detail if v.detail else ''} ({duration(v.elapsed_s)})" for v in views))
                parts.append("phase: " + ", ".join(dict.fromkeys(v.phase for v in views)))
        return " ".join([self.counter(), " | ".join(parts)]).rstrip()

    def heartbeat(self) -> str | None:
        """A line of the running task runs when one of them went `interval_s` without a line, else None."""
        with self._lock:
            due = any(self.clock() - r.reported >= self.interval_s for r in self._running.values())
        return self.line() if due else None

    def _detail(self, run: Running) -> str:
        if run.epoch is not None:
            text = f"epoch {run.epoch}/{self.epochs} step {run.step}/{self.max_steps}"
            return text + (f" val loss {run.val_loss:.4g}" if run.val_loss is not None else "")
        return run.subtask or ""

    def _fraction(self, run: Running) -> float | None:
        if run.epoch is None:
            return None
        # training stops at whichever budget runs out first (or earlier, on a plateau)
        return min(1.0, max(run.epoch / self.epochs, (run.step or 0) / self.max_steps))
