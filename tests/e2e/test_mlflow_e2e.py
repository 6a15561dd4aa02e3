"""End to end against a real `mlflow server`, checked with MlflowClient and in the UI (headless Chromium).

The server is the session's (scripts/services.py, tests/e2e/conftest.py): SQLite backend and artifacts in
tmp, on a free loopback port, stopped by process group. The tracked run is the session's deployment run of
`pretrain-and-probe` (real Prefect server and worker); `ae-repr run` itself writes into it in the
concurrent-runs scenario. A closed port must fail a run fast, before any training.
"""

from __future__ import annotations

import html
import os
import re
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import background
import pytest
import yaml
from e2e_stack import BIN, ROOT, VARIANTS, TrackedRun, svc

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")


def _env(**extra: str) -> dict[str, str]:
    """The session's starting environment (not a test's monkeypatched one), no telemetry, and `extra`."""
    env = {**background.environ(), "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
           "TQDM_DISABLE": "1"}
    env.pop("PREFECT_API_URL", None)  # in-process run: an ephemeral Prefect API
    env.update(extra)
    return env


def _config(tmp: Path, **tracking: Any) -> Path:
    """The quick config with tracking on, two variants, one epoch and one baseline."""
    cfg = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    cfg["tracking"] = {"enabled": True, **tracking}
    cfg["models"]["variants"] = list(VARIANTS)
    cfg["train"]["epochs"] = 1
    cfg.setdefault("eval", {})["baselines"] = ["pca"]
    path = tmp / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_run_is_tracked_on_the_server(tracked_run: TrackedRun):
    from mlflow import MlflowClient

    url, out = tracked_run.url, tracked_run.out
    client = MlflowClient(url, registry_uri=url)
    exp = client.get_experiment_by_name("pretrain-and-probe")
    assert exp is not None and exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'parent' and "
                                                                      f"tags.`ae_repr.out_dir` = '{out}'")
    assert parent.data.tags["prefect.flow_run_id"] == tracked_run.flow_run_id and parent.info.status == "FINISHED"
    children = {r.data.tags["variant"]: r for r in client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                           "tags.`ae_repr.run_kind` = 'variant'")}
    assert set(children) == set(VARIANTS)
    for v, run in children.items():
        rid = run.info.run_id
        assert run.data.params["model.latent_dim"] == "8" and run.data.params["train.epochs"] == "1"
        assert len(client.get_metric_history(rid, "train/loss")) == 1
        assert len(client.get_metric_history(rid, "val/recon")) == 1
        assert "eval/linear_probe_accuracy" in run.data.metrics
        plots = {a.path for a in client.list_artifacts(rid, "plots")}
        assert {"plots/loss_curves.png", "plots/reconstructions.png", "plots/latent_map.png"} <= plots
        assert [a.path for a in client.list_artifacts(rid, "features")] == [f"features/{v}.parquet"]
        local = client.download_artifacts(rid, "plots/loss_curves.png", str(out.parent))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        model = client.get_registered_model(f"ae-repr-digits-{v}")
        assert "champion" in model.aliases
    assert not (out / "tracking_pending.json").exists()


def _dom(url: str, tmp: Path) -> str:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (apt-get install chromium) first")
    proc = subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={tmp}",
         "--window-size=1600,1000", "--virtual-time-budget=20000", "--dump-dom", url],
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return html.unescape(proc.stdout)


def test_ui_shows_variant_and_baseline_runs_and_metrics(tracked_run: TrackedRun, tmp_path):
    """The experiment's shared view lists the variant and baseline runs flat, in one table, with headline metric
    columns: the baselines' numbers beside the variants'."""
    from mlflow import MlflowClient

    url = tracked_run.url
    client = MlflowClient(url)
    exp = client.get_experiment_by_name("pretrain-and-probe")
    assert "mlflow.sharedViewState.variants" in exp.tags
    runs = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'variant'")
    baselines = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'baseline'")
    dom = _dom(f"{url}/#/experiments/{exp.experiment_id}/runs?viewStateShareKey=variants", tmp_path / "chromium")
    cells = {line.strip() for line in re.sub(r"<[^>]+>", "\n", dom).splitlines()}  # the page's text nodes
    shown = sorted(c for c in cells if c and not c.startswith(("#", ".", "@", "-")) and "{" not in c)
    assert {r.info.run_name for r in runs} == set(VARIANTS)
    assert {r.info.run_name for r in baselines} == {"pca (baseline)"}
    assert set(VARIANTS) <= cells, f"variant runs not in the UI's runs table: {shown[:120]}"
    assert "pca (baseline)" in cells, f"the baseline's run is not in the same runs table: {shown[:120]}"
    assert "eval/linear_probe_accuracy" in cells, f"no metric column in the runs table: {shown[:120]}"
    for r in [*runs, *baselines]:  # the metric's values are in the table, not just its name
        assert repr(r.data.metrics["eval/linear_probe_accuracy"]) in cells, (r.info.run_name, shown[:120])


