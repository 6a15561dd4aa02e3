"""Kill `ae-repr run` anywhere and lose nothing: SIGKILL at ten points spread over a run, the same command again
each time, and the end is what an uninterrupted run gives.

One chain of attempts into one folder: each attempt is killed at the next point (data loading, mid-training,
after training, extraction, the baselines' and the variants' evaluation, the figures, the summary, the tracking
uploads, the registry), the next one goes on from what the killed one left. After every kill: nothing the run
started is alive and every output file present reads back. At the end: the summary equals an uninterrupted
run's (timings aside), no temporary file is left, the registry holds one version per model with its
champion alias (a rerun recognises weights registered already, also by a killed attempt), `tracking_pending.json` is gone, and no MLflow run is left RUNNING.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from reliability_helpers import CLI, ROOT, cli_env, write_config

from ae_repr.io import lock_path

pytestmark = [pytest.mark.scenario, pytest.mark.timeout(1500)]  # `make test-scenarios`

VARIANTS = ("ae", "vae")
Trigger = Callable[[str, Path, Path], bool]  # (the attempt's output so far, out folder, MLflow folder)


def _line(pattern: str) -> Trigger:
    return lambda log, out, ml: re.search(pattern, log) is not None


def _mid_training(log: str, out: Path, ml: Path) -> bool:
    return any((out / "models" / v / "checkpoint.pt").is_file() and not (out / "models" / v / "model.pt").is_file()
               for v in VARIANTS)


def _uploaded(log: str, out: Path, ml: Path) -> bool:
    return (ml / "mlartifacts").is_dir() and any(p.is_file() for p in (ml / "mlartifacts").rglob("*"))


def _registered(log: str, out: Path, ml: Path) -> bool:
    return _versions(ml) > 0


# (kill point, when to kill): each attempt is killed once its trigger holds, in this order
KILL_POINTS: list[tuple[str, Trigger]] = [
    ("data loading", lambda log, out, ml: lock_path(out).is_file()),
    ("training", _mid_training),
    ("after training", _line(r"(done|cached) train-")),
    ("extraction", _line(r"(done|cached) extract-")),
    ("baseline evaluation", _line(r"(done|cached) evaluate-pca")),
    ("variant evaluation", _line(r"(done|cached) evaluate-(ae|vae)\b")),
    ("figures", _line(r"(done|cached) plots-")),
    ("summary", _line(r"done summarize")),
    ("tracking uploads", _uploaded),
    ("registry", _registered),
]


def _versions(ml: Path) -> int:
    db = ml / "mlflow.db"
    if not db.is_file():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from model_versions").fetchone()[0]
    except sqlite3.Error:  # the schema is still being made
        return 0


def _config(path: Path) -> Path:
    return write_config(path, {
        "models": {"variants": list(VARIANTS)},
        "train": {"epochs": 40, "checkpoint_every_s": 0},  # checkpoints every epoch: a kill lands mid-training
        "eval": {"applications": ["rate_distortion", "generation"], "nll_samples": 20, "nll_samples_min": 10,
                 "nll_max_rows": 50, "generation_samples": 100},
        "tracking": {"enabled": True, "log_plots": False},
    })


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen([*CLI, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _readable(out: Path) -> None:
    """Every output file present reads back (an atomic write's hidden temporary file aside)."""
    for p in out.rglob("*"):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix == ".parquet":
            pd.read_parquet(p)
        elif p.suffix == ".json":
            json.loads(p.read_text())


def _numbers(out: Path) -> pd.DataFrame:
    s = pd.read_parquet(out / "summary.parquet")
    s = s[~s["metric"].str.endswith("time_s") & (s["task"] != "training")]  # seconds differ between any two runs
    return s.sort_values(["representation", "task", "metric", "k"], ignore_index=True)


def test_kill_anywhere_then_rerun_gives_the_uninterrupted_result(tmp_path: Path) -> None:
    ml = tmp_path / "mlflow"
    ml.mkdir()
    env = {**cli_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{ml / 'mlflow.db'}",
           "PREFECT_HOME": str(tmp_path / "prefect")}  # the cache and the temporary API's database: this test's
    cfg = _config(tmp_path / "run.yaml")
    out = tmp_path / "out"
    args = ["run", "--config", str(cfg), "--out", str(out)]
    killed: list[str] = []
    for i, (point, trigger) in enumerate(KILL_POINTS):
        log = tmp_path / f"attempt-{i}.log"
        proc = _start(args, env, log)
        started = time.monotonic()
        while proc.poll() is None and not trigger(log.read_text(), out, ml):
            assert time.monotonic() - started < 600, f"{point}: no kill point within 600 s\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            killed.append(point)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 30
        while not _group_gone(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_gone(proc.pid), f"{point}: processes of the killed run outlived it"
        if out.is_dir():
            _readable(out)
        if proc.returncode == 0:  # finished before its kill point: the chain is done
            break
    assert len(killed) >= 8, f"killed only at {killed}"

    last = _start(args, env, tmp_path / "final.log")
    assert last.wait(timeout=900) == 0, (tmp_path / "final.log").read_text()[-4000:]

    reference = tmp_path / "reference"  # uninterrupted, into its own folder (its own cache keys) and MLflow store
    ref_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'reference-mlflow.db'}"}
    ref = subprocess.run([*CLI, "run", "--config", str(cfg), "--out", str(reference)], cwd=ROOT, env=ref_env,
                         capture_output=True, text=True, timeout=900)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]

    got, want = _numbers(out), _numbers(reference)
    keys = ["representation", "task", "metric", "k"]
    pd.testing.assert_frame_equal(got[keys], want[keys])
    for col in ("value", "ci_low", "ci_high"):
        a, b = got[col].to_numpy(float), want[col].to_numpy(float)
        bad = ~((abs(a - b) <= 1e-6) | (pd.isna(a) & pd.isna(b)))
        assert not bad.any(), got[keys + [col]][bad].assign(reference=b[bad])
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    assert not (out / "tracking_pending.json").exists()
    assert not lock_path(out).exists()

    from mlflow import MlflowClient

    client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    models = client.search_registered_models()
    versions = {m.name: client.search_model_versions(f"name = '{m.name}'") for m in models}
    assert sorted(versions) == [f"ae-repr-digits-{v}" for v in VARIANTS], sorted(versions)
    assert all(len(v) == 1 for v in versions.values()), {k: [x.version for x in v] for k, v in versions.items()}
    assert all("weights_sha256" in v[0].tags for v in versions.values())  # recognisable by a later rerun
    assert all(str(m.aliases.get("champion")) == "1" for m in models), {m.name: m.aliases for m in models}
    exp = client.get_experiment_by_name("pretrain-and-probe")
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.data.tags.get("ae_repr.out_dir")) for r in running]
