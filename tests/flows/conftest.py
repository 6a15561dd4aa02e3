"""One Prefect test harness (a temporary local API and database) for every flow test. Its server process starts
on a background thread with the session (tests/background.py): its start-up costs 15-20 s here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from unittest import mock

import background
import prefect
import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.testing.utilities import _find_available_port, prefect_test_harness

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import services as svc  # noqa: E402  (scripts/ is not a package: its health check)


def _harness_server(factory: pytest.TempPathFactory) -> SubprocessASGIServer:
    """The harness's API server on a free port, with its database in a temporary folder, started and healthy.

    The command is the one `SubprocessASGIServer.start` runs, with the session's starting environment: on this
    thread nothing may read `os.environ`, which pytest changes at every test (PYTEST_CURRENT_TEST)."""
    server = SubprocessASGIServer(port=_find_available_port())
    db = factory.mktemp("prefect-harness") / "prefect.db"
    env = {**background.environ(), "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
           "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{db}"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(prefect.__file__).parent.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(server.port),
         "--log-level", "error", "--lifespan", "on"], env=env)
    try:
        svc.wait_http(f"{server.api_url}/health", proc, timeout=180)
    except BaseException:
        proc.kill()
        raise
    server.server_process, server.running = proc, True  # the harness finds it running, and stops it
    return server


background.register("prefect_harness", _harness_server, urgent=True)  # the flow tests wait for it first


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """A session-scoped `prefect_test_harness` over the server started ahead (the harness finds it running, by its
    port, and stops it at the end); request it in every test that runs a flow."""
    server = background.result("prefect_harness", tmp_path_factory)
    with (mock.patch("prefect.testing.utilities._find_available_port", return_value=server.port),
          prefect_test_harness(server_startup_timeout=120)):
        yield
