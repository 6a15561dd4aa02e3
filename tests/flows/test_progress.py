"""Progress of `ae-repr run`: the model's counts and lines (an injected clock), the log records that feed it,
the console lines it replaces, and the planned task runs of a config."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.progress import Progress
from flows.progress_log import epoch_reporter, render, showing_progress, task_started

PLANNED = ["prepare-data", "train-ae", "train-vae", "extract-ae", "extract-vae", "evaluate-ae", "evaluate-pca"]


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def progress(clock: Clock, planned: list[str] = PLANNED) -> Progress:
    return Progress(planned, epochs=200, max_steps=6000, interval_s=10.0, clock=clock)


def test_counts_finished_runs_of_the_planned_total_cached_and_failed_included(clock: Clock) -> None:
    p = progress(clock)
    assert p.total == 7 and p.counter() == "[0/7]"
    assert p.finish("k0", "prepare-data", "Completed") == "done prepare-data"  # never seen starting: no duration
    p.start("k1", "train-ae", "training")
    clock.now += 12.34
    assert p.finish("k1", "train-ae", "Completed") == "done train-ae (12.3 s)"
    assert p.finish("k2", "extract-ae", "Cached") == "cached extract-ae"
    p.start("k3", "train-vae", "training")
    clock.now += 75
    assert p.finish("k3", "train-vae", "Failed") == "FAILED train-vae (1m15s)"
    assert p.finish("k4", "evaluate-ae", "Crashed") == "FAILED (Crashed) evaluate-ae"
    assert p.counter() == "[5/7]"


def test_a_run_whose_input_failed_takes_its_planned_place_and_close_counts_the_rest(clock: Clock) -> None:
    p = progress(clock)
    for name in ("prepare-data", "train-ae", "extract-ae", "evaluate-ae"):
        p.finish(name, name, "Completed")
    p.finish("t", "train-vae", "Failed")
    # Prefect names a run it could not start by its task and a random key: it stands for extract-vae
    assert p.finish("x", "extract-5de", "NotReady") == "not run extract-5de"
    assert p.counter() == "[6/7]"
    assert p.close() == "not run: evaluate-pca"
    assert p.counter() == "[7/7]"
    assert p.close() is None and p.counter() == "[7/7]"


def test_close_says_nothing_when_every_planned_run_finished(clock: Clock) -> None:
    p = progress(clock, ["train-beta_vae", "train-beta_vae", "summarize"])  # repeated names are separate runs
    for key, name in enumerate(["train-beta_vae", "summarize", "train-beta_vae"]):
        p.finish(str(key), name, "Completed")
    assert p.close() is None and p.counter() == "[3/3]"


def test_line_lists_running_runs_with_epoch_step_validation_subtask_and_phases(clock: Clock) -> None:
    p = progress(clock, PLANNED + ["a", "b", "c"])  # 10 planned: the counter pads to two digits
    p.start("t", "train-hier_vae", "training")
    clock.now += 5
    p.start("e", "evaluate-ae", "evaluation")
    p.subtask("e", "knn")
    p.subtask("e", "fewshot_finetune")  # the latest sub-task is the one running
    p.epoch("t", 40, {"step": 1200.0, "val/loss": 88.14, "train/loss": 90.0})
    p.start("x", "extract-vae", "extraction")
    clock.now += 7
    p.finish("p", "evaluate-pca", "Completed")
    line = p.line("done evaluate-pca (12.3 s)")
    assert line == ("[ 1/10] done evaluate-pca (12.3 s) | running: "
                    "train-hier_vae epoch 40/200 step 1200/6000 val loss 88.14 (12.0 s), "
                    "evaluate-ae fewshot_finetune (7.0 s), extract-vae (7.0 s) | phase: training, evaluation, extraction")
    assert p.line("done x", running=False) == "[ 1/10] done x"
    views = {v.name: v for v in p.views()}
    assert views["train-hier_vae"].fraction == pytest.approx(0.2)  # steps bind: 1200/6000 > 40/200
    assert views["evaluate-ae"].fraction is None


def test_training_fraction_follows_the_epoch_cap_when_it_binds_first(clock: Clock) -> None:
    p = Progress(["train-ae"], epochs=10, max_steps=6000, clock=clock)
    p.start("t", "train-ae", "training")
    p.epoch("t", 4, {"step": 40.0})
    assert p.views()[0].fraction == pytest.approx(0.4)
    assert p.views()[0].detail == "epoch 4/10 step 40/6000"  # no validation split: no val loss


def test_heartbeat_at_most_once_per_interval_and_a_finish_line_counts_as_one(clock: Clock) -> None:
    p = progress(clock)
    assert p.heartbeat() is None  # nothing running
    p.start("t", "train-ae", "training")
    clock.now += 9.9
    assert p.heartbeat() is None
    clock.now += 0.1
    beat = p.heartbeat()
    assert beat == "[0/7] running: train-ae (10.0 s) | phase: training"
    assert p.heartbeat() is None  # just reported
    clock.now += 6
    p.start("v", "train-vae", "training")
    p.line("done prepare-data")  # a finish line lists (and so reports) every running run
    clock.now += 9
    assert p.heartbeat() is None
    clock.now += 1
    assert p.heartbeat() == "[0/7] running: train-ae (26.0 s), train-vae (10.0 s) | phase: training"


def test_updates_for_unknown_runs_are_ignored(clock: Clock) -> None:
    p = progress(clock)
    p.epoch("nobody", 1, {"step": 1.0})
    p.subtask("nobody", "knn")
    assert p.views() == []


def test_render_shows_the_count_and_a_row_per_running_run(clock: Clock) -> None:
    from rich.console import Console

    p = progress(clock)
    p.start("t", "train-ae", "training")
    p.epoch("t", 3, {"step": 30.0, "val/loss": 120.0})
    p.start("e", "evaluate-pca", "evaluation")
    p.subtask("e", "knn")
    console = Console(file=io.StringIO(), width=140, color_system=None)
    console.print(render(p))
    text = console.file.getvalue()
    assert "[0/7]" in text and "training, evaluation" in text
    assert "train-ae" in text and "epoch 3/200 step 30/6000 val loss 120" in text
    assert "evaluate-pca" in text and "knn" in text


# --- fed by log records ---------------------------------------------------------------------------------

TASK_RUNS = logging.getLogger("prefect.task_runs")


def prefect_line(level: int, message: str, run_id: str, name: str, exc: BaseException | None = None) -> None:
    """A record as Prefect's task-run logger writes it (its adapter adds the run's id and name)."""
    TASK_RUNS.log(level, message, extra={"task_run_id": run_id, "task_run_name": name, "flow_run_name": "f"},
                  exc_info=(type(exc), exc, exc.__traceback__) if exc else None)


@pytest.fixture
def console() -> Iterator[io.StringIO]:
    """What a console handler on the root logger prints during the test."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    levels = {n: logging.getLogger(n).level for n in ("prefect.task_runs", "prefect")}
    logging.getLogger("prefect").setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _raised() -> BaseException:
    try:
        raise ValueError("bad weights")
    except ValueError as e:
        return e


