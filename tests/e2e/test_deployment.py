"""End to end with real processes: Prefect server, MLflow server and a process worker (scripts/services.py,
on free loopback ports, state in a temporary folder), `prefect --no-prompt deploy --all` from the
checkout, then `prefect deployment run pretrain-and-probe/local --watch`.

Every process is started in its own process group and stopped by PID, also when a test fails; the
fixture's finalizer checks that none of them is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "services.py"
VARIANTS = ("ae", "vae")

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

sys.path.insert(0, str(ROOT / "scripts"))
import services as svc  # noqa: E402  (scripts/ is not a package)


@dataclass(frozen=True)
class Services:
    """The running services and the environment a client process needs."""

    state: Path
    env: dict[str, str]
    recorded: dict[str, Any]
    groups: set[int]  # every process group started for the tests, stopped (and checked) at the end

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the prefect CLI from the checkout root against the test server."""
        return subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


def _services(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--state-dir", str(state)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def services(tmp_path_factory) -> Iterator[Services]:
    """Prefect server + MLflow server + local-cpu worker; every process group stopped afterwards."""
    state = tmp_path_factory.mktemp("services")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(svc.QUIET, PREFECT_HOME=str(state / "client"), PYTHONUNBUFFERED="1",
               PREFECT_WORKER_QUERY_SECONDS="2")  # the worker polls every 2 s instead of 10
    groups: set[int] = set()
    try:
        res = _services(state, env, "start", "--prefect-port", str(svc.free_port()),
                        "--mlflow-port", str(svc.free_port()))
        recorded = json.loads((state / svc.STATE_FILE).read_text()) if (state / svc.STATE_FILE).is_file() else {}
        groups |= {e["pgid"] for e in recorded.values()}
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(recorded) == {"prefect-server", "mlflow-server", "worker"}
        for entry in recorded.values():
            assert entry.get("url", "http://127.0.0.1:").startswith("http://127.0.0.1:")  # loopback only
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", res.stdout, re.M))
        assert exports == svc.exports(recorded)
        yield Services(state, {**env, **exports, "COLUMNS": "200"}, recorded, groups)
    finally:
        # MLflow's job runners outlived SIGTERM for the whole default 20 s grace: the test waits 5 s
        stop = _services(state, env, "stop", "--grace", "5")
        print(stop.stdout)  # how long each group took to stop (shown with -s)
        left = {g: svc.group_members(g) for g in groups if svc.group_members(g)}
        for g in left:
            os.killpg(g, signal.SIGKILL)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert not left, f"process groups left running after `services.py stop`: {left}"


def _listening(port: int) -> str:
    """The local address a TCP port listens on, from /proc/net/tcp (v4) and tcp6."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                return addr
    return ""


@pytest.fixture(scope="module")
def deployed(services: Services) -> Services:
    """`prefect --no-prompt deploy --all` from the checkout root."""
    res = services.prefect("--no-prompt", "deploy", "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    return services


def _config(path: Path, tracking: bool = True, finetune: bool = False, **train: Any) -> Path:
    """configs/quick.yaml with a smaller evaluation and tracking on (to the test's MLflow server) or off."""
    d = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    d.setdefault("train", {}).update(train)
    d.setdefault("eval", {}).update({"baselines": ["pca"], "knn_k": [5],
                                     "fewshot_k": [5], "fewshot_finetune": finetune})
    d["tracking"] = {"enabled": tracking, "log_plots": False}
    path.write_text(yaml.safe_dump(d))
    return path


def _run_id(output: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def _api(services: Services) -> Any:
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(services.env["PREFECT_API_URL"])


def test_servers_bind_loopback_only(services: Services):
    for entry in (services.recorded["prefect-server"], services.recorded["mlflow-server"]):
        port = int(entry["url"].rsplit(":", 1)[1])
        assert _listening(port) == "0100007F", entry  # 127.0.0.1, not 0.0.0.0


def test_deploy_from_the_checkout_and_schedule(deployed: Services):
    with _api(deployed) as client:
        local = client.read_deployment_by_name("pretrain-and-probe/local")
        gpu = client.read_deployment_by_name("pretrain-and-probe/gpu")
        weekly = client.read_deployment_by_name("retrain/weekly-retrain")
        # no path in prefect.yaml: the pull step names the checkout `prefect deploy` ran in
        assert local.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert local.work_pool_name == "local-cpu" and gpu.work_pool_name == "gpu"
        assert gpu.job_variables["env"]["CUDA_VISIBLE_DEVICES"] == "0"
        ray = client.read_deployment_by_name("pretrain-and-probe/ray")  # the same flow, its tasks on Ray
        assert ray.entrypoint == local.entrypoint and ray.parameters == {"executor": "ray"}
        assert "RAY_ADDRESS" in ray.job_variables["env"]
        (schedule,) = weekly.schedules
        assert schedule.schedule.cron == "0 3 * * 0" and schedule.schedule.timezone == "UTC" and schedule.active
        # a real server's scheduler turns the cron into scheduled runs (never in ephemeral mode)
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

        deadline, runs = time.monotonic() + 60, []
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[weekly.id])))
            time.sleep(1)
        assert runs, "the scheduler created no runs for weekly-retrain (see the server log: " \
                     f"{deployed.recorded['prefect-server']['log']})"
        assert all(r.state_name == "Scheduled" and r.expected_start_time.weekday() == 6 for r in runs)


