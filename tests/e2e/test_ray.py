"""End to end on a real Ray cluster: `ae-repr run --executor ray` against a head and one extra worker node on
127.0.0.1 and a real `mlflow server`, compared with a threads run of the same config.

The head, the worker node and the MLflow server each run in their own process group (session) and are
stopped as groups; Ray's temp dir is a short folder under /tmp (its unix sockets have a path length limit).
Where the test may make a mount namespace (`unshare -m`, root), the worker node runs in one in which a
folder is hidden under an empty tmpfs: a run folder there is not shared, which the start check must refuse.
Every process under the test is sampled: their summed RSS is the run's peak memory.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
VARIANTS = ("ae", "vae")
SEEDS = (0, 1)  # a seed grid: each variant trains once per seed, as separate Ray tasks
MEMBERS = {f"{v}@seed={s}" for v in VARIANTS for s in SEEDS}
EPOCHS = 2
GIB = 1024**3

pytestmark = [pytest.mark.e2e, pytest.mark.scenario, pytest.mark.timeout(600)]  # a Ray cluster: `make test-scenarios`

sys.path.insert(0, str(ROOT / "scripts"))
import services as svc  # noqa: E402  (scripts/ is not a package)


def _env(**extra: str) -> dict[str, str]:
    """This checkout first on the path (the Ray nodes' workers import it too), no telemetry, no servers inherited."""
    env = {**os.environ, **svc.QUIET, "TQDM_DISABLE": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    for key in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    env.update(extra)
    return env


class _Sampler:
    """Every process under this one, sampled twice a second: peak summed RSS, and every (pid, start) seen."""

    def __init__(self) -> None:
        self.peak, self.seen = 0, set()
        self.cpu: dict[tuple[int, str], float] = {}  # (pid, start) -> CPU seconds, the latest sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @staticmethod
    def tree() -> dict[int, tuple[int, str, float]]:
        """pid -> (RSS bytes, start time, CPU seconds) of this process and its live descendants."""
        parent, info = {}, {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                stat = (d / "stat").read_text()
                rss = int((d / "statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ... (starttime is field 22)
            if fields[0] != "Z":
                cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
                parent[int(d.name)], info[int(d.name)] = int(fields[1]), (rss, fields[19], cpu)
        mine, grew = {os.getpid()}, True
        while grew:
            more = {p for p, pp in parent.items() if pp in mine} - mine
            grew, mine = bool(more), mine | more
        return {p: info[p] for p in mine if p in info}

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            procs = self.tree()
            self.peak = max(self.peak, sum(rss for rss, _, _ in procs.values()))
            self.seen |= {(p, start) for p, (_, start, _) in procs.items() if p != os.getpid()}
            self.cpu.update({(p, start): cpu for p, (_, start, cpu) in procs.items()})

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def left_running(self) -> list[int]:
        """The processes seen that still run (same pid and start time), wherever they were reparented to."""
        left = []
        for pid, start in self.seen:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] != "Z" and fields[19] == start:
                left.append(pid)
        return sorted(left)


@dataclass
class Stack:
    """The cluster, the MLflow server, and the two runs of one config."""

    tmp: Path
    ray_tmp: Path
    address: str
    mlflow: str
    config: Path
    groups: list[int]
    sampler: _Sampler
    private: Path | None  # a folder the worker node does not see (None: no mount namespace here)
    threads_out: Path = field(init=False)
    ray_out: Path = field(init=False)
    driver_pid: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _config(tmp: Path) -> Path:
    """configs/quick.yaml cut down: two variants, two epochs, one baseline, two applications, tracking on."""
    d = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    d["models"]["variants"] = list(VARIANTS)
    d["train"]["epochs"] = EPOCHS
    d["eval"].update({"baselines": ["pca"], "knn_k": [5], "applications": ["anomaly", "generation"]})
    d["tracking"] = {"enabled": True, "log_plots": False, "log_models": False}
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def _can_unshare() -> bool:
    unshare = shutil.which("unshare")
    return bool(unshare) and subprocess.run([unshare, "-m", "true"], capture_output=True).returncode == 0


def _wait_log(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text(errors="replace") if path.is_file() else ""):
        assert proc.poll() is None, f"{path.name}: exited: {path.read_text(errors='replace')[-2000:]}"
        assert time.monotonic() < deadline, f"{path.name}: no {text!r} within {timeout:.0f}s"
        time.sleep(0.5)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.5)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ae_repr.cli", "run", *args]


# the threads run: the CLI in a process that must not have imported Ray when it is done
_THREADS = ("import sys; from ae_repr.cli import main; code = main(sys.argv[1:]); "
            "bad = [m for m in sys.modules if m == 'ray' or m.startswith(('ray.', 'prefect_ray'))]; "
            "print('ray modules:', bad); sys.exit(code or (3 if bad else 0))")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ray_e2e")
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: unix socket paths under it
    sampler = _Sampler()
    port, mlflow_port = svc.free_port(), svc.free_port()
    mlflow = f"http://127.0.0.1:{mlflow_port}"
    groups: list[int] = []
    private = tmp / "private" if _can_unshare() else None
    started = time.monotonic()
    try:
        (tmp / "mlflow").mkdir()
        ml = svc.start_group([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
                              "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow' / 'mlflow.db'}",
                              "--artifacts-destination", str(tmp / "mlflow" / "artifacts")],
                             tmp / "mlflow.log", _env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        groups.append(ml.pid)
        node = ["--block", "--num-cpus", "1", "--object-store-memory", str(100 * 1024**2), "--node-ip-address",
                "127.0.0.1", "--disable-usage-stats", "--dashboard-agent-listen-port", str(svc.free_port())]
        head = svc.start_group([str(BIN / "ray"), "start", "--head", "--include-dashboard=false", "--temp-dir",
                                str(ray_tmp), "--port", str(port), "--ray-client-server-port", str(svc.free_port()),
                                *node], tmp / "head.log", _env())
        groups.append(head.pid)
        stack = Stack(tmp, ray_tmp, f"127.0.0.1:{port}", mlflow, _config(tmp), groups, sampler, private)
        stack.threads_out, stack.ray_out = tmp / "threads", tmp / "ray"
        # the reference run on threads, while the servers start
        threads = subprocess.Popen([sys.executable, "-c", _THREADS, "run", "--config", str(stack.config), "--out",
                                    str(stack.threads_out), "--seeds", "0,1", "--no-tracking", "--quiet"],
                                   env=_env(), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_port(port, head, 180)  # the head's GCS answers: the worker node can join (it waits for the rest)
        worker_cmd = [str(BIN / "ray"), "start", "--address", stack.address, *node]
        if private is not None:  # the worker node sees an empty tmpfs where `private` is
            private.mkdir()
            worker_cmd = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{private}" && exec "$0" "$@"',
                          *worker_cmd]
        worker = svc.start_group(worker_cmd, tmp / "worker.log", _env())
        groups.append(worker.pid)
        _wait_log(tmp / "head.log", "Ray runtime started", head, 180)
        _wait_log(tmp / "worker.log", "Ray runtime started", worker, 180)
        svc.wait_http(f"{mlflow}/health", ml, 180, tmp / "mlflow.log")
        out, err = threads.communicate(timeout=400)
        assert threads.returncode == 0, (out + err)[-3000:]
        assert "ray modules: []" in out  # threads stayed without Ray
        stack.seconds["servers and threads run"] = time.monotonic() - started
        t0 = time.monotonic()
        run = subprocess.Popen(_cli("--config", str(stack.config), "--out", str(stack.ray_out), "--executor", "ray",
                                    "--ray-address", stack.address, "--seeds", "0,1"),
                               env=_env(MLFLOW_TRACKING_URI=mlflow), cwd=tmp, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
        stack.driver_pid = run.pid
        out, err = run.communicate(timeout=400)
        (tmp / "ray-run.log").write_text(out + err)
        assert run.returncode == 0, (out + err)[-3000:]
        stack.seconds["ray run"] = time.monotonic() - t0
        yield stack
    finally:
        svc.stop_groups(groups, timeout=5)  # `ray start` and gcs_server outlive SIGTERM: KILL after 5 s
        sampler.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _variant_runs(stack: Stack) -> dict[str, object]:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow)
    exp = client.get_experiment_by_name("pretrain-and-probe")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'parent'")
    assert parent.info.status == "FINISHED"
    return {r.info.run_name: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        if r.data.tags.get("variant")}  # the baselines' runs aside


def test_training_ran_in_ray_worker_processes(stack: Stack) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(stack.mlflow)
    runs = _variant_runs(stack)
    assert set(runs) == MEMBERS
    workers = {int(m.group(1)) for p in stack.ray_tmp.rglob("python-core-worker-*.log")
               if (m := re.search(r"_(\d+)\.log$", p.name))}
    for v, run in runs.items():
        host, pid = run.data.tags["ae_repr.worker"].rsplit(":", 1)
        assert host == socket.gethostname() and int(pid) != stack.driver_pid, run.data.tags["ae_repr.worker"]
        assert int(pid) in workers, (v, pid, sorted(workers))  # a process the Ray nodes started as a worker
        assert run.info.status == "FINISHED"
        history = client.get_metric_history(run.info.run_id, "train/loss")  # streamed once, not again at the end
        assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1)), [m.step for m in history]
        assert "eval/linear_probe_accuracy" in run.data.metrics


def _numbers(out: Path) -> pd.DataFrame:
    """summary.parquet without timings (wall-clock seconds differ between any two runs)."""
    df = pd.read_parquet(out / "summary.parquet")
    return df[~df["metric"].str.endswith("time_s")].sort_values(["representation", "task", "metric", "k"],
                                                                 ignore_index=True)


def test_same_numbers_as_threads(stack: Stack) -> None:
    threads, ray = _numbers(stack.threads_out), _numbers(stack.ray_out)
    keys = ["representation", "task", "metric", "k"]
    pd.testing.assert_frame_equal(threads[keys], ray[keys])
    assert len(ray) > 50 and set(ray["representation"]) >= {*VARIANTS, "pca"}
    for col in ("value", "ci_low", "ci_high"):
        a, b = threads[col].to_numpy(float), ray[col].to_numpy(float)
        assert ((abs(a - b) <= 1e-6) | (pd.isna(a) & pd.isna(b))).all(), threads[keys][abs(a - b) > 1e-6]


def test_the_summary_has_per_seed_and_aggregate_rows(stack: Stack) -> None:
    s = pd.read_parquet(stack.ray_out / "summary.parquet")
    probe = s[(s["task"] == "linear_probe") & (s["metric"] == "accuracy")].set_index("representation")
    assert set(probe.index) >= MEMBERS | set(VARIANTS)
    for v in VARIANTS:
        seeds = probe.loc[[f"{v}@seed={s}" for s in SEEDS], "value"]
        assert probe.loc[v, "n_seeds"] == 2 and probe.loc[v, "value"] == pytest.approx(seeds.mean())
        assert probe.loc[v, "ci_method"] == "pretraining_seeds" and probe.loc[v, "ci_low"] <= seeds.min()
    assert (stack.ray_out / "models" / f"{VARIANTS[0]}@seed=1" / "model.pt").is_file()


def test_timings_add_the_workers_phases(stack: Stack) -> None:
    from ae_repr.io import read_json

    timings = read_json(stack.ray_out / "timings.json")
    assert timings["executor"] == "ray"
    assert timings["phases"]["training"]["busy_s"] > 0 and timings["phases"]["evaluation"]["busy_s"] > 0
    assert not (stack.ray_out / ".phases").exists()


def test_run_folder_a_worker_does_not_see_is_refused(stack: Stack) -> None:
    if stack.private is None:
        pytest.skip("no mount namespace here (unshare -m): every node sees every folder")
    out = stack.private / "out"
    proc = subprocess.run(_cli("--config", str(stack.config), "--out", str(out), "--executor", "ray",
                               "--ray-address", stack.address, "--no-tracking"),
                          env=_env(), cwd=stack.tmp, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-3000:]
    assert err[0].startswith(f"ae-repr: error: run folder {out} is not shared with the Ray worker on "), err
    assert not out.exists()  # the folder the command created is removed again


def test_nothing_left_running(stack: Stack) -> None:
    """Last: stop the groups; no process the test started (servers, nodes, workers, drivers) may remain."""
    gone = svc.stop_groups(stack.groups, timeout=5)
    assert all(not svc.group_members(g) for g in gone), gone
    deadline = time.monotonic() + 20
    while (left := stack.sampler.left_running()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, [Path(f"/proc/{p}/cmdline").read_text(errors="replace")[:200] for p in left]
    peak = stack.sampler.peak
    print(f"\nray e2e: peak memory {peak / GIB:.2f} GiB (summed RSS of every process under the test), "
          f"{sum(stack.sampler.cpu.values()):.0f} CPU seconds in all; "
          + ", ".join(f"{k} {v:.0f}s" for k, v in stack.seconds.items()))
    print((stack.tmp / "ray-run.log").read_text()[-1500:])
    assert peak < 6 * GIB
