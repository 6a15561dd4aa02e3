"""MLflow tracking of the flow against a real SQLite store, checked with MlflowClient only.

One tiny flow run (quick config, ae + vae, 1 epoch) is shared by the module; `ae-repr log-run` of its run
directory into a second store must record the same things; a store that goes down mid-run leaves the
run complete on disk with `tracking_pending.json`, which `log-run` then uploads.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from ae_repr.cli import main
from ae_repr.config import load_config
from ae_repr.io import read_features, read_json

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("ae", "vae")
EPOCHS = 1
SECRET = "tok-3f9a8b7c6d5e4f"  # an environment variable's value that must never reach MLflow


def _cfg():
    """configs/quick.yaml with tracking on, two variants, one epoch and one baseline (to keep the module fast)."""
    cfg = load_config(ROOT / "configs" / "quick.yaml").with_overrides(variants=list(VARIANTS), epochs=EPOCHS)
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": True}),
                                  "eval": cfg.eval.model_copy(update={"baselines": ("pca",)})})


class _Env:
    """Set environment variables for a module-scoped fixture and put the old values back."""

    def __init__(self, **values: str) -> None:
        self.old = {k: os.environ.get(k) for k in values}
        os.environ.update(values)

    def restore(self) -> None:
        for k, v in self.old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, prefect_harness):
    """(tracking URI, run directory) of one tracked flow run."""
    from flows.pretrain_and_probe import pretrain_and_probe

    tmp = tmp_path_factory.mktemp("tracked")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = _Env(MLFLOW_TRACKING_URI=uri, AE_REPR_TEST_API_TOKEN=SECRET)
    try:
        out = tmp / "out"
        state = pretrain_and_probe(config=_cfg(), out=str(out), return_state=True)
        assert state.is_completed(), state.message
        yield uri, out
    finally:
        env.restore()


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)  # else the registry follows the process-wide tracking URI


def _children(client: MlflowClient, parent_id: str, kind: str = "variant") -> dict[str, object]:
    """A parent's child runs of one kind (variant, baseline), by representation."""
    runs = client.search_runs([client.get_run(parent_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}' and "
                                            f"tags.`ae_repr.run_kind` = '{kind}'")
    return {r.data.tags["representation"]: r for r in runs}


def _parent(client: MlflowClient, experiment: str = "pretrain-and-probe"):
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment} missing"
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'parent'",
                                 order_by=["attributes.start_time DESC"])
    assert parents, "no parent run"
    return exp, parents[0]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_parent_run(tracked):
    uri, out = tracked
    client = _client(uri)
    exp, parent = _parent(client)
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert Path(exp.artifact_location.removeprefix("file://")).is_absolute()
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    # named by what ran and which flow run, not by MLflow's random words
    assert tags["prefect.flow_run_id"] and parent.info.run_name == (
        f"{tags['dataset']}: {tags['ae_repr.variants']} ({tags['prefect.flow_run_name']})")
    assert tags["dataset"] == "digits" and parent.info.run_name.startswith("digits: ae,")
    assert tags["dataset_sha256"] == read_features(out / "features" / "ae.parquet").meta["dataset_sha256"]
    assert tags["git_commit"] == "unknown" or len(tags["git_commit"]) == 40
    assert tags["best_variant"] in VARIANTS
    arts = _artifacts(client, parent.info.run_id)
    assert {"config.json", "summary.parquet", "verdict.md", "report.md"} <= arts
    assert any(a.startswith("plots/") and a.endswith(".png") for a in arts), arts
    verdict = (out / "verdict.md").read_text().strip()
    assert verdict.startswith("On digits (K=8), ") and tags["mlflow.note.content"] == verdict  # the run's description
    summary = pd.read_parquet(out / "summary.parquet")
    probe = summary[(summary.task == "linear_probe") & (summary.metric == "accuracy")].set_index("representation")
    for v in VARIANTS:
        assert parent.data.metrics[f"{v}/linear_probe_accuracy"] == pytest.approx(probe.loc[v, "value"])
    assert parent.data.metrics["best_linear_probe_accuracy"] == max(probe.loc[list(VARIANTS), "value"])
    # the baselines' headline numbers with their intervals, for `ae-repr compare`
    assert parent.data.metrics["baseline/pca/linear_probe_accuracy"] == pytest.approx(probe.loc["pca", "value"])
    assert parent.data.metrics["baseline/pca/linear_probe_accuracy/ci_low"] == pytest.approx(probe.loc["pca", "ci_low"])
    assert parent.data.params["train.epochs"] == str(EPOCHS)
    where = read_json(out / "tracking.json")  # what `ae-repr run` prints the parent run's address from
    assert where["parent_run_id"] == parent.info.run_id and where["experiment"] == exp.name


