"""Suite-wide settings: no telemetry, no network, quiet progress bars; the background set-ups start first and
their tests run last (tests/background.py)."""

from __future__ import annotations

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("TQDM_DISABLE", "1")
# waiting OpenMP threads sleep instead of spinning: the suite runs several torch processes at once on few cores
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# prefect.main: Prefect sets up its logging when its API is first imported; here, with the session's stderr (first
# imported inside a test under capsys, its console handler kept that test's stream, closed after the test)
import background  # noqa: E402  (tests/ is on sys.path: this file's folder)
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "background: the test's body runs on a background thread from the session's "
                                       "start (tests/background.py); it takes tmp_path alone")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    background.last(items)  # the tests that read a background set-up, or run in the background, run last


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    return background.run_body(pyfuncitem)  # None: an ordinary test, called as usual


@pytest.fixture(scope="session", autouse=True)
def _background_setups(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """Start the set-ups the selected tests read (tests/background.py) as the first test starts."""
    background.start(request.session.items, tmp_path_factory)
    yield
    background.wait_all()
