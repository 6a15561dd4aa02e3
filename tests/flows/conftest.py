"""One Prefect test harness (a temporary local API and database) for every flow test. Its server process starts
on a background thread with the session (tests/background.py): its start-up costs 15-20 s here."""

from __future__ import annotations

from unittest import mock

import background
import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_SERVER_DATABASE_CONNECTION_URL, temporary_settings
from prefect.testing.utilities import _find_available_port, prefect_test_harness


def _harness_server(factory: pytest.TempPathFactory) -> SubprocessASGIServer:
    """The harness's API server on a free port, with its database in a temporary folder, started and healthy."""
    db = factory.mktemp("prefect-harness") / "prefect.db"
    with temporary_settings(updates={PREFECT_SERVER_DATABASE_CONNECTION_URL: f"sqlite+aiosqlite:///{db}"}):
        server = SubprocessASGIServer(port=_find_available_port())
        server.start(timeout=120)
    return server


background.register("prefect_harness", _harness_server)


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory):
    """A session-scoped `prefect_test_harness` over the server started ahead (the harness finds it running, by its
    port, and stops it at the end); request it in every test that runs a flow."""
    server = background.result("prefect_harness", tmp_path_factory)
    with (mock.patch("prefect.testing.utilities._find_available_port", return_value=server.port),
          prefect_test_harness(server_startup_timeout=120)):
        yield
