"""The `retrain` flow's champion decisions: the rule, the registry and run records, and two real flow runs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from ae_repr.config import load_config, validate_config
from evaluation.champion import PairedTest, mcnemar_exact
from flows.retrain import ALIAS, decide, registered_name, retrain, update_champion

ROOT = Path(__file__).resolve().parents[2]


def _test(b: int, c: int, both: int = 300, neither: int = 50) -> PairedTest:
    """A paired test with b rows only the new model gets right and c only the champion."""
    new = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    old = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    return mcnemar_exact(new, old, alpha=0.05)


@pytest.mark.parametrize(("b", "c", "promoted"), [
    (20, 5, True),    # p = 0.002
    (14, 12, False),  # 2 rows better out of 376: the old margin rule would have promoted it
    (0, 0, False),    # identical predictions
    (5, 20, False),
])
def test_decide(b, c, promoted):
    ok, why = decide(_test(b, c))
    assert ok is promoted
    assert f"{b} new-only vs {c} champion-only" in why and "alpha 0.05" in why


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def _version(client: MlflowClient, variant: str) -> object:
    """A run and a registered model version from it."""
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run = client.create_run(exp.experiment_id)
    name = registered_name(variant)
    try:
        client.create_registered_model(name)
    except Exception:  # already there
        pass
    return client.create_model_version(name, f"runs:/{run.info.run_id}/encoder", run_id=run.info.run_id)


def test_update_champion_moves_the_alias_only_when_significantly_better(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = registered_name("ae")
    compared: list[str] = []

    def returns(test: PairedTest):
        def compare(old):
            compared.append(str(old.version))
            return test
        return compare

    v1 = _version(client, "ae")
    d = update_champion(client, "ae", v1, returns(_test(30, 0)))
    assert d.promoted and d.champion_version is None and d.test is None and not compared  # nothing to test
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version)

    v2 = _version(client, "ae")
    d = update_champion(client, "ae", v2, returns(_test(14, 12)))
    assert not d.promoted and d.verdict == "kept" and d.champion_version == str(v1.version)
    assert compared == [str(v1.version)]  # tested against the champion
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version)
    tags = client.get_model_version(name, v2.version).tags
    assert tags["retrain.decision"] == "kept" and tags["retrain.previous_champion"] == str(v1.version)
    assert float(tags["retrain.p_value"]) == pytest.approx(d.test.p_value) and tags["retrain.alpha"] == "0.05"
    run = client.get_run(v2.run_id).data
    assert run.tags["retrain.decision"] == "kept" and "not significantly better" in run.tags["retrain.reason"]
    assert run.metrics["retrain/p_value"] == pytest.approx(d.test.p_value)
    assert (run.metrics["retrain/new_only"], run.metrics["retrain/champion_only"]) == (14, 12)
    assert run.metrics["retrain/val_rows"] == 376
    assert run.metrics["retrain/new_val_accuracy"] == pytest.approx(314 / 376)
    assert run.metrics["retrain/champion_val_accuracy"] == pytest.approx(312 / 376)

    v3 = _version(client, "ae")
    d = update_champion(client, "ae", v3, returns(_test(20, 5)))
    assert d.promoted and d.test.p_value < 0.05
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version)
    assert client.get_model_version(name, v3.version).tags["retrain.decision"] == "promoted"
    assert client.get_run(v3.run_id).data.tags["retrain.decision"] == "promoted"

    d = update_champion(client, "ae", None, returns(_test(30, 0)))  # the variant failed in this run
    assert d.verdict == "skipped" and str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version)


def test_a_champion_that_cannot_be_compared_is_not_replaced_blindly(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    v1 = _version(client, "vae")
    client.set_registered_model_alias(registered_name("vae"), ALIAS, v1.version)
    v2 = _version(client, "vae")

    def compare(old):
        raise OSError("no model files")

    d = update_champion(client, "vae", v2, compare)
    assert not d.promoted and d.test is None and "OSError: no model files" in d.reason
    assert str(client.get_model_version_by_alias(registered_name("vae"), ALIAS).version) == str(v1.version)
    assert client.get_model_version(registered_name("vae"), v2.version).tags["retrain.decision"] == "kept"


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
    accuracy = client.get_run(champion.run_id).data.metrics["eval/linear_probe_accuracy"]
    assert 0.1 < accuracy <= 1 and not math.isnan(accuracy)
    assert client.get_model_version(name, champion.version).tags["retrain.decision"] == "promoted"

    # same data and config: a new version that is no better than the champion, tested on the same validation rows
    second = retrain(config=cfg, out=str(tmp_path / "out"), return_state=True)
    assert second.is_completed(), second.message
    assert second.result() == {"ae": "kept"}
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2
    assert client.get_model_version_by_alias(name, ALIAS).version == champion.version
    newest = max(versions, key=lambda v: int(v.version))
    assert client.get_model_version(name, newest.version).tags["retrain.decision"] == "kept"
    run = client.get_run(newest.run_id).data
    m = {k.removeprefix("retrain/"): v for k, v in run.metrics.items() if k.startswith("retrain/")}
    train_rows = 1347  # digits: 75% of 1,797 rows; a fifth of each class's train rows validates
    assert 0.18 * train_rows < m["val_rows"] < 0.22 * train_rows
    assert m["alpha"] == 0.05 and m["p_value"] > 0.05
    b, c = m["new_only"], m["champion_only"]
    assert m["new_val_accuracy"] - m["champion_val_accuracy"] == pytest.approx((b - c) / m["val_rows"])
    assert m["p_value"] == pytest.approx(sum(math.comb(int(b + c), k) for k in range(int(b), int(b + c) + 1))
                                         / 2 ** (b + c) if b + c else 1.0)
    assert run.tags["retrain.decision"] == "kept" and "McNemar" in run.tags["retrain.reason"]
    assert "paired tests" in second.message and "p_value" in second.message

    with get_client(sync_client=True) as pc:
        found = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[second.state_details.flow_run_id])))
    md = {a.key: a.data for a in found}["champion-decisions"]
    assert "| ae |" in md and "**kept**" in md