def test_variant_runs(tracked):
    uri, out = tracked
    client = _client(uri)
    _, parent = _parent(client)
    children = _children(client, parent.info.run_id)
    assert set(children) == set(VARIANTS)
    summary = pd.read_parquet(out / "summary.parquet")
    for v, run in children.items():
        rid = run.info.run_id
        assert run.info.status == "FINISHED" and run.info.run_name == v
        params = run.data.params
        assert params["variant"] == v and params["model.latent_dim"] == "8" and params["train.epochs"] == str(EPOCHS)
        assert "model.hidden" in params
        for key in ("train/loss", "train/recon", "val/loss", "val/recon", "lr", "epoch_time_s"):
            assert len(client.get_metric_history(rid, key)) == EPOCHS, key
        if v == "vae":
            assert len(client.get_metric_history(rid, "train/kl")) == EPOCHS
        rows = summary[summary.representation == v]
        acc = rows[(rows.task == "linear_probe") & (rows.metric == "accuracy")].value.item()
        assert run.data.metrics["eval/linear_probe_accuracy"] == pytest.approx(acc)
        assert "eval/linear_probe_macro_f1" in run.data.metrics
        assert "eval/fewshot_frozen_accuracy_k5" in run.data.metrics
        assert any(k.startswith("eval/knn_accuracy") for k in run.data.metrics)
        for task, metric in (("anomaly", "auroc"), ("inpainting", "mse_masked"), ("generation", "classifier_score"),
                             ("augmentation", "accuracy_delta")):  # the application tasks' numbers too
            value = rows[(rows.task == task) & (rows.metric == metric)].value.item()
            key = f"eval/{task}_{metric}" + ("_k5" if task == "augmentation" else "")
            assert run.data.metrics[key] == pytest.approx(value), key
        if v == "vae":
            assert "eval/generation_nll_is" in run.data.metrics and "eval/rate_distortion_rate" in run.data.metrics
        (ds,) = run.inputs.dataset_inputs
        assert ds.dataset.name == "digits" and parent.data.tags["dataset_sha256"].startswith(ds.dataset.digest)
        arts = _artifacts(client, rid)
        assert {f"features/{v}.parquet", "history.json", "plots/loss_curves.png", "plots/reconstructions.png",
                "plots/latent_map.png"} <= arts, arts
        assert ("plots/prior_samples.png" in arts) == (v == "vae")  # a plain AE has no prior
        assert read_features(out / "features" / f"{v}.parquet").meta["mlflow_run_id"] == rid
        # threads: the task ran in this process, which tagged its run with itself
        assert run.data.tags["ae_repr.worker"] == f"{socket.gethostname()}:{os.getpid()}"