def test_deployment_run_completes(deployed: Services, tmp_path: Path):
    out = tmp_path / "out"
    cfg = _config(tmp_path / "e2e.yaml", epochs=1)
    started = time.monotonic()
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", "--param", f"config={cfg}",
                           "--param", "variants=" + ",".join(VARIANTS), "--param", "epochs=1",
                           "--param", f"out={out}", "--watch", timeout=420)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    assert "Completed" in res.stdout
    flow_run_id = _run_id(res.stdout)
    for rel in ("config.json", "summary.parquet", "report.md",
                *(f"models/{v}/model.pt" for v in VARIANTS), *(f"features/{v}.parquet" for v in (*VARIANTS, "pca"))):
        assert (out / rel).is_file(), rel
    s = pd.read_parquet(out / "summary.parquet")
    probe = s[(s["task"] == "linear_probe") & (s["metric"] == "accuracy")]
    assert set(probe["representation"]) == {*VARIANTS, "pca"}
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 1

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _api(deployed) as client:
        run = client.read_flow_run(flow_run_id)
        assert run.state_name == "Completed" and run.parameters["epochs"] == 1
        arts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
    assert "| ae |" in arts["headline-results"].data
    mlflow_url = deployed.env["MLFLOW_TRACKING_URI"]
    assert f"]({mlflow_url}/#/experiments/" in arts["mlflow-run"].data  # a link to the MLflow parent run

    from mlflow import MlflowClient

    ml = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    exp = ml.get_experiment_by_name("pretrain-and-probe")
    (parent,) = ml.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                   "tags.`ae_repr.run_kind` = 'variant'")  # not the baselines' runs
    assert sorted(c.data.tags["variant"] for c in children) == sorted(VARIANTS)
    assert all(c.info.status == "FINISHED" for c in children)
    print(f"deployment run took {time.monotonic() - started:.1f}s")


def _wait(what: str, check, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.mark.scenario  # several runs at once / a kill mid-run: `make test-scenarios`
def test_worker_killed_mid_run_then_rerun_completes_from_cache(deployed: Services, tmp_path: Path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from ae_repr.checkpoint import load_model

    out = tmp_path / "out"
    params = ["--param", f"config={_config(tmp_path / 'crash.yaml', tracking=True, finetune=True, epochs=1)}",
              "--param", "variants=" + ",".join(VARIANTS), "--param", f"out={out}"]
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", *params)
    assert res.returncode == 0, res.stdout + res.stderr
    crashed_id = _run_id(res.stdout)

    # kill once every variant is trained and extracted, while the flow run is still evaluating
    _wait("features of every variant", lambda: all((out / "features" / f"{v}.parquet").is_file() for v in VARIANTS),
          240)
    with _api(deployed) as client:
        run = client.read_flow_run(crashed_id)
    assert run.state_name == "Running" and run.infrastructure_pid, run.state_name
    worker = deployed.recorded["worker"]["pgid"]
    flow_pid = int(str(run.infrastructure_pid).rsplit(":", 1)[-1])
    for group in (worker, os.getpgid(flow_pid)):  # the flow run runs in its own session: a machine crash kills both
        deployed.groups.add(group)
        os.killpg(group, signal.SIGKILL)
    _wait("the killed processes to exit", lambda: not svc.group_members(worker) and not svc.group_members(flow_pid), 30)

    # a fresh worker (services.py starts only what is not running), then the same deployment again
    restarted = _services(deployed.state, deployed.env, "start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "worker          started" in restarted.stdout and "prefect-server  already running" in restarted.stdout
    deployed.groups.add(json.loads((deployed.state / svc.STATE_FILE).read_text())["worker"]["pgid"])
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", *params, "--watch", timeout=420)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    rerun_id = _run_id(res.stdout)

    with _api(deployed) as client:
        def final_states() -> dict[str, str] | None:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[rerun_id])))
            states = {r.name: r.state_name for r in runs}
            names = [f"{t}-{v}" for t in ("train", "extract") for v in VARIANTS]
            return states if all(states.get(n) in ("Cached", "Completed", "Failed") for n in names) else None

        states = _wait("the rerun's task states", final_states, 30)
    assert all(states[f"{t}-{v}"] == "Cached" for t in ("train", "extract") for v in VARIANTS), states

    # no zombies: the rerun found the killed run unfinished in its folder and marked it, in Prefect and MLflow
    with _api(deployed) as client:
        crashed, rerun = client.read_flow_run(crashed_id), client.read_flow_run(rerun_id)
    assert crashed.state_name == "Crashed" and rerun_id in (crashed.state.message or ""), crashed.state
    assert f"rerun-of:{crashed_id}" in rerun.tags, rerun.tags
    from mlflow import MlflowClient

    ml = MlflowClient(deployed.env["MLFLOW_TRACKING_URI"])
    exp = ml.get_experiment_by_name("pretrain-and-probe")
    parents = {r.data.tags["prefect.flow_run_id"]: r for r in ml.search_runs(
        [exp.experiment_id], f"tags.`ae_repr.run_kind` = 'parent' and tags.`ae_repr.out_dir` = '{out}'")}
    killed, done = parents[crashed_id], parents[rerun_id]
    assert killed.info.status == "KILLED" and done.info.status == "FINISHED"
    assert done.data.tags["ae_repr.rerun_of"] == killed.info.run_id
    children = ml.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{killed.info.run_id}'")
    assert children and {c.info.status for c in children} <= {"KILLED", "FINISHED"}, \
        [(c.info.run_name, c.info.status) for c in children]

    # nothing the killed run wrote is corrupt: every output reads back, every model passes its checksum
    for path in out.rglob("*"):
        if path.name.startswith("."):
            continue  # an atomic write's temporary file, never renamed into place
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".json":
            json.loads(path.read_text())
    for v in VARIANTS:
        load_model(out / "models" / v)
    s = pd.read_parquet(out / "summary.parquet")
    assert set(s.loc[(s["task"] == "linear_probe") & (s["metric"] == "accuracy"), "representation"]) == {*VARIANTS, "pca"}
