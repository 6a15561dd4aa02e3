#!/usr/bin/env python3
"""Start or stop the local "real mode" services: a Prefect server, an MLflow server and a process worker.

    python scripts/services.py start [--prefect-port N] [--mlflow-port N] [--host 127.0.0.1]
    python scripts/services.py stop
    python scripts/services.py status | env

Everything lives under `.services/` in the project (or `--state-dir`): the Prefect server's database
(PREFECT_HOME), the MLflow SQLite store and artifact folder, logs, and `services.json` with the PID of
each service. Each service runs in its own session (process group) and `stop` signals exactly those
groups: servers spawn children (uvicorn, MLflow's job runners) that would otherwise outlive them.
Servers bind 127.0.0.1 unless `--host` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin/ when run with .venv/bin/python
STATE_FILE = "services.json"
POOLS = {"local-cpu": "process", "gpu": "process"}  # prefect.yaml's pools; `gpu` gets no worker here
# Versions that install cleanly beside prefect 3.8.8 but break its server (measured here).
KNOWN_BAD = (
    ("fastapi", (0, 151), "the Prefect server answers HTTP 422 on workers/filter, so `prefect deploy` fails"),
    ("sqlalchemy", (2, 1), "the Prefect scheduler fails ('Can't evaluate bulk DML statement'): schedules never "
                           "create runs"),
)
QUIET = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host`."""
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def process_table() -> dict[int, tuple[int, int, int]]:
    """Every live (non-zombie) process, from /proc: pid -> (parent pid, process group, start time in clock ticks)."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ... starttime (20th)
        if fields[0] != "Z":
            table[int(d.name)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    if not Path("/proc").is_dir():  # not Linux: ask the kernel whether anything is left in the group
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    return [pid for pid, (_, group, _) in process_table().items() if group == pgid]


def _reap(pgid: int) -> None:
    """Collect exited children of the group when they are ours (so they do not linger as zombies)."""
    try:
        while os.waitpid(-pgid, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


def stop_groups(pgids: list[int], timeout: float = 20.0) -> dict[int, float | None]:
    """SIGTERM process groups together, SIGKILL whatever is left after `timeout`.

    Returns pgid -> seconds until the group was gone (None: it was not running).
    """
    t0 = time.monotonic()
    took: dict[int, float | None] = {g: (0.0 if group_members(g) else None) for g in pgids}
    left = [g for g, t in took.items() if t is not None]
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for g in left:
            try:
                os.killpg(g, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            for g in left:
                _reap(g)
                if not group_members(g):
                    took[g] = time.monotonic() - t0
            left = [g for g in left if group_members(g)]
            time.sleep(0.2)
        if not left:
            break
    return took


def stop_group(pgid: int, timeout: float = 20.0) -> bool:
    """SIGTERM a process group, SIGKILL whatever is left after `timeout`; True if it was running."""
    return stop_groups([pgid], timeout)[pgid] is not None


def start_group(cmd: list[str], log: Path, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    """Start `cmd` as the leader of a new session (its own process group), output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Wait until `url` answers 200; fail early with the log's tail if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-3000:] if log and log.is_file() else ""
            raise RuntimeError(f"process exited with code {proc.returncode} before {url} answered:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def _pick_port(wanted: int | None, default: int, host: str, what: str) -> int:
    if wanted is not None:
        if not port_free(wanted, host):
            raise SystemExit(f"services: --{what}-port {wanted} is in use on {host}")
        return wanted
    return default if port_free(default, host) else free_port(host)


def _alive(entry: dict[str, Any]) -> bool:
    return bool(group_members(entry["pgid"])) and _same_process(entry)


def _same_process(entry: dict[str, Any]) -> bool:
    """Guard against a recycled PID: a live group leader must still run the command we started."""
    cmdline = Path(f"/proc/{entry['pid']}/cmdline")
    try:
        argv = cmdline.read_bytes().split(b"\0")
    except OSError:
        return True  # leader gone (children may remain in the group) or not Linux
    return any(Path(entry["cmd"][0]).name.encode() in a for a in argv)


def _load(state: Path) -> dict[str, Any]:
    path = state / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(state: Path, data: dict[str, Any]) -> None:
    tmp = state / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(state / STATE_FILE)


def exports(data: dict[str, Any]) -> dict[str, str]:
    """The environment a shell needs to talk to the running services."""
    env = {}
    if "prefect-server" in data:
        env["PREFECT_API_URL"] = data["prefect-server"]["url"] + "/api"
    if "mlflow-server" in data:
        env["MLFLOW_TRACKING_URI"] = data["mlflow-server"]["url"]
    return env


def version_problems() -> list[str]:
    """Installed packages known to break the Prefect server, each with the fix."""
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    for pkg, bad_from, why in KNOWN_BAD:
        try:
            installed = version(pkg)
        except PackageNotFoundError:
            continue
        if tuple(int(x) for x in re.findall(r"\d+", installed)[:2]) >= bad_from:
            below = ".".join(map(str, bad_from))
            problems.append(f"{pkg} {installed}: {why}; install '{pkg}<{below}'")
    return problems


def ensure_pools(api_url: str) -> None:
    """Create the work pools prefect.yaml names, when missing (an existing pool is left as it is)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with SyncPrefectClient(api_url) as client:
        for name, kind in POOLS.items():
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                template = ProcessWorker.get_default_base_job_template()
                client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                print(f"created work pool {name!r} ({kind})")


def start(args: argparse.Namespace) -> int:
    """Start whatever is not running yet; print the environment to export."""
    problems = version_problems()
    for p in problems:
        print(f"services: {p}", file=sys.stderr)
    if problems and not args.ignore_versions:
        print("services: not starting (--ignore-versions to start anyway)", file=sys.stderr)
        return 2
    state = Path(args.state_dir).resolve()
    (state / "logs").mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in _load(state).items() if _alive(v)}
    base = {**os.environ, **QUIET, "PREFECT_HOME": str(state / "prefect")}
    base.pop("PREFECT_API_URL", None)
    started: list[str] = []
    connect = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host  # where clients connect
    waits = []  # both servers start side by side, then we wait for both

    def launch(name: str, cmd: list[str], port: int, health: str) -> None:
        """Start one server in its own process group, record it, and queue its health check."""
        log = state / "logs" / f"{name}.log"
        proc = start_group(cmd, log, base)
        url = f"http://{connect}:{port}"
        data[name] = {"pid": proc.pid, "pgid": proc.pid, "cmd": cmd, "url": url, "log": str(log)}
        _save(state, data)
        started.append(name)
        waits.append((url + health, proc, log))

    try:
        if "prefect-server" not in data:
            port = _pick_port(args.prefect_port, 4200, args.host, "prefect")
            launch("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", args.host, "--port", str(port)],
                   port, "/api/health")
        if not args.no_mlflow and "mlflow-server" not in data:
            port = _pick_port(args.mlflow_port, 5000, args.host, "mlflow")
            store = state / "mlflow"
            (store / "artifacts").mkdir(parents=True, exist_ok=True)
            cmd = [str(BIN / "mlflow"), "server", "--host", args.host, "--port", str(port), "--workers", "1",
                   "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
                   "--artifacts-destination", str(store / "artifacts")]
            launch("mlflow-server", cmd, port, "/health")
        deadline = time.monotonic() + args.timeout
        for url, proc, log in waits:
            wait_http(url, proc, max(1.0, deadline - time.monotonic()), log)
        env = {**base, **exports(data)}
        if not args.no_worker and "worker" not in data:
            ensure_pools(env["PREFECT_API_URL"])
            cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "local-cpu", "--type", "process",
                   "--name", f"local-cpu-{socket.gethostname()}"]
            log = state / "logs" / "worker.log"
            proc = start_group(cmd, log, env)
            data["worker"] = {"pid": proc.pid, "pgid": proc.pid, "cmd": cmd, "pool": "local-cpu", "log": str(log)}
            _save(state, data)
            started.append("worker")
            time.sleep(1.0)
            if proc.poll() is not None:
                raise RuntimeError(f"the worker exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
    except BaseException as e:
        for name in started:  # leave nothing half-started behind
            stop_group(data.pop(name)["pgid"])
        _save(state, data)
        print(f"services: failed to start: {e}", file=sys.stderr)
        return 1
    for name, entry in data.items():
        verb = "started" if name in started else "already running"
        where = entry.get("url") or f"pool {entry.get('pool')}"
        print(f"{name:15s} {verb:16s} pid {entry['pid']:<7d} {where}  (log: {entry['log']})")
    print("\n# export these in your shell (or: eval \"$(python scripts/services.py env)\"):")
    for k, v in exports(data).items():
        print(f"export {k}={v}")
    return 0


def stop(args: argparse.Namespace) -> int:
    """Stop exactly the process groups recorded in services.json (worker first)."""
    state = Path(args.state_dir).resolve()
    data = _load(state)
    if not data:
        print("services: nothing recorded as running")
        return 0
    own = {}
    for name, entry in data.items():
        if _same_process(entry):
            own[name] = entry["pgid"]
        else:
            print(f"{name:15s} pid {entry['pid']} now runs something else; left alone")
    took = {}
    if "worker" in own:  # first, so it does not pick up work while the servers go away
        took = stop_groups([own["worker"]], timeout=args.grace)
    took.update(stop_groups([g for n, g in own.items() if n != "worker"], timeout=args.grace))
    for name, pgid in own.items():
        t = took[pgid]
        print(f"{name:15s} " + ("was not running" if t is None else f"stopped in {t:.1f}s") + f" (pid {pgid})")
    (state / STATE_FILE).unlink(missing_ok=True)
    return 0


def status(args: argparse.Namespace) -> int:
    """Which recorded services are alive; exit code 1 if any is not."""
    data = _load(Path(args.state_dir).resolve())
    ok = True
    for name, entry in data.items():
        alive = _alive(entry)
        ok &= alive
        print(f"{name:15s} {'running' if alive else 'NOT running'} pid {entry['pid']} {entry.get('url', '')}")
    if not data:
        print("services: nothing recorded as running")
    return 0 if ok and data else 1


def env(args: argparse.Namespace) -> int:
    """Print `export` lines for the running services."""
    for k, v in exports({k: v for k, v in _load(Path(args.state_dir).resolve()).items() if _alive(v)}).items():
        print(f"export {k}={v}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["start", "stop", "status", "env"])
    p.add_argument("--state-dir", default=str(ROOT / ".services"), help="where PIDs, logs and data live")
    p.add_argument("--host", default="127.0.0.1", help="interface the servers bind (default: loopback only)")
    p.add_argument("--prefect-port", type=int, help="default 4200, or a free port if that is taken")
    p.add_argument("--mlflow-port", type=int, help="default 5000, or a free port if that is taken")
    p.add_argument("--no-mlflow", action="store_true", help="do not start the MLflow server")
    p.add_argument("--no-worker", action="store_true", help="do not start the local-cpu worker")
    p.add_argument("--ignore-versions", action="store_true", help="start despite known-bad package versions")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the servers to answer")
    p.add_argument("--grace", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL on stop")
    args = p.parse_args(argv)
    return {"start": start, "stop": stop, "status": status, "env": env}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
