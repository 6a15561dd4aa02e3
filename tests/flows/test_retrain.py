"""The `retrain` flow's champion decisions: the rule, registered names per data set, the registry and run records,
and four real flow runs (a first champion, an unchanged retrain, another data set, changed data)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

from ae_repr.config import load_config, validate_config
from evaluation.champion import PairedTest, mcnemar_exact
from flows.retrain import ALIAS, Registration, decide, registered_name, retrain, update_champion

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


def _version(client: MlflowClient, variant: str) -> Registration:
    """A run and a registered model version from it."""
    exp = client.get_experiment_by_name("t") or client.get_experiment(client.create_experiment("t"))
    run = client.create_run(exp.experiment_id)
    name = registered_name(variant, "digits")
    try:
        client.create_registered_model(name)
    except Exception:  # already there
        pass
    v = client.create_model_version(name, f"runs:/{run.info.run_id}/encoder", run_id=run.info.run_id)
    return Registration(v, run.info.run_id)


def test_update_champion_moves_the_alias_only_when_significantly_better(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    name = registered_name("ae", "digits")
    compared: list[str] = []

    def returns(test: PairedTest):
        def compare(old):
            compared.append(str(old.version))
            return test
        return compare

    v1 = _version(client, "ae")
    d = update_champion(client, name, "ae", v1, returns(_test(30, 0)))
    assert d.promoted and d.champion_version is None and d.test is None and not compared  # nothing to test
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version.version)

    v2 = _version(client, "ae")
    d = update_champion(client, name, "ae", v2, returns(_test(14, 12)))
    assert not d.promoted and d.verdict == "kept" and d.champion_version == str(v1.version.version)
    assert compared == [str(v1.version.version)]  # tested against the champion
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version.version)
    tags = client.get_model_version(name, v2.version.version).tags
    assert tags["retrain.decision"] == "kept" and tags["retrain.previous_champion"] == str(v1.version.version)
    assert float(tags["retrain.p_value"]) == pytest.approx(d.test.p_value) and tags["retrain.alpha"] == "0.05"
    run = client.get_run(v2.run_id).data
    assert run.tags["retrain.decision"] == "kept" and "not significantly better" in run.tags["retrain.reason"]
    assert run.metrics["retrain/p_value"] == pytest.approx(d.test.p_value)
    assert (run.metrics["retrain/new_only"], run.metrics["retrain/champion_only"]) == (14, 12)
    assert run.metrics["retrain/val_rows"] == 376
    assert run.metrics["retrain/new_val_accuracy"] == pytest.approx(314 / 376)
    assert run.metrics["retrain/champion_val_accuracy"] == pytest.approx(312 / 376)

    v3 = _version(client, "ae")
    d = update_champion(client, name, "ae", v3, returns(_test(20, 5)))
    assert d.promoted and d.test.p_value < 0.05
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version.version)
    assert client.get_model_version(name, v3.version.version).tags["retrain.decision"] == "promoted"
    assert client.get_run(v3.run_id).data.tags["retrain.decision"] == "promoted"

    d = update_champion(client, name, "ae", None, returns(_test(30, 0)))  # the variant failed in this run
    assert d.verdict == "skipped"
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version.version)

    # a retrain that only reproduced v1's weights: nothing to compare, the alias stays where it is
    d = update_champion(client, name, "ae", Registration(v1.version, v1.run_id, unchanged=True), returns(_test(30, 0)))
    assert d.verdict == "unchanged" and d.unchanged_since == str(v1.version.version) and not d.promoted
    assert d.line().startswith(f"{name}: unchanged since version {v1.version.version}")
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v3.version.version)
    assert client.get_run(v1.run_id).data.tags["retrain.decision"] == "unchanged"


def test_a_champion_that_cannot_be_compared_is_not_replaced_blindly(tmp_path):
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    v1 = _version(client, "vae")
    name = registered_name("vae", "digits")
    client.set_registered_model_alias(name, ALIAS, v1.version.version)
    v2 = _version(client, "vae")

    def compare(old):
        raise OSError("no model files")

    d = update_champion(client, name, "vae", v2, compare)
    assert not d.promoted and d.test is None and "OSError: no model files" in d.reason
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == str(v1.version.version)
    assert client.get_model_version(name, v2.version.version).tags["retrain.decision"] == "kept"


def test_registered_names_separate_data_sets():
    assert registered_name("vae", "digits") == "ae-repr-digits-vae"
    assert registered_name("beta_vae", "dsprites:2000") == "ae-repr-dsprites-2000-beta_vae"
    assert registered_name("ae", "/data/Scans v2.npz") == "ae-repr-data-scans-v2-npz-ae"
    long_a, long_b = (registered_name("ae", f"/mnt/{d}/" + "x" * 60 + "/data.npz") for d in ("a", "b"))
    assert long_a != long_b and len(long_a) <= len("ae-repr--ae") + 48  # a long path: its end and a hash


def _digits_file(path: Path, rows: slice) -> str:
    """Some of scikit-learn's digits as an .npz data file (images and labels): another data set."""
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(path, x=d.images.astype(np.uint8)[rows, None], y=d.target[rows])
    return str(path)


