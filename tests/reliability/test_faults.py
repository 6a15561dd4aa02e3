"""Faults with real processes: SIGKILL during training, a diverging variant, garbage checkpoints and models,
and two runs into one output folder. Nothing finished may be lost; no failure may be a crash."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import background
import pandas as pd
import pytest
from reliability_helpers import (
    assert_one_line_error,
    describe,
    files_under,
    run_cli,
    start_cli,
    write_config,
)

from ae_repr.checkpoint import load_model
from ae_repr.io import exclusive_lock, lock_path, read_json


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started by `start_cli` and everything in its session (servers it started)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)


def tail(path: Path) -> str:
    return path.read_text()[-4000:] if path.is_file() else "(no log)"


def tmp_files(folder: Path) -> list[Path]:
    """Temporary files of atomic writes left in `folder`."""
    return [p for p in files_under(folder) if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------- SIGKILL


EPOCHS = 12


@pytest.mark.background  # CLI processes only: runs from the session's start
def test_sigkill_during_training_resumes_from_the_checkpoint(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "train.yaml", {"train": {"batch_size": 64, "checkpoint_every_s": 0}})
    out = tmp_path / "run"
    mdir = out / "models" / "vae"
    args = ["train", "--variant", "vae", "--dataset", "digits", "--config", cfg, "--epochs", str(EPOCHS),
            "--out", out]
    first = start_cli(*args, log=tmp_path / "first.log")
    try:
        wait_for(lambda: (mdir / "checkpoint.pt").is_file() or first.poll() is not None, 180, "the first checkpoint")
    finally:
        kill_group(first)
    assert first.returncode == -signal.SIGKILL, f"the run ended before the kill:\n{tail(tmp_path / 'first.log')}"
    assert not (mdir / "model.pt").exists(), "killed after training finished: the test did not test a crash"
    import torch

    done = torch.load(mdir / "checkpoint.pt", weights_only=True)["meta"]["epoch"]
    assert 1 <= done < EPOCHS
    (mdir / ".checkpoint.pt.x1y2z3.tmp").write_bytes(b"half a checkpoint")  # what a kill mid-write leaves

    res = run_cli(*args, timeout=300)
    assert res.returncode == 0, describe(res)
    found = re.search(r"resumed from epoch (\d+)", res.stdout + res.stderr)
    assert found, f"no 'resumed from epoch' message\n{describe(res)}"
    assert int(found.group(1)) == done
    epochs = [h["epoch"] for h in read_json(mdir / "history.json")]
    assert epochs == list(range(1, EPOCHS + 1)), f"epochs lost or repeated: {epochs}"
    assert read_json(mdir / "config.json")["epochs_run"] == EPOCHS
    loaded = load_model(mdir)
    assert loaded.variant == "vae" and loaded.model.latent_dim == 4
    assert not (mdir / "checkpoint.pt").exists(), "the checkpoint of a finished model must be removed"
    assert tmp_files(out) == [], f"leftover temporary files: {tmp_files(out)}"


# ---------------------------------------------------------------------------------------------- divergence


@pytest.mark.background  # CLI processes only: runs from the session's start
def test_diverging_training_fails_with_one_line_naming_variant_epoch_and_term(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "diverge.yaml", {"train": {"lr": 1e30, "epochs": 3}})
    out = tmp_path / "run"
    res = run_cli("train", "--variant", "vae", "--dataset", "digits", "--config", cfg, "--out", out)
    line = assert_one_line_error(res, 1, "vae", "non-finite")
    assert re.search(r"epoch \d+", line), f"the line does not name the epoch: {line}"
    assert re.search(r"(train|val)/\w+", line), f"the line does not name the loss term: {line}"
    assert not out.exists(), "a failed train must not leave the folder it created"


# ---------------------------------------------------------------------------------------------- garbage files


@pytest.mark.background  # CLI processes only: runs from the session's start
def test_garbage_checkpoint_and_model_files_are_not_a_crash(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "train.yaml", {"train": {"epochs": 2}})
    out = tmp_path / "run"
    mdir = out / "models" / "vae"
    mdir.mkdir(parents=True)
    args = ["train", "--variant", "vae", "--dataset", "digits", "--config", cfg, "--out", out]

    # a checkpoint that is garbage: warned about, training starts over
    (mdir / "checkpoint.pt").write_bytes(os.urandom(2048))
    res = run_cli(*args)
    assert res.returncode == 0 and "Traceback" not in res.stderr, describe(res)
    assert "checkpoint.pt" in res.stderr, f"no word about the unreadable checkpoint\n{describe(res)}"
    assert [h["epoch"] for h in read_json(mdir / "history.json")] == [1, 2]
    load_model(mdir)

    # the finished model's weights replaced by garbage: the same command trains again, it does not reuse them
    (mdir / "model.pt").write_bytes(os.urandom(2048))
    res = run_cli(*args)
    assert res.returncode == 0 and "Traceback" not in res.stderr, describe(res)
    assert "already trained" not in res.stdout, f"corrupt weights were reused\n{describe(res)}"
    assert "model.pt" in res.stderr, describe(res)
    load_model(mdir)


# ---------------------------------------------------------------------------------------------- concurrent runs


def lock_holder(out: Path) -> int | None:
    try:
        return int(json.loads(lock_path(out).read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def lock_is_free(out: Path) -> bool:
    """No lock, or one whose holder is gone (the next run takes it over)."""
    pid = lock_holder(out)
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _two_runs_into_one_folder(factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The processes of the lock and divergence test (a run costs tens of seconds here, so they start with the
    session: tests/background.py): a run whose vae diverges, a second run into its folder while the first holds
    the lock (the first is stopped with SIGSTOP meanwhile, so it cannot finish before the second starts), then a
    third run killed while it holds the lock. Returns what the test checks."""
    tmp, env = factory.mktemp("two_runs"), background.environ()
    # vae's beta is beyond float32, so its loss is infinite at epoch 1; ae must still finish and be reported
    cfg = write_config(tmp / "run.yaml", {"models": {"overrides": {"vae": {"hidden": [32], "beta": 1e39}}}})
    out = tmp / "run"
    args = ["run", "--config", cfg, "--variants", "ae,vae", "--epochs", "1", "--no-tracking", "--out", out]
    first = start_cli(*args, log=tmp / "first.log", env=env)
    try:
        wait_for(lambda: lock_holder(out) == first.pid or first.poll() is not None, 180, "the first run's lock")
        assert first.poll() is None, f"the first run ended early:\n{tail(tmp / 'first.log')}"
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = run_cli(*args, timeout=120, env=env)
            first_held_on = first.poll() is None and lock_holder(out) == first.pid
        finally:
            os.kill(first.pid, signal.SIGCONT)
        code = first.wait(timeout=420)
    finally:
        kill_group(first)
    found = {"out": out, "first_pid": first.pid, "first_code": code, "first_log": tail(tmp / "first.log"),
             "second": second, "first_held_on": first_held_on, "lock_free_after_first": lock_is_free(out)}

    # a holder that crashes leaves a stale lock, which the next run takes over
    third = start_cli(*args, log=tmp / "third.log", env=env)
    try:
        wait_for(lambda: lock_holder(out) == third.pid or third.poll() is not None, 180, "the third run's lock")
        assert third.poll() is None, f"the third run could not start:\n{tail(tmp / 'third.log')}"
        found["lock_free_while_third_runs"] = lock_is_free(out)
    finally:
        kill_group(third)
    return {**found, "third_code": third.returncode, "lock_free_after_third": lock_is_free(out)}