def test_log_records_drive_plain_lines_and_the_console_loses_only_what_they_replace(console: io.StringIO) -> None:
    out = io.StringIO()
    with showing_progress(["prepare-data", "train-ae", "evaluate-ae", "plots-ae"], epochs=5, max_steps=100,
                          mode="plain", out=out) as p:
        prefect_line(logging.INFO, "Finished in state Completed()", "r0", "prepare-data")
        task_started("r1", "train-ae", "training")  # from the task run's own thread, like the trainer's epochs
        epoch_reporter("ae", None)({"step": 10.0, "val/loss": 50.0}, 1)
        task_started("r2", "evaluate-ae", "evaluation")
        logging.getLogger("evaluation.pipeline").debug("%s: %s started", "ae", "knn", extra={"eval_task": "knn"})
        assert [v.detail for v in p.views()] == ["epoch 1/5 step 10/100 val loss 50", "knn"]
        logging.getLogger("evaluation.pipeline").info("ae: knn done in 0.1s (1 rows)", extra={"eval_task": "knn"})
        prefect_line(logging.INFO, "Finished in state Cached(type=COMPLETED)", "r1", "train-ae")
        prefect_line(logging.ERROR, "Task run failed with exception: ValueError('bad weights')", "r2", "evaluate-ae",
                     exc=_raised())
        prefect_line(logging.ERROR, "Finished in state Failed('Task run encountered an exception')", "r2",
                     "evaluate-ae")
        logging.getLogger("flows.anything").warning("an unrelated warning")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[1/4] done prepare-data"
    assert lines[1].startswith("[2/4] cached train-ae (") and "| running: evaluate-ae knn (" in lines[1]
    assert lines[2].startswith("[3/4] FAILED evaluate-ae (")
    assert lines[3] == "[4/4] not run: plots-ae"
    shown = console.getvalue()
    assert "Finished in state" not in shown and "Completed" not in shown and "Cached" not in shown
    assert "knn" not in shown and "epoch" not in shown and "started" not in shown
    assert "evaluate-ae: Task run failed with exception: ValueError('bad weights')" in shown
    assert "evaluate-ae: Failed('Task run encountered an exception')" in shown
    assert "Traceback" not in shown  # the message says it; --debug shows the traceback
    assert "an unrelated warning" in shown


