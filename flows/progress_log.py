"""`ae-repr run`'s progress display, fed by log records: the flow's own progress events (a task run began, a
training epoch ended), evaluation's sub-task records and Prefect's "Finished in state ..." lines.

`showing_progress` listens while the flow runs and shows a `flows.progress.Progress` as plain lines (logs,
pipes) or a live display (a terminal); it hides the console lines the display replaces and names the task
run in the ones it keeps. Records still reach every other handler (Prefect's API) unchanged. Without a
listener the progress events are DEBUG records nobody creates: deployment runs are untouched.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Literal, TextIO

from .progress import Progress, duration

if TYPE_CHECKING:
    from rich.console import RenderableType

EVENTS = logging.getLogger("flows.progress")
# the loggers whose records feed the display: task runs' own (Prefect's final-state lines), the flow's events,
# and evaluation's per-representation sub-tasks (records carrying `eval_task`)
SOURCES = ("prefect.task_runs", EVENTS.name, "evaluation.pipeline")
FINISHED = re.compile(r"Finished in state (\w+)\(")
EpochLog = Callable[[dict[str, float], int], None]
Mode = Literal["live", "plain", "off"]


def task_started(task_run_id: str, name: str, phase: str) -> None:
    """Announce that a task run began its work in `phase` (training, evaluation...)."""
    EVENTS.debug("%s: %s started", name, phase, extra={"progress_start": (task_run_id, name, phase)})


def epoch_reporter(name: str, log_fn: EpochLog | None) -> EpochLog:
    """The trainer's epoch callback for model `name`: announces each epoch, then calls `log_fn` (tracking) if given."""

    def on_epoch(metrics: dict[str, float], epoch: int) -> None:
        EVENTS.debug("%s: epoch %d", name, epoch, extra={"progress_epoch": (epoch, metrics)})
        if log_fn is not None:
            log_fn(metrics, epoch)

    return on_epoch


def finished_state(record: logging.LogRecord) -> str | None:
    """The state name of a task or flow run's "Finished in state X(...)" record, else None."""
    if not record.name.startswith("prefect.") or not isinstance(record.msg, str):
        return None
    m = FINISHED.match(record.getMessage())
    return m.group(1) if m else None


class _Listener(logging.Filter):
    """On the source loggers: turns records into progress and shows the lines; keeps every record."""

    def __init__(self, progress: Progress, show: Callable[[str], None] | None) -> None:
        super().__init__()
        self.progress, self.show = progress, show
        self._keys: dict[int | None, str] = {}  # thread -> its task run: the trainer and evaluation name none

    def filter(self, record: logging.LogRecord) -> bool:
        p = self.progress
        if (start := getattr(record, "progress_start", None)) is not None:
            self._keys[record.thread] = start[0]
            p.start(*start)
        elif (epoch := getattr(record, "progress_epoch", None)) is not None:
            p.epoch(self._keys.get(record.thread, ""), *epoch)
        elif (task := getattr(record, "eval_task", None)) is not None and record.levelno < logging.INFO:
            p.subtask(self._keys.get(record.thread, ""), task)
        elif (state := finished_state(record)) is not None and hasattr(record, "task_run_id"):
            event = p.finish(str(record.task_run_id), getattr(record, "task_run_name", "?"), state)
            if self.show is not None:
                self.show(event)
        return True


class _Console(logging.Filter):
    """On the console handlers: hides the records the display stands for (all of them kept with `--debug`)."""

    def __init__(self, keep_all: bool) -> None:
        super().__init__()
        self.keep_all = keep_all

    def filter(self, record: logging.LogRecord) -> bool:
        if self.keep_all:
            return True
        if hasattr(record, "progress_start") or hasattr(record, "progress_epoch") or hasattr(record, "eval_task"):
            return False
        state = finished_state(record)
        return state is None or state not in ("Completed", "Cached") or not hasattr(record, "task_run_name")