@pytest.mark.background  # one CLI process: runs from the session's start
def test_unreachable_server_fails_fast_before_training(tmp_path):
    """Refused after the configured wait (2 s here; 10 by default, for a server that is still starting), before
    any folder or training: one line, exit 2."""
    out = tmp_path / "out"
    cfg = _config(tmp_path, connect_timeout_s=2)
    proc = subprocess.run([str(BIN / "ae-repr"), "run", "--config", str(cfg), "--out", str(out)],
                          env=_env(MLFLOW_TRACKING_URI=f"http://127.0.0.1:{svc.free_port()}"), capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unreachable" in lines[0] and lines[0].startswith("ae-repr: error: MLflow"), lines
    assert "after 2s" in lines[0], lines
    assert not (out / "models").exists()


@pytest.mark.scenario  # several runs at once / a kill mid-run: `make test-scenarios`
def test_three_runs_at_once_into_one_server_lose_nothing_and_mark_a_diverged_variant(mlflow_server, tmp_path):
    """Three `ae-repr run` side by side into one server and different folders: all finish, every run, per-epoch
    metric and model artifact arrives, and the server stays up; in one run vae diverges (beta beyond float32)
    and MLflow marks it FAILED."""
    from mlflow import MlflowClient

    epochs, experiment = 3, "concurrent-runs"
    procs, outs = {}, {}
    for name, overrides in (("steady", {}), ("steady-2", {}), ("diverging", {"vae": {"hidden": [32], "beta": 1e39}})):
        (tmp_path / name).mkdir()
        cfg = yaml.safe_load(_config(tmp_path / name).read_text())
        cfg["train"]["epochs"] = epochs
        cfg["tracking"]["experiment"] = experiment
        cfg["models"]["overrides"] = overrides
        cfg["seed"] = 1 if name == "steady-2" else 0
        cfg["eval"].update(applications=[], fewshot_finetune=False)
        path = tmp_path / name / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        outs[name] = tmp_path / name / "out"
        procs[name] = subprocess.Popen(
            [str(BIN / "ae-repr"), "run", "--config", str(path), "--out", str(outs[name])],
            env=_env(MLFLOW_TRACKING_URI=mlflow_server), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, cwd=tmp_path / name, start_new_session=True,
        )
    logs = {}
    try:
        for name, proc in procs.items():
            logs[name] = proc.communicate(timeout=420)[0]
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert procs["steady"].returncode == 0, logs["steady"][-3000:]
    assert procs["steady-2"].returncode == 0, logs["steady-2"][-3000:]
    assert procs["diverging"].returncode == 1, logs["diverging"][-3000:]
    assert urllib.request.urlopen(f"{mlflow_server}/health", timeout=10).status == 200  # the server stayed up

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], filter_string="tags.`ae_repr.run_kind` = 'parent'")
    statuses = sorted(p.info.status for p in parents)
    assert statuses == ["FAILED", "FINISHED", "FINISHED"], statuses
    for parent in parents:
        children = {r.data.tags["variant"]: r for r in client.search_runs(
            [exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and "
                                               "tags.`ae_repr.run_kind` = 'variant'")}
        assert set(children) == set(VARIANTS)
        failed = parent.info.status == "FAILED"
        for v, run in children.items():
            history = client.get_metric_history(run.info.run_id, "train/loss")
            if failed and v == "vae":
                assert run.info.status == "FAILED", run.info.status
                assert "non-finite" in run.data.tags.get("failure_reason", ""), run.data.tags
                assert "eval/linear_probe_accuracy" not in run.data.metrics
                continue
            assert run.info.status == "FINISHED", (v, run.info.status)
            assert sorted(m.step for m in history) == list(range(1, epochs + 1)), (v, history)
            assert len(client.get_metric_history(run.info.run_id, "val/loss")) == epochs
            assert "eval/linear_probe_accuracy" in run.data.metrics
            # its encoder is a registered version (its own, or the same weights registered by a run beside it)
            tags = run.data.tags
            assert client.get_model_version(tags["ae_repr.registered_model"], tags["ae_repr.model_version"]), tags
        assert "report.md" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        if failed:
            assert parent.data.tags.get("failed") == "vae", parent.data.tags


def _tiny_model(model_dir: Path, seed: int) -> Path:
    """A saved, untrained 4 -> 2 autoencoder whose weights depend on `seed` alone."""
    import numpy as np

    from ae_repr.checkpoint import save_model
    from ae_repr.data.dataset import Normalizer
    from ae_repr.models import build_model, model_config

    model = build_model("ae", model_config("ae", latent_dim=2, hidden=(4,)), (4,), "gaussian", seed=seed)
    return save_model(model_dir, model, variant="ae", normalizer=Normalizer(np.zeros(4), np.ones(4), "standard"))


def test_two_runs_registering_the_same_weights_at_once_agree_on_one_version(mlflow_server, tmp_path, monkeypatch):
    """Two runs log and register identical weights at the same instant (both pass the "already registered?" check
    before either registers): each round leaves one version per weights checksum, both runs tagged with it, one
    `registered` and one `unchanged`, and the champion alias on it."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from flows.tracking import models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)  # log_model and register_model resolve the process-wide URI
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.create_experiment("registration-race")
    # both racers are held after their "already registered?" check and just before registering, so they truly
    # overlap; a process logs its models from one writer thread, so each racer's log_model (not thread-safe in
    # torch's exporter) takes a lock, as one process at a time would
    at_register, one_export = threading.Barrier(2, timeout=60), threading.Lock()
    register, log_model = mlflow.register_model, mlflow.pytorch.log_model

    def register_together(*args, **kwargs):
        at_register.wait()
        return register(*args, **kwargs)

    def log_alone(*args, **kwargs):
        with one_export:
            return log_model(*args, **kwargs)

    monkeypatch.setattr(mlflow, "register_model", register_together)
    monkeypatch.setattr(mlflow.pytorch, "log_model", log_alone)
    example = np.zeros((2, 4), dtype=np.float32)
    for round_ in range(3):
        model_dir = _tiny_model(tmp_path / f"model-{round_}", seed=round_)
        info = {"dataset": f"race-{round_}", "sha256": f"{round_:064d}"}
        runs = [client.create_run(exp, run_name=f"racer-{round_}-{i}").info.run_id for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            racers = [pool.submit(models.log_encoder, client, r, "ae", model_dir, example, info, register=True)
                      for r in runs]
            for racer in racers:
                racer.result(timeout=120)  # a racer's error fails the test here
        name, weights = models.registered_name("ae", info["dataset"]), models.weights_checksum(model_dir)
        versions = client.search_model_versions(f"name = '{name}' and tags.`{models.WEIGHTS_TAG}` = '{weights}'")
        assert len(versions) == 1, f"round {round_}: versions {[v.version for v in versions]} hold the same weights"
        (version,) = versions
        tags = [client.get_run(r).data.tags for r in runs]
        assert {t[models.MODEL_VERSION_TAG] for t in tags} == {str(version.version)}, tags
        assert sorted(t[models.REGISTRY_TAG] for t in tags) == [models.REGISTERED, models.UNCHANGED], tags
        assert client.get_registered_model(name).aliases == {models.CHAMPION: str(version.version)}


def test_a_missing_champion_alias_goes_to_the_first_version_not_the_newest(mlflow_server, tmp_path, monkeypatch):
    """A first registration cut short before its alias, then a run with other weights: the alias goes to version 1
    (the rule every racer applies, so two first registrations at once cannot leave it on either)."""
    import mlflow
    import numpy as np
    from mlflow import MlflowClient

    from flows.tracking import models

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    client = MlflowClient(mlflow_server, registry_uri=mlflow_server)
    exp = client.create_experiment("champion-gap")
    name, info = models.registered_name("ae", "champion-gap"), {"dataset": "champion-gap", "sha256": "0" * 64}
    for seed in (10, 11):
        run_id = client.create_run(exp).info.run_id
        models.log_encoder(client, run_id, "ae", _tiny_model(tmp_path / f"m{seed}", seed), np.zeros((2, 4), np.float32),
                           info, register=True)
        if seed == 10:
            client.delete_registered_model_alias(name, models.CHAMPION)  # as if killed before setting it
    assert [v.version for v in client.search_model_versions(f"name = '{name}'", order_by=["version_number ASC"])] \
        == ["1", "2"]
    assert client.get_registered_model(name).aliases == {models.CHAMPION: "1"}
