"""A seed grid through the flow: one variant x two pretraining seeds on a tiny config, tracked in a SQLite store.

Checks the per-seed folders, feature files and rows, the aggregate row (mean and Student-t interval over the
seeds), that the seeds' models really differ, the report, the contract checker, and MLflow: one child run per
(variant, seed) with its tags, one registered version per seed tagged with it, and `ae-repr compare`
showing the aggregate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
from scipy import stats

from ae_repr.config import load_config
from ae_repr.io import read_features, read_json
from flows.tracking import registered_name
from flows.tracking.models import MODEL_VERSION_TAG

ROOT = Path(__file__).resolve().parents[2]
SEEDS = (0, 1)
MEMBERS = ("ae@seed=0", "ae@seed=1")
CHECKER = Path("/work/shared/tools/check_run_dir.py")


def _cfg():
    """configs/quick.yaml cut to one variant, one epoch, one baseline and no application task; tracking on."""
    d = load_config(ROOT / "configs" / "quick.yaml").model_dump(mode="json")
    d["models"]["variants"] = ["ae"]
    d["train"]["epochs"] = 1
    d["eval"].update({"baselines": ["pca"], "knn_k": [5], "applications": []})
    d["tracking"]["enabled"] = True
    from ae_repr.config import validate_config

    return validate_config(d)


@pytest.fixture(scope="module")
def grid(prefect_harness, tmp_path_factory):
    """(tracking URI, run directory, final state) of one flow run with `seeds=[0, 1]`."""
    from flows.pretrain_and_probe import pretrain_and_probe

    tmp = tmp_path_factory.mktemp("grid")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp / "prefect-results"}):
            state = pretrain_and_probe(config=_cfg(), out=str(tmp / "out"), seeds=list(SEEDS), return_state=True)
        yield uri, tmp / "out", state
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def _probe(out: Path) -> pd.DataFrame:
    s = pd.read_parquet(out / "summary.parquet")
    return s[(s.task == "linear_probe") & (s.metric == "accuracy")].set_index("representation")


def test_each_seed_has_its_own_model_features_and_rows(grid):
    _, out, state = grid
    assert state.is_completed(), state.message
    assert sorted(p.name for p in (out / "models").iterdir()) == list(MEMBERS)  # no models/ae/
    assert sorted(p.name for p in (out / "features").glob("*.parquet")) == sorted(
        [f"{m}.parquet" for m in MEMBERS] + ["pca.parquet"])
    for seed, name in zip(SEEDS, MEMBERS, strict=True):
        desc = read_json(out / "models" / name / "config.json")
        assert desc["seed"] == seed and desc["split"]["seed"] == 0  # trained with its seed; the split stays
        meta = read_features(out / "features" / f"{name}.parquet").meta
        assert meta["variant"] == "ae" and meta["seed"] == str(seed)
        assert (out / "eval" / "representations" / f"{name}.parquet").is_file()
    # the seeds give different models: the same architecture, other weights
    w0, w1 = (torch.load(out / "models" / m / "model.pt", map_location="cpu", weights_only=True) for m in MEMBERS)
    w0, w1 = (w.get("state_dict", w) for w in (w0, w1))
    assert w0.keys() == w1.keys()
    assert not all(torch.equal(w0[k], w1[k]) for k in w0 if torch.is_floating_point(w0[k]))
    f0, f1 = (read_features(out / "features" / f"{m}.parquet") for m in MEMBERS)
    assert not np.allclose(f0.z, f1.z)
    # baselines once, variant figures for the first seed only
    assert (out / "plots" / MEMBERS[0] / "loss_curves.png").is_file()
    assert not (out / "plots" / MEMBERS[1]).exists() and not (out / "plots" / "ae").exists()


def test_summary_holds_per_seed_rows_and_the_aggregate(grid):
    _, out, _ = grid
    probe = _probe(out)
    assert set(probe.index) == {*MEMBERS, "ae", "pca"}
    per_seed = probe.loc[list(MEMBERS), "value"].to_numpy()
    lo, hi = stats.t.interval(0.95, df=1, loc=per_seed.mean(), scale=stats.sem(per_seed))
    ae = probe.loc["ae"]
    assert ae["value"] == pytest.approx(per_seed.mean()) and ae["n_seeds"] == 2
    assert (ae["ci_low"], ae["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
    assert ae["ci_method"] == "pretraining_seeds"
    assert (probe.loc[list(MEMBERS), "ci_method"] == "test_bootstrap").all()
    assert probe.loc["pca", "ci_method"] == "test_bootstrap"
    s = pd.read_parquet(out / "summary.parquet")
    # every per-seed (task, metric, k) has its aggregate
    keys = lambda rows: set(map(tuple, rows[["task", "metric", "k"]].astype(str).to_numpy()))  # noqa: E731
    assert keys(s[s.representation == "ae"]) == keys(s[s.representation == MEMBERS[0]])
    report = (out / "report.md").read_text()
    assert f"| ae | {ae['value']:.3f} [{ae['ci_low']:.3f}, {ae['ci_high']:.3f}] |" in report
    assert "| ae@seed=" not in report and "mean over the 2 seeds" in report


@pytest.mark.skipif(not CHECKER.is_file(), reason="the contract checker is not on this machine")
def test_the_contract_checker_accepts_the_run_directory(grid):
    _, out, _ = grid
    done = subprocess.run([sys.executable, str(CHECKER), str(out), "--latent-dim", "8"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mlflow_has_a_run_and_a_registered_version_per_seed(grid, monkeypatch, capsys):
    uri, out, _ = grid
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("pretrain-and-probe")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ae_repr.run_kind` = 'parent'")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    runs = {c.info.run_name: c for c in children if c.data.tags.get("variant")}  # the baselines' runs aside
    assert {c.info.run_name for c in children} - set(runs) == {"pca (baseline)"}
    assert set(runs) == set(MEMBERS)
    probe = _probe(out)
    for seed, name in zip(SEEDS, MEMBERS, strict=True):
        run = runs[name]
        assert run.data.tags["variant"] == "ae" and run.data.tags["seed"] == str(seed)
        assert run.data.params["seed"] == str(seed) and run.info.status == "FINISHED"
        assert run.data.metrics["eval/linear_probe_accuracy"] == pytest.approx(probe.loc[name, "value"])
        assert read_features(out / "features" / f"{name}.parquet").meta["mlflow_run_id"] == run.info.run_id
    versions = client.search_model_versions(f"name = '{registered_name('ae', 'digits')}'")
    assert sorted((v.tags.get("seed"), v.run_id) for v in versions) == sorted(
        (str(s), runs[m].info.run_id) for s, m in zip(SEEDS, MEMBERS, strict=True))
    # the parent carries the aggregate, which `compare` shows as the variant's one row
    ae = probe.loc["ae"]
    assert parent.data.metrics["ae/linear_probe_accuracy"] == pytest.approx(ae["value"])
    assert parent.data.metrics["seeds/ae/linear_probe_accuracy/ci_low"] == pytest.approx(ae["ci_low"])
    assert parent.data.metrics["seeds/ae/n_seeds"] == 2 and parent.data.tags["best_variant"] == "ae"
    from flows.tracking import compare_runs

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    table = compare_runs("pretrain-and-probe", 1).table.set_index("representation")
    assert sorted(table.index) == ["ae", "pca"]
    assert table.loc["ae", "kind"] == "variant, 2 seeds" and table.loc["ae", "status"] == "FINISHED"
    assert table.loc["ae", "eval/linear_probe_accuracy"] == pytest.approx(ae["value"])
    assert table.loc["ae", "eval/linear_probe_accuracy/ci_high"] == pytest.approx(ae["ci_high"])


def test_retrain_takes_the_representative_seeds_version(grid):
    from evaluation.seeds import representative_members
    from flows.retrain import new_versions

    uri, out, state = grid
    client = MlflowClient(uri, registry_uri=uri)
    chosen = representative_members(out, ["ae"])
    assert chosen["ae"] in MEMBERS
    (found,) = new_versions(client, "pretrain-and-probe", str(state.state_details.flow_run_id), "digits",
                            chosen).values()
    assert found.version.tags["seed"] == chosen["ae"].rsplit("=", 1)[1]


def test_log_run_uploads_the_grid_as_a_live_run_records_it(grid, monkeypatch):
    """(Last in the module: it adds an experiment.)"""
    from ae_repr.cli import main

    uri, out, _ = grid
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["log-run", str(out), "--experiment", "uploaded"]) == 0
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("uploaded")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`ae_repr.run_kind` = 'parent'")
    children = [c for c in client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                if c.data.tags.get("variant")]  # the baselines' runs aside
    assert sorted((c.info.run_name, c.data.tags["variant"], c.data.tags["seed"], c.info.status) for c in children) == [
        (m, "ae", str(s), "FINISHED") for s, m in zip(SEEDS, MEMBERS, strict=True)]
    assert parent.data.metrics["seeds/ae/n_seeds"] == 2
    # the weights are registered already: each uploaded run names its seed's version instead of adding one
    name = registered_name("ae", "digits")
    seeds = {c.data.tags["seed"]: client.get_model_version(name, c.data.tags[MODEL_VERSION_TAG]).tags.get("seed")
             for c in children}
    assert seeds == {"0": "0", "1": "1"}
