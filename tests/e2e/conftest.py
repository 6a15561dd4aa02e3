"""E2e fixtures: one set of real services, one deployment of the checkout and one tracked run, shared by every
e2e test of the session. They are built on a background thread from the session's start (tests/background.py),
and stopped as soon as the last test that reads them is done (the servers' background loops would otherwise keep
a core busy)."""

from __future__ import annotations

from typing import Any

import background
import pytest
from e2e_stack import Services, TrackedRun, run_deployment, start_services, stop_services

_stack: dict[str, Any] = {}  # "services", "deployed", "tracked_run": what is up now


def _build(factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Services, then `prefect --no-prompt deploy --all` from the checkout root, then the tracked run."""
    _stack["services"] = services = start_services(factory.mktemp("services"))
    res = services.prefect("--no-prompt", "deploy", "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    _stack["deployed"] = services
    _stack["tracked_run"] = run_deployment(services, factory.mktemp("tracked_run"))
    return _stack


background.register("e2e_stack", _build)


def _stop_stack() -> None:
    services = _stack.get("services")
    _stack.clear()
    if services is not None:
        stop_services(services)


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """After the last test in a row that reads the stack, stop the services."""
    if "e2e_stack" in background.uses(item) and (nextitem is None or "e2e_stack" not in background.uses(nextitem)):
        _stop_stack()


def pytest_sessionfinish() -> None:
    _stop_stack()  # an interrupted session: whatever is still up


@pytest.fixture
def e2e_stack(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return background.result("e2e_stack", tmp_path_factory)


@pytest.fixture
def services(e2e_stack: dict[str, Any]) -> Services:
    """Prefect server + MLflow server + local-cpu worker (every process group stopped after the last e2e test)."""
    return e2e_stack["services"]


@pytest.fixture
def deployed(e2e_stack: dict[str, Any]) -> Services:
    """The services, with the checkout deployed (`prefect --no-prompt deploy --all`)."""
    return e2e_stack["deployed"]


@pytest.fixture
def mlflow_server(services: Services) -> str:
    """URL of the services' `mlflow server` on 127.0.0.1."""
    return services.mlflow_url


@pytest.fixture
def tracked_run(e2e_stack: dict[str, Any]) -> TrackedRun:
    """The deployment run the deployment and MLflow tests read (ae and vae, one epoch, tracked with plots)."""
    return e2e_stack["tracked_run"]
