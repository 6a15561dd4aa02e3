"""Session-wide e2e fixtures: one set of real services, one deployment of the checkout, one tracked run."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_stack import Services, TrackedRun, run_deployment, start_services, stop_services


@pytest.fixture(scope="session")
def services(tmp_path_factory) -> Iterator[Services]:
    """Prefect server + MLflow server + local-cpu worker; every process group stopped afterwards."""
    started = None
    try:
        started = start_services(tmp_path_factory.mktemp("services"))
        yield started
    finally:
        if started is not None:
            stop_services(started)


@pytest.fixture(scope="session")
def deployed(services: Services) -> Services:
    """`prefect --no-prompt deploy --all` from the checkout root."""
    res = services.prefect("--no-prompt", "deploy", "--all")
    assert res.returncode == 0, res.stdout + res.stderr
    return services


@pytest.fixture(scope="session")
def mlflow_server(services: Services) -> str:
    """URL of the services' `mlflow server` on 127.0.0.1."""
    return services.mlflow_url


@pytest.fixture(scope="session")
def tracked_run(deployed: Services, tmp_path_factory) -> TrackedRun:
    """The deployment run the deployment and MLflow tests read (ae and vae, one epoch, tracked with plots)."""
    return run_deployment(deployed, tmp_path_factory.mktemp("tracked_run"))
