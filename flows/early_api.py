"""Boot Prefect's temporary API server in the background while `ae-repr run` imports and loads its data.

Without a configured API (`PREFECT_API_URL`), Prefect starts a temporary server the first time the flow
needs a client: a subprocess that takes seconds to boot, idle time of the whole run, after the run's own
process has spent seconds more importing the server's code just to start it. Here the run starts the same
server (Prefect's app, under uvicorn, with the settings Prefect gives its temporary one) as its first step,
points `PREFECT_API_URL` at it for the run and stops it by PID at the end: its boot overlaps the imports and
the data loading, and this process never imports the server. The server gets SIGTERM when this process
dies, however it dies (Linux), so a killed run leaves no server behind.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 120  # Prefect's 20 s default is too short on a busy 2-core machine; the variable wins
# what Prefect sets for its temporary server: no UI, the server knows it is temporary
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
# the server's process asks the kernel for SIGTERM when its parent dies (prctl PR_SET_PDEATHSIG = 1), then
# runs uvicorn; a parent already gone before that (its parent id changed) means exit at once
_LAUNCH = """import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform.startswith("linux"):
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
if os.getppid() != parent:
    sys.exit(0)
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


def startup_timeout() -> int:
    """Seconds the temporary server may take to answer its health check."""
    return int(os.environ.get(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S))


def server_command(port: int) -> list[str]:
    """The temporary server's command line: Prefect's API app under uvicorn on 127.0.0.1:`port`."""
    return [sys.executable, "-c", _LAUNCH, str(os.getpid()), "--factory", "prefect.server.api.server:create_app",
            "--host", "127.0.0.1", "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until_up(proc: subprocess.Popen, url: str, timeout: float) -> None:
    """Return once the server at `url` answers its health check; RuntimeError if it exits or never answers."""
    deadline = time.monotonic() + timeout
    with httpx.Client() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the temporary Prefect API exited with code {proc.returncode} while starting")
            try:
                if client.get(f"{url}/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"the temporary Prefect API did not answer within {timeout:g} s "
                       f"(set {STARTUP_TIMEOUT_ENV} to wait longer)")


def _drain_prefect() -> None:
    """Send what Prefect still holds for the API (its log and event workers' queues), for at most 5 s each:
    stopped under them, the workers retry for a minute and a half before they give up."""
    if "prefect.logging.handlers" not in sys.modules:  # no flow ran: nothing was queued
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        worker.drain_all(timeout=5)


def stop(proc: subprocess.Popen) -> None:
    """Stop the server process: SIGTERM, then SIGKILL after 5 s."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def api_booting() -> Iterator[Callable[[], None]]:
    """Start booting the temporary API now; yields `wait`, which returns once the server answers.

    Call `wait` before the flow. Inside the block `PREFECT_API_URL` names the server (so Prefect starts no
    other); leaving the block stops it, at once if it is still booting, so a bad input found meanwhile is
    reported without waiting for the server.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        get_current_settings,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield lambda: None  # a configured server, or none allowed: nothing to boot
        return
    port = _free_port()
    settings = get_current_settings().to_environment_variables(exclude_unset=True)
    proc = subprocess.Popen(server_command(port), env={**os.environ, **settings, **SERVER_ENV})
    url = f"http://127.0.0.1:{port}/api"
    log.debug("temporary Prefect API booting at %s (pid %d)", url, proc.pid)
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield lambda: _wait_until_up(proc, url, startup_timeout())
    finally:
        if proc.poll() is None:
            _drain_prefect()
        stop(proc)