@pytest.fixture(scope="module")
def retrains(prefect_harness, tmp_path_factory):
    """(MLflow URI, the data file's spec, the final states of four retrains): on digits, on digits again (served
    from the cache), on another data set (an .npz file), and on that file after its content changed."""
    tmp = tmp_path_factory.mktemp("retrain")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    d = load_config(ROOT / "configs" / "quick.yaml").model_dump(mode="json")
    d["models"]["variants"] = ["ae"]
    d["train"]["epochs"] = 1
    d["eval"].update({"baselines": ["pca"], "fewshot_finetune": False, "applications": []})
    d["tracking"].update({"enabled": True, "log_plots": False})
    cfg = validate_config(d)
    data = tmp / "other.npz"
    states = {}
    with pytest.MonkeyPatch.context() as mp, temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp / "results"}):
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for key, dataset, out, rows in (("digits", None, "digits", None), ("cached", None, "digits", None),
                                        ("other", str(data), "other", slice(0, 1200)),
                                        ("changed", str(data), "other", slice(597, None))):
            if rows is not None:
                _digits_file(data, rows)
            states[key] = retrain(config=cfg, dataset=dataset, out=str(tmp / out), return_state=True)
    return uri, str(data), states


def _versions(client: MlflowClient, name: str) -> list[str]:
    return sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))


def test_retrain_registers_the_first_champion_per_data_set(retrains):
    uri, _, states = retrains
    client = _client(uri)
    first = states["digits"]
    assert first.is_completed(), first.message
    assert first.result() == {"ae": "promoted"}
    name = registered_name("ae", "digits")
    champion = client.get_model_version_by_alias(name, ALIAS)
    assert first.message == (f"retrain on digits: {name}: promoted v{champion.version} to champion: "
                             "no earlier champion to test against")
    accuracy = client.get_run(champion.run_id).data.metrics["eval/linear_probe_accuracy"]
    assert 0.1 < accuracy <= 1 and not math.isnan(accuracy)
    assert client.get_model_version(name, champion.version).tags["retrain.decision"] == "promoted"
    assert client.get_registered_model(name).tags["dataset"] == "digits"


