"""The real services every e2e test shares (scripts/services.py: Prefect server, MLflow server and a process
worker on free loopback ports, state in a temporary folder) and the one tracked deployment run the deployment
and MLflow tests both read.

Each kind of server starts once per test session: its start-up costs tens of seconds on this machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import background
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SCRIPT = ROOT / "scripts" / "services.py"
VARIANTS = ("ae", "vae")

sys.path.insert(0, str(ROOT / "scripts"))
import services as svc  # noqa: E402  (scripts/ is not a package)


@dataclass(frozen=True)
class Services:
    """The running services and the environment a client process needs."""

    state: Path
    env: dict[str, str]
    recorded: dict[str, Any]
    groups: set[int]  # every process group started for the tests, stopped (and checked) at the end

    @property
    def mlflow_url(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def prefect(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run the prefect CLI from the checkout root against the test server."""
        return subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=self.env, capture_output=True,
                              text=True, timeout=timeout)


@dataclass(frozen=True)
class TrackedRun:
    """A `pretrain-and-probe/local` deployment run, tracked on the services' MLflow server."""

    services: Services
    out: Path
    flow_run_id: str
    stdout: str

    @property
    def url(self) -> str:
        return self.services.mlflow_url


def services_cli(state: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--state-dir", str(state)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def start_services(state: Path) -> Services:
    """`services.py start` with its state in `state`; every process group it records is in `groups`."""
    env = {k: v for k, v in background.environ().items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(svc.QUIET, PREFECT_HOME=str(state / "client"), PYTHONUNBUFFERED="1",
               PREFECT_WORKER_QUERY_SECONDS="2")  # the worker polls every 2 s instead of 10
    res = services_cli(state, env, "start", "--prefect-port", str(svc.free_port()),
                       "--mlflow-port", str(svc.free_port()))
    recorded = json.loads((state / svc.STATE_FILE).read_text()) if (state / svc.STATE_FILE).is_file() else {}
    started = Services(state, env, recorded, {e["pgid"] for e in recorded.values()})
    try:
        assert res.returncode == 0, res.stdout + res.stderr
        assert set(recorded) == {"prefect-server", "mlflow-server", "worker"}
        for entry in recorded.values():
            assert entry.get("url", "http://127.0.0.1:").startswith("http://127.0.0.1:")  # loopback only
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", res.stdout, re.M))
        assert exports == svc.exports(recorded)
    except BaseException:
        stop_services(started)  # whatever did start
        raise
    return Services(state, {**env, **exports, "COLUMNS": "200"}, recorded, started.groups)


def stop_services(services: Services) -> None:
    """`services.py stop`, then check that no process group the tests started is left (and kill any that is)."""
    # MLflow's job runners outlived SIGTERM for the whole default 20 s grace: the tests wait 5 s
    stop = services_cli(services.state, services.env, "stop", "--grace", "5")
    print(stop.stdout)  # how long each group took to stop (shown with -s)
    left = {g: svc.group_members(g) for g in services.groups if svc.group_members(g)}
    for g in left:
        os.killpg(g, signal.SIGKILL)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert not left, f"process groups left running after `services.py stop`: {left}"


def run_config(path: Path, tracking: bool = True, finetune: bool = False, log_plots: bool = False,
               **train: Any) -> Path:
    """configs/quick.yaml with a smaller evaluation and tracking on (to the services' MLflow server) or off."""
    d = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    d.setdefault("train", {}).update(train)
    d.setdefault("eval", {}).update({"baselines": ["pca"], "knn_k": [5],
                                     "fewshot_k": [5], "fewshot_finetune": finetune})
    d["tracking"] = {"enabled": tracking, "log_plots": log_plots}
    path.write_text(yaml.safe_dump(d))
    return path


def flow_run_id(output: str) -> str:
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def run_deployment(deployed: Services, tmp: Path) -> TrackedRun:
    """`prefect deployment run pretrain-and-probe/local --watch`: ae and vae, one epoch, tracked with plots."""
    out = tmp / "out"
    cfg = run_config(tmp / "e2e.yaml", log_plots=True, epochs=1)
    res = deployed.prefect("deployment", "run", "pretrain-and-probe/local", "--param", f"config={cfg}",
                           "--param", "variants=" + ",".join(VARIANTS), "--param", "epochs=1",
                           "--param", f"out={out}", "--watch", timeout=420)
    assert res.returncode == 0, res.stdout[-5000:] + res.stderr[-5000:]
    return TrackedRun(deployed, out, flow_run_id(res.stdout), res.stdout)