def test_baseline_runs_sit_beside_the_variant_runs(tracked):
    """Each baseline is a finished child run with the variants' metric names, and the experiment's saved view
    lists baselines and variants together, best linear probe first."""
    import json

    uri, out = tracked
    client = _client(uri)
    exp, parent = _parent(client)
    baselines = _children(client, parent.info.run_id, "baseline")
    assert set(baselines) == {"pca"}  # the configured baseline; chance and the application references have no
    # headline number
    summary = pd.read_parquet(out / "summary.parquet").set_index(["representation", "task", "metric"])
    run = baselines["pca"]
    assert run.info.run_name == "pca (baseline)" and run.info.status == "FINISHED"
    assert run.data.tags["dataset"] == "digits" and "variant" not in run.data.tags
    row = summary.loc[("pca", "linear_probe", "accuracy")]
    assert run.data.metrics["eval/linear_probe_accuracy"] == pytest.approx(row["value"])
    assert run.data.metrics["eval/linear_probe_accuracy/ci_low"] == pytest.approx(row["ci_low"])
    assert run.data.metrics["eval/knn_accuracy_5nn"] == pytest.approx(summary.loc[("pca", "knn", "accuracy_5nn"),
                                                                                  "value"])
    variant_keys = set(_children(client, parent.info.run_id)["ae"].data.metrics)
    assert {k for k in run.data.metrics if k.startswith("eval/linear_probe")} <= variant_keys  # one column each
    # the saved view, as the UI asks the server for it
    view = json.loads(exp.tags["mlflow.sharedViewState.variants"])
    listed = client.search_runs([exp.experiment_id], filter_string=view["searchFilter"],
                                order_by=[f"{view['orderByKey']} DESC"])
    names = [r.info.run_name for r in listed]
    assert {*VARIANTS, "pca (baseline)"} <= set(names) and not any(":" in n for n in names)  # no parent runs
    accuracies = [r.data.metrics["eval/linear_probe_accuracy"] for r in listed]
    assert accuracies == sorted(accuracies, reverse=True)
    assert "metrics.`eval/linear_probe_accuracy`" in view["selectedColumns"]