def test_after_the_block_nothing_is_listened_to_or_hidden(console: io.StringIO) -> None:
    out = io.StringIO()
    with showing_progress(["a"], epochs=1, max_steps=1, mode="plain", out=out):
        prefect_line(logging.INFO, "Finished in state Completed()", "r", "a")
    prefect_line(logging.INFO, "Finished in state Completed()", "s", "b")
    assert out.getvalue() == "[1/1] done a\n"
    assert console.getvalue() == "Finished in state Completed()\n"


def test_quiet_shows_no_progress_but_still_names_failures(console: io.StringIO) -> None:
    out = io.StringIO()
    with showing_progress(["a", "b"], epochs=1, max_steps=1, mode="off", out=out):
        prefect_line(logging.INFO, "Finished in state Completed()", "r", "a")
        prefect_line(logging.ERROR, "Finished in state Failed('boom')", "s", "b")
    assert out.getvalue() == ""
    assert console.getvalue().splitlines() == ["b: Failed('boom')"]


def test_debug_keeps_every_line_and_traceback(console: io.StringIO) -> None:
    out = io.StringIO()
    with showing_progress(["a", "b"], epochs=1, max_steps=1, mode="plain", out=out, keep_all=True):
        prefect_line(logging.INFO, "Finished in state Completed()", "r", "a")
        prefect_line(logging.ERROR, "Task run failed with exception: ValueError('bad weights')", "s", "b",
                     exc=_raised())
    shown = console.getvalue()
    assert "a: Completed()" in shown and "Traceback" in shown and "ValueError: bad weights" in shown
    assert "b: Task run failed with exception: ValueError('bad weights')" in shown
    assert out.getvalue().startswith("[1/2] done a")


# --- what the flow plans ---------------------------------------------------------------------------------

def test_planned_tasks_name_every_run_the_flow_submits() -> None:
    from ae_repr.config import load_config
    from flows.pretrain_and_probe import planned_tasks

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "quick.yaml").with_overrides(variants=["ae", "vae"])
    d = cfg.model_dump(mode="json")
    d["eval"].update(baselines=["raw", "pca"], applications=["anomaly", "rate_distortion"], rd_betas=[0.5, 2.0])
    from ae_repr.config import validate_config

    names = planned_tasks(validate_config(d))
    assert sorted(names) == sorted([
        "prepare-data", "train-ae", "train-vae", "train-beta_vae", "train-beta_vae", "extract-ae", "extract-vae",
        "baselines", "evaluate-ae", "evaluate-vae", "evaluate-raw", "evaluate-pca",
        "evaluate-application_baselines", "beta-sweep", "plots-ae", "plots-vae", "summarize"])
    d["eval"].update(applications=[])
    plain = planned_tasks(validate_config(d))
    assert "beta-sweep" not in plain and "train-beta_vae" not in plain
    assert "evaluate-application_baselines" not in plain and len(plain) == len(names) - 4


# --- the command line ------------------------------------------------------------------------------------

def test_evaluation_sub_tasks_reach_the_display_and_leave_the_console(console: io.StringIO) -> None:
    """The contract with evaluation.pipeline: each sub-task's records carry `eval_task`, the first before it runs."""
    import pandas as pd

    from evaluation.pipeline import _runner

    seen: list[str] = []
    with showing_progress(["evaluate-ae"], epochs=1, max_steps=1, mode="off") as p:
        task_started("r", "evaluate-ae", "evaluation")
        run = _runner("ae", [], None)
        run("knn", lambda: seen.append(p.views()[0].detail) or pd.DataFrame())
        run("reduction", lambda: seen.append(p.views()[0].detail) or pd.DataFrame())
    assert seen == ["knn", "reduction"]
    assert "done in" not in console.getvalue()