def test_retrain_served_from_the_cache_registers_nothing(retrains):
    uri, _, states = retrains
    client = _client(uri)
    name = registered_name("ae", "digits")
    cached = states["cached"]
    assert cached.is_completed(), cached.message
    assert cached.result() == {"ae": "unchanged"}
    assert _versions(client, name) == ["1"]  # no second version of the same weights
    assert cached.message.startswith(f"retrain on digits: {name}: unchanged since version 1 (the trained weights "
                                     "are version 1's, sha256 ")
    assert cached.message.endswith("nothing registered, nothing compared; champion v1 stays")
    with get_client(sync_client=True) as pc:
        found = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[cached.state_details.flow_run_id])))
        logs = [log.message for log in pc.read_logs(log_filter=LogFilter(
            flow_run_id=LogFilterFlowRunId(any_=[cached.state_details.flow_run_id])))]
    assert any(m.startswith(f"{name}: unchanged since version 1") for m in logs), logs[-5:]
    md = {a.key: a.data for a in found}["champion-decisions"]
    assert "| ae | ae-repr-digits-ae | – (same as v1) | 1 |" in md and "**unchanged**" in md


def test_another_data_set_gets_its_own_registered_model_and_champion(retrains):
    uri, data, states = retrains
    client = _client(uri)
    other = states["other"]
    assert other.is_completed(), other.message
    assert other.result() == {"ae": "promoted"}
    name = registered_name("ae", data)
    assert name != registered_name("ae", "digits")
    assert _versions(client, name)[0] == "1" and client.get_registered_model(name).tags["dataset"] == data
    # the digits model keeps its single version and its champion, whatever ran on the other data set
    assert _versions(client, registered_name("ae", "digits")) == ["1"]
    assert str(client.get_model_version_by_alias(registered_name("ae", "digits"), ALIAS).version) == "1"


def test_retrain_on_changed_data_trains_registers_and_decides(retrains):
    uri, data, states = retrains
    client = _client(uri)
    name = registered_name("ae", data)
    changed = states["changed"]
    assert changed.is_completed(), changed.message
    assert _versions(client, name) == ["1", "2"]  # the changed data trained a new model
    new = client.get_model_version(name, "2")
    decision = changed.result()["ae"]
    run = client.get_run(new.run_id).data
    m = {k.removeprefix("retrain/"): v for k, v in run.metrics.items() if k.startswith("retrain/")}
    assert decision == ("promoted" if m["p_value"] <= m["alpha"] else "kept")
    assert str(client.get_model_version_by_alias(name, ALIAS).version) == ("2" if decision == "promoted" else "1")
    assert new.tags["retrain.decision"] == decision and new.tags["retrain.previous_champion"] == "1"
    train_rows = 900  # 75% of the file's 1,200 rows; a fifth of each class's train rows validates
    assert 0.18 * train_rows < m["val_rows"] < 0.22 * train_rows
    assert m["alpha"] == 0.05
    b, c = m["new_only"], m["champion_only"]
    assert m["margin"] == pytest.approx(m["new_val_accuracy"] - m["champion_val_accuracy"])
    assert m["margin"] == pytest.approx((b - c) / m["val_rows"])
    assert m["margin/ci_low"] <= m["margin"] <= m["margin/ci_high"]
    assert m["new_val_accuracy/ci_low"] <= m["new_val_accuracy"] <= m["new_val_accuracy/ci_high"]
    assert m["p_value"] == pytest.approx(sum(math.comb(int(b + c), k) for k in range(int(b), int(b + c) + 1))
                                         / 2 ** (b + c) if b + c else 1.0)
    # the decision and its statistic are the flow run's final message
    verb = ("promoted v2 over v1 to champion: new model significantly better" if decision == "promoted"
            else "kept champion v1, new v2 registered: new model not significantly better")
    assert changed.message.startswith(f"retrain on {data}: {name}: {verb}: validation accuracy new "
                                      f"{m['new_val_accuracy']:.4f} [{m['new_val_accuracy/ci_low']:.4f}, "
                                      f"{m['new_val_accuracy/ci_high']:.4f}] vs champion "
                                      f"{m['champion_val_accuracy']:.4f} ["), changed.message
    assert (f"margin {m['margin']:+.4f} [{m['margin/ci_low']:+.4f}, {m['margin/ci_high']:+.4f}]" in changed.message)
    assert f"McNemar exact one-sided p = {m['p_value']:.4g}" in changed.message
