"""One Prefect test harness (a temporary local API and database) for every flow test."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_harness():
    """A session-scoped `prefect_test_harness`; request it in every test that runs a flow."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
