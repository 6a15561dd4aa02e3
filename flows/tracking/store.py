"""Reaching the tracking store: its URI, whether it answers (the preflight), and the UI's addresses."""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit

from ae_repr.config import ExperimentConfig
from ae_repr.errors import UserError

from .record import VIEW_KEY, project_root, redact

ENV_URI = "MLFLOW_TRACKING_URI"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an SQLite store in the project root (absolute path)."""
    return os.environ.get(ENV_URI) or f"sqlite:///{project_root() / 'mlflow.db'}"


def display_uri(uri: str) -> str:
    """The URI without credentials, for messages and tags."""
    return redact(uri)


def is_http(uri: str) -> bool:
    """True for a tracking server (which has a UI to link to), False for a local store."""
    return urlsplit(uri).scheme in ("http", "https")


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts: `mlartifacts/` beside an SQLite file; the server decides otherwise."""
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return str((db.parent if db.is_absolute() else Path.cwd() / db.parent).resolve() / "mlartifacts")
    return None


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Raise UserError (one line) unless the tracking store answers within `timeout_s` seconds."""
    scheme = urlsplit(uri).scheme
    shown = display_uri(uri)
    if scheme in ("http", "https"):
        _check_http(uri, shown, timeout_s)
    elif scheme == "sqlite":
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            raise UserError(f"MLflow tracking URI {shown}: give the SQLite file as an absolute path "
                            "(sqlite:////abs/path/mlflow.db)")
        parent = next(p for p in (db.parent, *db.parent.parents) if p.exists())
        if not os.access(parent, os.W_OK | os.X_OK) or (db.exists() and not os.access(db, os.W_OK)):
            raise UserError(f"MLflow tracking store {shown} is not writable")
    elif scheme in ("", "file"):
        raise UserError(f"MLflow tracking URI {shown}: the plain file store is not supported by MLflow 3.13+; "
                        "use sqlite:////abs/path/mlflow.db or http://host:port")


def _check_http(uri: str, shown: str, timeout_s: float) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    error = "no answer"
    while True:
        left = deadline - time.monotonic()
        try:
            resp = requests.get(uri.rstrip("/") + "/health", timeout=max(0.5, min(3.0, left)))
        except requests.RequestException as e:
            error = e.__class__.__name__
        else:
            if resp.status_code in (401, 403):
                raise UserError(f"MLflow tracking server at {shown} refused access (HTTP {resp.status_code}); "
                                "check MLFLOW_TRACKING_USERNAME/PASSWORD or MLFLOW_TRACKING_TOKEN")
            if resp.status_code < 500:
                return
            error = f"HTTP {resp.status_code}"
        if time.monotonic() + 1.0 > deadline:
            raise UserError(f"MLflow tracking server at {shown} is unreachable ({error} after {timeout_s:g}s); "
                            f"start it or fix {ENV_URI}")
        time.sleep(1.0)


def preflight(cfg: ExperimentConfig) -> None:
    """Fail fast (UserError) when tracking is enabled and its store is unreachable: before any work starts."""
    if cfg.tracking.enabled:
        try:
            check_reachable(tracking_uri(), cfg.tracking.connect_timeout_s)
        except UserError as e:
            raise UserError(f"{e} (or run with --no-tracking)") from None


def run_url(uri: str, experiment_id: str, run_id: str | None) -> str | None:
    """The UI address of a run, for an HTTP tracking server."""
    if run_id is None or not is_http(uri):
        return None
    return f"{display_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_view_url(uri: str, experiment_id: str) -> str | None:
    """The address of the experiment's variants view (runs table) when `uri` is an HTTP server."""
    if not is_http(uri):
        return None
    return f"{display_uri(uri).rstrip('/')}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}"
