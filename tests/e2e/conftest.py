"""E2e fixtures: one set of real services, one deployment of the checkout and one tracked run, shared by every
e2e test of the session and stopped as soon as the last e2e test is done (the servers' background loops would
otherwise keep a core busy through the rest of the suite)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from e2e_stack import Services, TrackedRun, run_deployment, start_services, stop_services

HERE = Path(__file__).parent
_stack: dict[str, Any] = {}  # "services", "deployed", "tracked_run": what is up now


def _services(factory: pytest.TempPathFactory) -> Services:
    if "services" not in _stack:
        _stack["services"] = start_services(factory.mktemp("services"))
    return _stack["services"]


def _stop_stack() -> None:
    services = _stack.get("services")
    _stack.clear()
    if services is not None:
        stop_services(services)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the session's last e2e test in a row, stop the services (a later e2e test starts them again)."""
    if _stack and (nextitem is None or HERE not in Path(nextitem.path).parents):
        _stop_stack()


@pytest.fixture
def services(tmp_path_factory: pytest.TempPathFactory) -> Services:
    """Prefect server + MLflow server + local-cpu worker; every process group stopped after the last e2e test."""
    return _services(tmp_path_factory)


@pytest.fixture
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Services:
    """`prefect --no-prompt deploy --all` from the checkout root."""
    if "deployed" not in _stack:
        services = _services(tmp_path_factory)
        res = services.prefect("--no-prompt", "deploy", "--all")
        assert res.returncode == 0, res.stdout + res.stderr
        _stack["deployed"] = services
    return _stack["deployed"]


@pytest.fixture
def mlflow_server(services: Services) -> str:
    """URL of the services' `mlflow server` on 127.0.0.1."""
    return services.mlflow_url


@pytest.fixture
def tracked_run(deployed: Services, tmp_path_factory: pytest.TempPathFactory) -> TrackedRun:
    """The deployment run the deployment and MLflow tests read (ae and vae, one epoch, tracked with plots)."""
    if "tracked_run" not in _stack:
        _stack["tracked_run"] = run_deployment(deployed, tmp_path_factory.mktemp("tracked_run"))
    return _stack["tracked_run"]