class _Named(logging.Formatter):
    """Names the run in Prefect's own run lines: `train-vae: Failed(...)`, `train-vae: Task run failed with ...`;
    their tracebacks only with `keep_all` (`--debug`), the exception's message being in the line."""

    def __init__(self, inner: logging.Formatter | None, keep_all: bool) -> None:
        super().__init__()
        self.inner, self.keep_all = inner or logging.Formatter(), keep_all

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        task, flow = getattr(record, "task_run_name", None), getattr(record, "flow_run_name", None)
        name = task or (f"flow run {flow!r}" if flow else None)
        if name is None or not (finished_state(record) or (task and message.startswith("Task run "))):
            return self.inner.format(record)
        named = f"{name}: {message.removeprefix('Finished in state ')}"
        return self.inner.format(record).replace(message, named, 1) if self.keep_all else named


@contextmanager
def _plain(progress: Progress, out: TextIO) -> Iterator[Callable[[str], None]]:
    """Lines on `out`: one per finished task run, and one when a running one went `interval_s` unmentioned."""
    lock, stop = threading.Lock(), threading.Event()

    def write(text: str) -> None:
        with lock:
            out.write(text + "\n")
            out.flush()

    def beat() -> None:
        while not stop.wait(1.0):
            if (text := progress.heartbeat()) is not None:
                write(text)

    ticker = threading.Thread(target=beat, name="progress-heartbeat", daemon=True)
    ticker.start()
    try:
        yield lambda event: write(progress.line(event))
    finally:
        stop.set()
        ticker.join()


@contextmanager
def _live(progress: Progress, out: TextIO) -> Iterator[Callable[[str], None]]:
    """A display redrawn in place below the log: the count, a bar per running task run; finished ones above it."""
    from rich.console import Console
    from rich.live import Live

    console = Console(file=out)
    before = {id(sys.stdout): "stdout", id(sys.stderr): "stderr"}
    with Live(console=console, get_renderable=lambda: render(progress), refresh_per_second=4, transient=True):
        # the console handlers hold the streams from before the display, which now redirects them: use its proxies
        moved = [(h, h.setStream(getattr(sys, before[id(h.stream)])))
                 for h in logging.getLogger().handlers
                 if isinstance(h, logging.StreamHandler) and id(h.stream) in before]
        try:
            yield lambda event: console.print(progress.line(event, running=False), markup=False, highlight=False)
        finally:
            for handler, stream in moved:
                handler.setStream(stream)


def render(progress: Progress) -> RenderableType:
    """The live display: the count and phases over one row per running task run (a bar for training)."""
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    views = progress.views()
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(width=30)
    grid.add_column(overflow="ellipsis", no_wrap=True)
    grid.add_column(justify="right", no_wrap=True)
    grid.add_row(Text(progress.counter(), style="bold"), ProgressBar(total=max(progress.total, 1), completed=progress.done),
                 Text(", ".join(dict.fromkeys(v.phase for v in views))),
                 Text(duration(progress.clock() - progress.started)))
    for v in views:
        bar = ProgressBar(total=1.0, completed=v.fraction) if v.fraction is not None else ProgressBar(total=None)
        grid.add_row(Text("  " + v.name), bar, Text(v.detail), Text(duration(v.elapsed_s)))
    return grid


@contextmanager
def showing_progress(planned: Sequence[str], *, epochs: int, max_steps: int, mode: Mode, keep_all: bool = False,
                     out: TextIO | None = None, interval_s: float = 10.0) -> Iterator[Progress]:
    """While the block runs a flow: progress as `mode` says on `out` (stdout), replacing Prefect's per-task
    "Finished in state Completed()" lines; failures stay on the console with the task run's name."""
    out = out or sys.stdout
    progress = Progress(planned, epochs=epochs, max_steps=max_steps, interval_s=interval_s)
    with ExitStack() as stack:
        show = None if mode == "off" else stack.enter_context((_live if mode == "live" else _plain)(progress, out))
        listener, console = _Listener(progress, show), _Console(keep_all)
        for name in SOURCES:
            logger = logging.getLogger(name)
            logger.addFilter(listener)
            stack.callback(logger.removeFilter, listener)
        for name in (EVENTS.name, "evaluation.pipeline"):  # their DEBUG records are the progress events
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.DEBUG)
        for handler in logging.getLogger().handlers:
            handler.addFilter(console)
            stack.callback(handler.removeFilter, console)
            stack.callback(handler.setFormatter, handler.formatter)
            handler.setFormatter(_Named(handler.formatter, keep_all))
        yield progress
        if show is not None and (event := progress.close()) is not None:
            show(event)
