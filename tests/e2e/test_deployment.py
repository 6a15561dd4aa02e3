"""End to end with real processes: Prefect server, MLflow server and a process worker (scripts/services.py,
on free loopback ports, state in a temporary folder), `prefect --no-prompt deploy --all` from the
checkout, then `prefect deployment run pretrain-and-probe/local --watch`.

The services, the deployment and the tracked run are the session's (tests/e2e/conftest.py), shared with the
MLflow tests. Every process is started in its own process group and stopped by PID, also when a test fails;
the session fixture's finalizer checks that none of them is left.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from e2e_stack import BIN, ROOT, VARIANTS, Services, TrackedRun, flow_run_id, run_config, services_cli, svc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _listening(port: int) -> str:
    """The local address a TCP port listens on, from /proc/net/tcp (v4) and tcp6."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:  # 0A: LISTEN
                return addr
    return ""


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


def test_deployment_run_completes(tracked_run: TrackedRun):
    out, run_id, deployed = tracked_run.out, tracked_run.flow_run_id, tracked_run.services
    assert "Completed" in tracked_run.stdout
    for rel in ("config.json", "summary.parquet", "report.md",
                *(f"models/{v}/model.pt" for v in VARIANTS), *(f"features/{v}.parquet" for v in (*VARIANTS, "pca"))):
        assert (out / rel).is_file(), rel
    s = pd.read_parquet(out / "summary.parquet")
    probe = s[(s["task"] == "linear_probe") & (s["metric"] == "accuracy")]
    assert set(probe["representation"]) == {*VARIANTS, "pca"}
    assert json.loads((out / "config.json").read_text())["train"]["epochs"] == 1

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _api(deployed) as client:
        run = client.read_flow_run(run_id)
        assert run.state_name == "Completed" and run.parameters["epochs"] == 1
        arts = {a.key: a for a in client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
    assert "| ae |" in arts["headline-results"].data
    mlflow_url = deployed.env["MLFLOW_TRACKING_URI"]
    assert f"]({mlflow_url}/#/experiments/" in arts["mlflow-run"].data  # a link to the MLflow parent run

    from mlflow import MlflowClient

    ml = MlflowClient(mlflow_url, registry_uri=mlflow_url)
    exp = ml.get_experiment_by_name("pretrain-and-probe")
    (parent,) = ml.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run_id}'")
    children = ml.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and "
                                                   "tags.`ae_repr.run_kind` = 'variant'")  # not the baselines' runs
    assert sorted(c.data.tags["variant"] for c in children) == sorted(VARIANTS)
    assert all(c.info.status == "FINISHED" for c in children)


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
    params = ["--param", f"config={run_config(tmp_path / 'crash.yaml', tracking=True, finetune=True, epochs=1)}",
              "--param", "variants=" + ",".join(VARIANTS), "--param", f"out={out}"]
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", *params)
    assert res.returncode == 0, res.stdout + res.stderr
    crashed_id = flow_run_id(res.stdout)

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
    restarted = services_cli(deployed.state, deployed.env, "start")
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert "worker          started" in restarted.stdout and "prefect-server  already running" in restarted.stdout
    deployed.groups.add(json.loads((deployed.state / svc.STATE_FILE).read_text())["worker"]["pgid"])
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", *params, "--watch", timeout=420)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    rerun_id = flow_run_id(res.stdout)

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


def _tree(groups: set[int]) -> set[tuple[int, int]]:
    """(pid, start time) of every process in `groups` and of every descendant of those, whatever its group."""
    table = svc.process_table()
    found = {pid for pid, (_, pgid, _) in table.items() if pgid in groups}
    while more := {pid for pid, (ppid, _, _) in table.items() if ppid in found} - found:
        found |= more
    return {(pid, table[pid][2]) for pid in found}


def _pss_mb(groups: set[int]) -> float:
    """Proportional memory (PSS: shared pages split among their users, so torch's libraries count once) of every
    process in `groups` and their descendants, summed, in MB."""
    total = 0
    for pid, _ in _tree(groups):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # exited meanwhile
        found = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        total += int(found.group(1)) * 1024 if found else 0
    return total / 1e6


def _answers(url: str) -> bool:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status == 200