def test_headline_artifact_shows_baselines_beside_variants(tracked):
    """The flow run's `headline-results` markdown has a row per variant and per baseline with its linear probe."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    uri, out = tracked
    _, parent = _parent(_client(uri))
    with get_client(sync_client=True) as pc:
        (artifact,) = pc.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[parent.data.tags["prefect.flow_run_id"]]),
            key=ArtifactFilterKey(any_=["headline-results"])))
    lines = artifact.data.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| representation | linear probe acc |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = {line.split("|")[1].strip(): line for line in lines[start + 2 : end]}  # the headline table's rows
    summary = pd.read_parquet(out / "summary.parquet")
    probe = summary[(summary.task == "linear_probe") & (summary.metric == "accuracy")].set_index("representation")
    for name in (*VARIANTS, "pca"):
        r = probe.loc[name]
        assert name in rows, f"{name} missing from the headline artifact: {sorted(rows)}"
        first = rows[name].split("|")[2].strip().strip("*")  # the linear probe column, bold or not
        assert first == f"{r['value']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]", rows[name]


def test_registered_encoder_encodes_new_data(tracked, monkeypatch):
    import mlflow
    import torch

    from ae_repr.encoder import Encoder

    uri, out = tracked
    client = _client(uri)
    for v in VARIANTS:
        assert "champion" in client.get_registered_model(f"ae-repr-digits-{v}").aliases
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # set_tracking_uri exports it too: put it back afterwards
    mlflow.set_tracking_uri(uri)
    encoder = mlflow.pytorch.load_model("models:/ae-repr-digits-vae@champion")
    new = np.random.default_rng(7).integers(0, 17, size=(5, 1, 8, 8)).astype(np.float32)  # raw digit-like rows
    z = encoder(torch.from_numpy(new)).detach().numpy()
    assert z.shape == (5, 8)
    expected = Encoder.from_dir(out / "models" / "vae")(torch.from_numpy(new)).detach().numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-4, atol=1e-5)
    served = mlflow.pyfunc.load_model("models:/ae-repr-digits-vae@champion").predict(new)
    assert np.asarray(served).shape == (5, 8)


def test_no_environment_or_credentials_in_params_or_tags(tracked):
    uri, _ = tracked
    client = _client(uri)
    _, parent = _parent(client)
    for run in [parent, *_children(client, parent.info.run_id).values()]:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert SECRET not in value, key
            assert "AE_REPR_TEST_API_TOKEN" not in key and "MLFLOW_TRACKING_URI" not in key


def _summary_of(client: MlflowClient, experiment: str) -> dict[str, object]:
    """What an experiment holds about its latest flow run, comparable across experiments."""
    _, parent = _parent(client, experiment)
    out = {"parent_params": parent.data.params, "parent_metrics": sorted(parent.data.metrics),
           "parent_artifacts": _artifacts(client, parent.info.run_id),
           "verdict": parent.data.tags.get("mlflow.note.content")}
    for name, run in _children(client, parent.info.run_id, "baseline").items():
        out[name] = {"status": run.info.status, "name": run.info.run_name, "metrics": run.data.metrics}
    for v, run in _children(client, parent.info.run_id).items():
        out[v] = {
            "status": run.info.status,
            "params": run.data.params,
            "metrics": sorted(k for k in run.data.metrics if not k.startswith("system/")),
            "epochs": len(client.get_metric_history(run.info.run_id, "train/loss")),
            "eval": {k: round(x, 6) for k, x in run.data.metrics.items() if k.startswith("eval/")},
            "artifacts": _artifacts(client, run.info.run_id),
            "registered": "champion" in client.get_registered_model(f"ae-repr-digits-{v}").aliases,
            "model_version": run.data.tags.get("ae_repr.model_version"),
        }
    return out


def test_log_run_uploads_what_a_live_run_records(tracked, monkeypatch, capsys):
    uri, out = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["log-run", str(out), "--experiment", "uploaded"]) == 0
    assert "parent run" in capsys.readouterr().out
    client = _client(uri)
    assert _summary_of(client, "uploaded") == _summary_of(client, "pretrain-and-probe")


def test_store_down_mid_run_then_log_run(tracked, tmp_path, monkeypatch):
    """Writes fail for good after the start: the run completes on disk, says what was not logged, uploads later."""
    from flows.tracking import PENDING, Recorder

    uri, src = tracked
    out = tmp_path / "out"
    shutil.copytree(src, out)
    (out / PENDING).unlink(missing_ok=True)
    cfg = _cfg().model_copy(update={"tracking": _cfg().tracking.model_copy(update={"retries": 2,
                                                                                    "retry_backoff_s": 0.01})})
    info = {"dataset": "digits", "sha256": read_features(out / "features" / "ae.parquet").meta["dataset_sha256"],
            "rows": 1797, "shape": [1, 8, 8]}
    tracker = Recorder.start(cfg, out, info, np.zeros((4, 1, 8, 8), np.float32))
    runs = {v: tracker.start_variant(v) for v in VARIANTS}
    assert all(runs.values())
    calls = {"n": 0}

    def down(*args, **kwargs):
        calls["n"] += 1
        raise ConnectionError("connection refused")

    session = tracker._session
    assert session.writer.drain(30)  # the start's writes are done: from here on the store is down
    monkeypatch.setattr(session.client, "log_batch", down)
    monkeypatch.setattr(session.client, "log_artifact", down)
    monkeypatch.setattr(session.client, "set_terminated", down)
    tracker.metric_logger("ae")({"train/loss": 1.0}, 1)
    start = time.monotonic()
    tracker.log_results({})
    tracker.finish({})
    assert time.monotonic() - start < 30
    assert calls["n"] == 3, "after its retries the writer must stop trying"
    pending = read_json(out / PENDING)
    assert pending["parent_run_id"] == tracker.parent_id and pending["runs"] == runs
    assert pending["offline_since"] and len(pending["not_logged"]) > 5
    assert pending["upload_with"] == f"ae-repr log-run {out}"
    monkeypatch.undo()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["log-run", str(out)]) == 0
    assert not (out / PENDING).exists()
    client = _client(uri)
    _, parent = _parent(client)
    assert parent.data.tags["ae_repr.replaces"] == tracker.parent_id
    assert parent.data.tags["ae_repr.out_dir"] == str(out)
    assert set(_children(client, parent.info.run_id)) == set(VARIANTS)
    old = client.get_run(tracker.parent_id)
    assert old.data.tags["ae_repr.superseded_by"] == parent.info.run_id and old.info.status == "FAILED"


def test_a_killed_runs_mlflow_runs_are_ended_by_the_next_run_into_its_folder(tracked, tmp_path, monkeypatch):
    """A run killed outright leaves its runs RUNNING; the next run into the folder ends them KILLED and links to
    the killed parent; runs that ended (FINISHED) are left alone. (An experiment of its own: the module's other
    tests read the tracked run's.)"""
    import atexit

    from flows.tracking import Recorder

    uri, src = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    out = tmp_path / "out"
    shutil.copytree(src, out)
    info = {"dataset": "digits", "sha256": "0" * 64, "rows": 1797, "shape": [1, 8, 8]}
    cfg = _cfg().model_copy(update={"tracking": _cfg().tracking.model_copy(update={"experiment": "killed"})})
    killed = Recorder.start(cfg, out, info, np.zeros((4, 1, 8, 8), np.float32))
    runs = {v: killed.start_variant(v) for v in VARIANTS}
    atexit.unregister(killed.abandon)  # as SIGKILL would: nothing ends the runs
    assert killed._session.close(30)
    client = _client(uri)
    assert {client.get_run(r).info.status for r in (*runs.values(), killed.parent_id)} == {"RUNNING"}

    rerun = Recorder.start(cfg, out, info, np.zeros((4, 1, 8, 8), np.float32))
    rerun.finish({})
    for run_id in (*runs.values(), killed.parent_id):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and rerun.parent_id in run.data.tags["failure_reason"]
    assert client.get_run(rerun.parent_id).data.tags["ae_repr.rerun_of"] == killed.parent_id

    again = Recorder.start(cfg, out, info, np.zeros((4, 1, 8, 8), np.float32))  # the rerun ended: no rerun_of
    again.finish({})
    assert client.get_run(rerun.parent_id).info.status == "FINISHED"
    assert "ae_repr.rerun_of" not in client.get_run(again.parent_id).data.tags


def test_compare_reads_runs_back(tracked, tmp_path, monkeypatch, capsys):
    uri, _ = tracked
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    csv = tmp_path / "compare.csv"
    assert main(["compare", "--last", "1", "--csv", str(csv)]) == 0
    text = capsys.readouterr().out
    assert "linear_probe_accuracy" in text and " vae " in text.replace("│", " ")
    table = pd.read_csv(csv)
    assert set(table.loc[table["kind"] == "variant", "representation"]) == set(VARIANTS)
    assert "pca" in set(table.loc[table["kind"] == "baseline", "representation"])  # baselines beside the variants
    assert table["eval/linear_probe_accuracy"].notna().all()
    assert table["eval/linear_probe_accuracy/ci_low"].notna().all()  # the intervals were logged too
    assert main(["compare", "--experiment", "no-such-experiment"]) == 2
    assert "no MLflow experiment named 'no-such-experiment'" in capsys.readouterr().err
    assert main(["compare", "--last", "0"]) == 2


def test_writer_retries_then_goes_offline():
    from flows.tracking.writer import Writer

    w = Writer(retries=2, backoff_s=0.01)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionError("refused")
        return "ok"

    def down():
        attempts.append(1)
        raise ConnectionError("refused")

    assert w.call("flaky", flaky, "r1") == "ok" and not w.offline
    attempts.clear()
    assert w.call("down", down, "r1") is None
    assert len(attempts) == 3 and w.offline
    assert w.call("later", lambda: attempts.append(1), "r1") is None and len(attempts) == 3
    assert [n.what for n in w.not_logged] == ["down", "later"]
    assert w.close(5)
    json.dumps([n.__dict__ for n in w.not_logged])


def test_a_registered_name_another_run_created_is_kept_as_it_was(tmp_path: Path) -> None:
    """The second of two runs registering a new name (at the same moment, in the scenario tests) is told it
    exists and goes on: the first run's tags and description stay, nothing raises."""
    from mlflow import MlflowClient

    from flows.tracking.models import ensure_name

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    ensure_name(client, "ae-repr-digits-vae", "vae", "digits")
    ensure_name(client, "ae-repr-digits-vae", "beta_vae", "other")
    model = client.get_registered_model("ae-repr-digits-vae")
    assert model.tags == {"dataset": "digits", "variant": "vae"}
    assert model.description.startswith("vae encoder trained on digits")