background.register("two_runs_into_one_folder", _two_runs_into_one_folder)


@pytest.fixture
def two_runs_into_one_folder(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return background.result("two_runs_into_one_folder", tmp_path_factory)


@pytest.mark.slow
def test_second_run_into_the_same_folder_is_refused_and_a_diverging_variant_fails_alone(
    two_runs_into_one_folder: dict[str, Any],
) -> None:
    """Two checks on one flow run: the folder lock, and divergence in the flow (vae's beta is beyond float32)."""
    found = two_runs_into_one_folder
    out = found["out"]
    line = assert_one_line_error(found["second"], 2, str(out), "using this folder", str(found["first_pid"]))
    assert found["first_held_on"], "the first run let go of the lock before the second was refused"
    assert "--out" in line
    assert found["first_code"] == 1, f"the run with a diverged variant must exit 1, got {found['first_code']}\n" \
                                     f"{found['first_log']}"
    assert found["lock_free_after_first"], "the lock outlived the run"

    # the first run completed: ae evaluated and summarized, vae marked as failed with the reason
    summary = pd.read_parquet(out / "summary.parquet")
    assert "ae" in set(summary["representation"]) and "vae" not in set(summary["representation"])
    assert ((summary["representation"] == "ae") & (summary["task"] == "linear_probe")).any()
    report = (out / "report.md").read_text()
    assert "vae" in report and "non-finite" in report, report
    assert (out / "models" / "ae" / "model.pt").is_file() and (out / "features" / "ae.parquet").is_file()
    assert not (out / "models" / "vae" / "model.pt").exists()

    # the killed third run's lock is stale: it does not count as held, and the next run takes it over
    assert not found["lock_free_while_third_runs"]
    assert found["third_code"] == -signal.SIGKILL
    assert found["lock_free_after_third"], "the lock of a killed run still counts as held"
    with exclusive_lock(out):
        assert lock_holder(out) == os.getpid()


def test_every_test_runs_in_ci() -> None:
    """Slow tests run in `make test` (the README's command); only `scenario` tests are left to
    `make test-scenarios`, and CI (.ci/run) runs both."""
    from reliability_helpers import ROOT

    addopts = [ln for ln in (ROOT / "pyproject.toml").read_text().splitlines() if ln.strip().startswith("addopts")]
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ntest:", 1)[1].split("\n\n", 1)[0]
    pytest_args = recipe.split("pytest", 1)[1]  # what follows `python -m pytest`
    for text in (*addopts, pytest_args):
        assert "slow" not in text, f"slow tests are deselected by: {text.strip()}"
    assert '-m "not scenario"' in pytest_args and not any("-m" in a.split() for a in addopts)
    scenarios = makefile.split("\ntest-scenarios:", 1)[1].split("\n\n", 1)[0]
    assert '-m scenario' in scenarios
    assert "make lint test test-scenarios" in (ROOT / ".ci" / "run").read_text()