@pytest.mark.scenario  # several runs at once / a kill mid-run: `make test-scenarios`
@pytest.mark.timeout(900)
def test_three_runs_at_once_against_make_services_lose_nothing(tmp_path: Path):
    """`services.py start` (state in tmp, never the project's .services/), then three `ae-repr run` at once with
    PREFECT_API_URL and MLFLOW_TRACKING_URI on its servers: every run, metric and artifact of each folder's summary
    is in MLflow, each weights checksum is one registered version, the three flow runs are Completed in that Prefect
    server, both servers still answer, and `services.py stop` ends exactly the processes it started."""
    import threading

    from mlflow import MlflowClient

    from flows.tracking import models

    started = time.monotonic()
    project_state = ROOT / ".services" / svc.STATE_FILE
    before = project_state.stat().st_mtime_ns if project_state.exists() else None
    state = tmp_path / "services"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(svc.QUIET, PREFECT_HOME=str(tmp_path / "client"), PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    bystander = subprocess.Popen(["sleep", "600"], start_new_session=True)  # not ours to stop: must outlive `stop`
    groups: set[int] = set()
    runs: dict[str, subprocess.Popen] = {}
    peak, sampling = [0.0], threading.Event()

    def sample() -> None:  # the whole setup's memory: servers, worker, and the three runs with their children
        while not sampling.wait(0.5):
            peak[0] = max(peak[0], _pss_mb(groups | {p.pid for p in runs.values()}))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        res = services_cli(state, env, "start", "--prefect-port", str(svc.free_port()),
                        "--mlflow-port", str(svc.free_port()))
        recorded = json.loads((state / svc.STATE_FILE).read_text()) if (state / svc.STATE_FILE).is_file() else {}
        groups |= {e["pgid"] for e in recorded.values()}
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(recorded) == {"prefect-server", "mlflow-server", "worker"}
        # its data live in the state folder given: the Prefect server's home, the MLflow store and artifacts
        assert (state / "prefect").is_dir() and (state / "mlflow" / "mlflow.db").is_file()
        urls = {"prefect": recorded["prefect-server"]["url"], "mlflow": recorded["mlflow-server"]["url"]}
        run_env = {**env, **svc.exports(recorded)}
        assert run_env["PREFECT_API_URL"] == urls["prefect"] + "/api"

        outs = {}
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):  # a and b train the same weights: both register them
            (tmp_path / name).mkdir()
            cfg = yaml.safe_load(run_config(tmp_path / name / "run.yaml", epochs=1).read_text())
            cfg["seed"] = seed
            cfg["models"]["variants"] = list(VARIANTS)
            cfg["tracking"].update(experiment="services-three-runs", log_plots=True)
            cfg["eval"]["applications"] = ["generation"]
            (tmp_path / name / "run.yaml").write_text(yaml.safe_dump(cfg))
            outs[name] = tmp_path / name / "out"
            runs[name] = subprocess.Popen(
                [str(BIN / "ae-repr"), "run", "--config", str(tmp_path / name / "run.yaml"), "--out", str(outs[name])],
                env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path / name,
                start_new_session=True)
        sampler.start()
        services_up = time.monotonic()
        logs = {name: proc.communicate(timeout=600)[0] for name, proc in runs.items()}
        for name, proc in runs.items():
            assert proc.returncode == 0, logs[name][-3000:]
        sampling.set()
        runs_done = time.monotonic()

        # both servers answer after the three runs
        assert _answers(urls["prefect"] + "/api/health") and _answers(urls["mlflow"] + "/health")

        # the three flow runs are Completed in the services' Prefect server (not in a temporary API of their own)
        from prefect.client.orchestration import SyncPrefectClient

        with SyncPrefectClient(run_env["PREFECT_API_URL"]) as client:
            for name, out in outs.items():
                flow_run = client.read_flow_run(json.loads((out / "flow_run.json").read_text())["id"])
                assert flow_run.state_name == "Completed", (name, flow_run.state)

        # MLflow holds every run, number and file of each run folder
        ml = MlflowClient(urls["mlflow"], registry_uri=urls["mlflow"])
        exp = ml.get_experiment_by_name("services-three-runs")
        parents = ml.search_runs([exp.experiment_id], "tags.`ae_repr.run_kind` = 'parent'")
        assert len(parents) == 3 and all(p.info.status == "FINISHED" for p in parents)
        for name, out in outs.items():
            parent = ml.get_run(json.loads((out / "tracking.json").read_text())["parent_run_id"])
            assert parent.info.status == "FINISHED", (name, parent.info.status)
            _same_files(ml, parent.info.run_id, {p.name: p for p in (out / "config.json", out / "summary.parquet",
                                                                      out / "verdict.md", out / "report.md")},
                        {f"plots/{p.name}": p for p in (out / "plots").glob("*.png")})
            summary = pd.read_parquet(out / "summary.parquet")
            children = {r.data.tags["representation"]: r for r in ml.search_runs(
                [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
            probed = set(summary.loc[summary["task"] == "linear_probe", "representation"])
            assert set(children) == probed, (name, sorted(children), sorted(probed))
            for rep, run in children.items():
                assert run.info.status == "FINISHED", (name, rep, run.info.status)
                _same_numbers(summary[summary["representation"] == rep], run.data.metrics, (name, rep))
                if rep not in VARIANTS:
                    continue
                model_dir = out / "models" / rep
                history = json.loads((model_dir / "history.json").read_text())
                assert len(ml.get_metric_history(run.info.run_id, "train/loss")) == len(history) == 1, (name, rep)
                _same_files(ml, run.info.run_id, {"history.json": model_dir / "history.json"},
                            {f"features/{rep}.parquet": out / "features" / f"{rep}.parquet",
                             "model/config.json": model_dir / "config.json",
                             **{f"plots/{p.name}": p for p in (out / "plots" / rep).glob("*.png")}})
                tags = run.data.tags
                # the run's own log names an MLflow call that failed (the writer goes on without it)
                assert models.REGISTERED_MODEL_TAG in tags, (name, rep, logs[name][-3000:])
                version = ml.get_model_version(tags[models.REGISTERED_MODEL_TAG], tags[models.MODEL_VERSION_TAG])
                assert version.tags[models.WEIGHTS_TAG] == models.weights_checksum(model_dir), (name, rep)
        versions: dict[str, int] = {}
        for v in VARIANTS:  # weights trained by two runs side by side (a and b, same seed) are one version
            registered = models.registered_name(v, "digits")
            sums = [mv.tags[models.WEIGHTS_TAG] for mv in ml.search_model_versions(f"name = '{registered}'")]
            trained = {models.weights_checksum(out / "models" / v) for out in outs.values()}
            assert sorted(sums) == sorted(trained), (registered, sums, trained)
            versions[v] = len(sums)
            assert models.CHAMPION in ml.get_registered_model(registered).aliases

        # `stop` ends every process it started (servers' children included) and nothing else
        ours = _tree(groups)
        assert len(ours) > len(groups), ours  # the servers' children (uvicorn, MLflow's job runners) are in it
        stop = services_cli(state, env, "stop", "--grace", "5")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        table = svc.process_table()
        left = sorted(pid for pid, start in ours if pid in table and table[pid][2] == start)
        assert not left, f"processes left after `services.py stop`: {left}"
        assert bystander.poll() is None, "`services.py stop` ended a process it did not start"
        assert not (state / svc.STATE_FILE).exists()
        after = project_state.stat().st_mtime_ns if project_state.exists() else None
        assert after == before, "the test touched the project's .services/"
        print(f"three runs against services.py: services up in {services_up - started:.1f}s, runs "
              f"{runs_done - services_up:.1f}s, {time.monotonic() - started:.1f}s in all; peak PSS {peak[0]:.0f} MB "
              f"(servers, worker and runs); registered versions {versions}")
    finally:
        sampling.set()
        for proc in runs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        if (state / svc.STATE_FILE).exists():
            services_cli(state, env, "stop", "--grace", "5")
        for g in groups:
            if svc.group_members(g):
                os.killpg(g, signal.SIGKILL)
        bystander.kill()
        bystander.wait()


def _same_numbers(rows: pd.DataFrame, metrics: dict[str, float], where: object) -> None:
    """Every finite summary number of one representation is its run's `eval/<task>_<metric>[_k<k>]`, with its
    interval as `/ci_low` and `/ci_high`."""
    for r in rows.itertuples(index=False):
        if pd.isna(r.value) or not np.isfinite(r.value):
            continue
        key = f"eval/{r.task}_{r.metric}" + ("" if pd.isna(r.k) else f"_k{int(r.k)}")
        assert metrics.get(key) == pytest.approx(r.value, rel=1e-6), (where, key)
        if not pd.isna(r.ci_low) and not pd.isna(r.ci_high):
            assert metrics.get(f"{key}/ci_low") == pytest.approx(r.ci_low, rel=1e-6), (where, key)
            assert metrics.get(f"{key}/ci_high") == pytest.approx(r.ci_high, rel=1e-6), (where, key)


def _same_files(ml: Any, run_id: str, top: dict[str, Path], nested: dict[str, Path]) -> None:
    """The run's artifacts include each local file (at the run's top level, or `folder/name`), byte for byte in
    size."""
    sizes = {a.path: a.file_size for a in ml.list_artifacts(run_id) if not a.is_dir}
    for folder in {p.split("/")[0] for p in nested}:
        sizes |= {a.path: a.file_size for a in ml.list_artifacts(run_id, folder) if not a.is_dir}
    for path, local in {**top, **nested}.items():
        assert local.is_file(), local
        assert sizes.get(path) == local.stat().st_size, (run_id, path, sizes.get(path), local.stat().st_size)
