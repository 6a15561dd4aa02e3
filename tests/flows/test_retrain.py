"""The `retrain` flow's champion decisions: the rule, the registry updates, and two real flow runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from ae_repr.config import load_config, validate_config
from flows.retrain import ALIAS, METRIC, decide, registered_name, retrain, update_champion

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("new", "old", "margin", "promoted"), [
    (0.90, None, 0.005, True),    # no champion yet
    (0.90, 0.80, 0.005, True),
    (0.804, 0.80, 0.005, False),  # better, but not by the margin
    (0.805, 0.80, 0.005, False),  # exactly the margin is not enough
    (0.80, 0.80, 0.0, False),
    (0.70, 0.80, 0.005, False),
])
def test_decide(new, old, margin, promoted):
    assert decide(new, old, margin)[0] is promoted


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def _version(client: MlflowClient, variant: str, accuracy: float | None) -> object:
    """A run (with the metric, unless None) and a registered model version from it."""
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run = client.create_run(exp.experiment_id)
    if accuracy is not None:
        client.log_metric(run.info.run_id, METRIC, accuracy)
    name = registered_name(variant)
    try:
        client.create_registered_model(name)
    except Exception:  # already there
        pass
    return client.create_model_version(name, f"runs:/{run.info.run_id}/encoder", run_id=run.info.run_id)


def test_update_champion_moves_the_alias_only_when_better_by_the_margin(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = registered_name("ae")

    v1 = _version(client, "ae", 0.80)
    d = update_champion(client, "ae", v1, 0.80, 0.005)
    assert d.promoted and d.champion_version is None
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version)

    v2 = _version(client, "ae", 0.803)
    d = update_champion(client, "ae", v2, 0.803, 0.005)
    assert not d.promoted and d.verdict == "kept" and d.champion_version == str(v1.version)
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version)
    tags = client.get_model_version(name, v2.version).tags
    assert tags["retrain.decision"] == "kept" and tags["retrain.previous_champion"] == str(v1.version)
    assert "0.8030" in tags["retrain.reason"] and "0.8000" in tags["retrain.reason"]

    v3 = _version(client, "ae", 0.85)
    d = update_champion(client, "ae", v3, 0.85, 0.005)
    assert d.promoted and d.champion_accuracy == pytest.approx(0.80)
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version)
    assert client.get_model_version(name, v3.version).tags["retrain.decision"] == "promoted"

    d = update_champion(client, "ae", None, None, 0.005)  # the variant failed in this run
    assert d.verdict == "skipped" and str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version)


def test_a_champion_without_the_metric_is_not_replaced_blindly(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    v1 = _version(client, "vae", None)
    client.set_registered_model_alias(registered_name("vae"), ALIAS, v1.version)
    v2 = _version(client, "vae", 0.9)
    d = update_champion(client, "vae", v2, 0.9, 0.005)
    assert not d.promoted and METRIC in d.reason
    assert str(client.get_model_version_by_alias(registered_name("vae"), ALIAS).version) == str(v1.version)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path / "prefect-results"}):
        yield uri


def test_retrain_flow_promotes_then_keeps(prefect_harness, mlflow_store, tmp_path):
    d = load_config(ROOT / "configs" / "quick.yaml").model_dump(mode="json")
    d["models"]["variants"] = ["ae"]
    d["train"]["epochs"] = 1
    d["eval"].update({"baselines": ["pca"], "fewshot_finetune": False})
    d["tracking"].update({"enabled": True, "log_plots": False})
    cfg = validate_config(d)
    client = _client(mlflow_store)
    name = registered_name("ae")

    first = retrain(config=cfg, out=str(tmp_path / "out"), return_state=True)
    assert first.is_completed(), first.message
    assert first.result() == {"ae": "promoted"}
    champion = client.get_model_version_by_alias(name, ALIAS)
    accuracy = client.get_run(champion.run_id).data.metrics[METRIC]
    assert 0.1 < accuracy <= 1 and not math.isnan(accuracy)
    assert client.get_model_version(name, champion.version).tags["retrain.decision"] == "promoted"

    # same data and config: a new version with the same accuracy, which does not beat the champion
    second = retrain(config=cfg, out=str(tmp_path / "out"), margin=0.0, return_state=True)
    assert second.is_completed(), second.message
    assert second.result() == {"ae": "kept"}
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    assert client.get_model_version_by_alias(name, ALIAS).version == champion.version
    newest = max(versions, key=lambda v: int(v.version))
    assert client.get_model_version(name, newest.version).tags["retrain.decision"] == "kept"

    with get_client(sync_client=True) as pc:
        found = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[second.state_details.flow_run_id])))
    md = {a.key: a.data for a in found}["champion-decisions"]
    assert "| ae |" in md and "**kept**" in md
