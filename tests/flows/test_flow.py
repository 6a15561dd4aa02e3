"""The `pretrain-and-probe` flow under the session's Prefect test harness, on a tiny config.

One run is shared by the module (outputs, artifacts, then the cached re-run); the partial-failure
test runs its own. Tracking is off here (tests/flows/test_tracking.py covers MLflow).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

import flows.pretrain_and_probe as fp
from ae_repr.config import ExperimentConfig, load_config, validate_config
from ae_repr.io import read_features, read_json

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("ae", "vae")


def tiny_config(applications: bool = True, **train: Any) -> ExperimentConfig:
    """configs/quick.yaml cut down further: two variants, one epoch, one baseline (and no application task or
    few-shot fine-tuning where a test does not read them)."""
    d = load_config(ROOT / "configs" / "quick.yaml").model_dump(mode="json")
    d["models"]["variants"] = list(VARIANTS)
    d["train"].update({"epochs": 1, **train})
    d["eval"].update({"baselines": ["pca"], "knn_k": [5]})
    if not applications:
        d["eval"].update({"applications": [], "fewshot_finetune": False})
    d["tracking"]["enabled"] = False
    return validate_config(d)


@pytest.fixture(scope="module")
def storage(prefect_harness, tmp_path_factory):
    """Task results (the cache) in a temporary folder instead of ~/.prefect/storage."""
    with temporary_settings(updates={PREFECT_LOCAL_STORAGE_PATH: tmp_path_factory.mktemp("prefect-results")}):
        yield


@pytest.fixture(scope="module")
def first_run(storage, tmp_path_factory):
    """(run directory, final state) of one flow run."""
    out = tmp_path_factory.mktemp("run")
    state = fp.pretrain_and_probe(config=tiny_config(), out=str(out), return_state=True)
    return out, state


def task_states(state, names: set[str], timeout: float = 30.0) -> dict[str, str]:
    """Task run name -> final state name of a flow run (task states reach the API asynchronously)."""
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            found = {r.name: r.state for r in runs if r.state is not None}
            if all(n in found and found[n].is_final() for n in names) or time.monotonic() > deadline:
                return {n: s.name for n, s in found.items()}
            time.sleep(0.5)


def artifacts(flow_run_id: UUID) -> dict[str, Any]:
    """Artifacts of a flow run by key."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in found}


def linear_probe(out: Path) -> pd.DataFrame:
    s = pd.read_parquet(out / "summary.parquet")
    return s[(s["task"] == "linear_probe") & (s["metric"] == "accuracy")].set_index("representation")["value"]


def test_run_writes_every_output(first_run):
    out, state = first_run
    assert state.is_completed(), state.message
    for rel in ("config.json", "summary.parquet", "report.md", "timings.json", "eval/linear_probe.parquet",
                *(f"models/{v}/{f}" for v in VARIANTS for f in ("model.pt", "config.json", "history.json")),
                *(f"features/{n}.parquet" for n in (*VARIANTS, "pca")),
                *(f"eval/representations/{n}.parquet" for n in (*VARIANTS, "pca"))):
        assert (out / rel).is_file(), rel
    acc = linear_probe(out)
    assert sorted(acc.index) == sorted([*VARIANTS, "pca"])
    assert ((acc > 0.3) & (acc <= 1.0)).all(), acc  # ten digit classes: chance is 0.1
    report = (out / "report.md").read_text()
    assert "| ae |" in report and "| vae |" in report and "Failed" not in report
    timings = read_json(out / "timings.json")["phases"]
    assert timings["training"]["busy_s"] > 0 and timings["evaluation"]["busy_s"] > 0
    # each variant's figures are a step of the flow, drawn with tracking off too, and linked from the report
    for v in VARIANTS:
        for png in ("loss_curves", "reconstructions", "latent_map"):
            assert (out / "plots" / v / f"{png}.png").read_bytes()[:4] == b"\x89PNG", (v, png)
            assert f"](plots/{v}/{png}.png)" in report, (v, png)
    assert (out / "plots" / "vae" / "prior_samples.png").is_file()
    assert not (out / "plots" / "ae" / "prior_samples.png").exists()  # a plain AE has no prior


def test_run_scores_the_applications_and_links_their_plots(first_run):
    """Every application task writes rows for the variants it applies to, beside its baselines; the
    report links at least six of their pictures, and each linked file is a PNG."""
    out, _ = first_run
    s = pd.read_parquet(out / "summary.parquet")
    reps = {task: set(s.loc[s["task"] == task, "representation"])
            for task in ("anomaly", "inpainting", "generation", "augmentation", "rate_distortion")}
    assert reps["anomaly"] == {*VARIANTS, "pca", "isolation_forest"}
    assert reps["inpainting"] == {*VARIANTS, "pca", "mean_image"}
    assert reps["generation"] == {*VARIANTS, "real_data", "factorized"}
    assert reps["augmentation"] == set(VARIANTS)
    assert reps["rate_distortion"] == {"vae"}  # ae has no prior and no KL
    nll = s[(s["task"] == "generation") & (s["metric"] == "nll_is")].set_index("representation")["value"]
    elbo = s[(s["task"] == "generation") & (s["metric"] == "elbo")].set_index("representation")["value"]
    assert sorted(nll.index) == ["factorized", "vae"] and nll["vae"] <= -elbo["vae"] + 1e-6  # IS is the tighter bound
    assert 0 < nll["vae"]  # probabilities of digits' grey levels: a positive NLL
    report = (out / "report.md").read_text()
    linked = re.findall(r"!\[[^]]*\]\((plots/[^)]+\.png)\)", report)
    apps = {"reconstructions", "prior_samples", "interpolations", "inpainting", "augmentation", "rate_distortion",
            "kl_per_dim", "anomaly_roc", "traversals_ae", "traversals_vae"}
    assert apps <= {Path(p).stem for p in linked}, linked
    for rel in linked:
        assert (out / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", rel
    assert "## Applications" in report


def test_variant_figures_from_a_feature_file(first_run, tmp_path):
    """`ae-repr evaluate` draws the same figures from a feature file alone: its model folder and data set
    come from the file's metadata; a baseline (no model) has none."""
    from evaluation.inputs import load_feature_file
    from evaluation.variant_plots import feature_file_plots

    out, _ = first_run
    made = feature_file_plots(load_feature_file(out / "features" / "vae.parquet"), tmp_path / "vae")
    assert sorted(p.name for p in made) == ["latent_map.png", "loss_curves.png", "prior_samples.png",
                                            "reconstructions.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in made)
    assert feature_file_plots(load_feature_file(out / "features" / "pca.parquet"), tmp_path / "pca") == []


def test_extract_features_takes_generic_metadata(first_run, tmp_path):
    """The caller's metadata lands in the file's metadata; it cannot overwrite what describes the features."""
    from ae_repr.features import extract_features

    out, _ = first_run
    cfg = tiny_config()
    data = fp.data_for(cfg)
    path = extract_features(out / "models" / "ae", data, tmp_path / "ae.parquet", metadata={"run": "r-1"})
    meta = read_features(path).meta
    assert meta["run"] == "r-1" and meta["variant"] == "ae" and "mlflow_run_id" not in meta
    with pytest.raises(ValueError, match="variant"):
        extract_features(out / "models" / "ae", data, tmp_path / "ae2.parquet", metadata={"variant": "vae"})


def test_headline_artifact(first_run):
    out, state = first_run
    found = artifacts(state.state_details.flow_run_id)
    assert found["headline-results"].type == "markdown"
    md = found["headline-results"].data
    assert "linear probe acc" in md and "| ae |" in md and "| pca |" in md
    verdict = (out / "verdict.md").read_text().strip()
    assert verdict.startswith("On digits (K=8), ") and f"**Verdict.** {verdict}" in md  # the report's verdict
    assert "![" not in md  # plot links point at files next to report.md, not into the Prefect UI
    assert "mlflow-run" not in found  # tracking is off: no MLflow run to link to


def test_rerun_is_served_from_cache_and_deleted_outputs_are_recomputed(first_run):
    out, _ = first_run
    before = {v: (out / "models" / v / "model.pt").stat().st_mtime_ns for v in VARIANTS}
    acc = linear_probe(out)

    state = fp.pretrain_and_probe(config=tiny_config(), out=str(out), return_state=True)
    assert state.is_completed(), state.message
    names = {f"{t}-{v}" for t in ("train", "extract", "evaluate") for v in VARIANTS}
    states = task_states(state, names)
    assert all(states.get(n) == "Cached" for n in names), states
    assert {v: (out / "models" / v / "model.pt").stat().st_mtime_ns for v in VARIANTS} == before
    pd.testing.assert_series_equal(linear_probe(out), acc)

    (out / "features" / "vae.parquet").unlink()  # a deleted output is recomputed, not served from the cache
    state = fp.pretrain_and_probe(config=tiny_config(), out=str(out), return_state=True)
    assert state.is_completed(), state.message
    states = task_states(state, {"train-vae", "extract-vae", "extract-ae"})
    assert states["train-vae"] == "Cached" and states["extract-ae"] == "Cached", states
    assert states["extract-vae"] == "Completed", states
    assert (out / "features" / "vae.parquet").is_file()
    assert (out / "models" / "vae" / "model.pt").stat().st_mtime_ns == before["vae"]


def test_rerun_with_fewer_variants_at_another_width_ignores_the_earlier_features(first_run, tmp_path):
    """An earlier run's feature files stay in the folder; baselines and the summary follow this run's."""
    out, _ = first_run
    shutil.copytree(out / "features", tmp_path / "features")  # ae.parquet and vae.parquet, 8-d
    state = fp.pretrain_and_probe(config=tiny_config(applications=False).with_overrides(variants=["vae"], latent_dim=4),
                                  out=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    assert len(read_features(tmp_path / "features" / "pca.parquet").z_columns) == 4
    assert sorted(linear_probe(tmp_path).index) == ["pca", "vae"]


def test_cache_keys_follow_what_a_model_depends_on(tmp_path):
    cfg = tiny_config()
    key = fp._train_key(None, {"cfg": cfg, "out": str(tmp_path), "variant": "ae"})
    same = tiny_config().with_overrides(variants=["ae", "vae", "dae"])  # other variants do not matter
    assert fp._train_key(None, {"cfg": same, "out": str(tmp_path), "variant": "ae"}) == key
    for changed in (tiny_config(epochs=2), tiny_config(lr=1e-3), cfg.with_overrides(latent_dim=4)):
        assert fp._train_key(None, {"cfg": changed, "out": str(tmp_path), "variant": "ae"}) != key
    assert fp._train_key(None, {"cfg": cfg, "out": str(tmp_path / "other"), "variant": "ae"}) != key


def test_one_failing_variant_fails_alone(storage, tmp_path, monkeypatch):
    real = fp.train_variant

    def train_variant(variant: str, *args: Any, **kwargs: Any):
        if variant == "vae":
            raise RuntimeError("injected failure in vae")
        return real(variant, *args, **kwargs)

    monkeypatch.setattr(fp, "train_variant", train_variant)
    state = fp.pretrain_and_probe(config=tiny_config(applications=False), out=str(tmp_path), return_state=True)

    assert state.is_failed()
    assert "vae" in state.message and "injected failure in vae" in state.message
    assert (tmp_path / "models" / "ae" / "model.pt").is_file() and (tmp_path / "features" / "ae.parquet").is_file()
    assert not (tmp_path / "features" / "vae.parquet").exists()
    acc = linear_probe(tmp_path)
    assert sorted(acc.index) == ["ae", "pca"]  # the others finished and were evaluated
    report = (tmp_path / "report.md").read_text()
    assert "Failed" in report and "vae" in report.split("Failed", 1)[1]
    assert "injected failure in vae" in report
    md = artifacts(state.state_details.flow_run_id)["headline-results"].data
    assert "injected failure in vae" in md and "| ae |" in md


def test_dsprites_run_scores_disentanglement_for_learned_and_baseline_codes(storage, tmp_path):
    """On data with ground-truth factors the flow adds MIG, DCI and SAP for every representation,
    the DCI importance picture and beta_vae's traversals."""
    cfg = tiny_config().model_dump(mode="json")
    cfg["data"]["dataset"] = "dsprites:1200"
    cfg["models"]["variants"] = ["beta_vae"]
    cfg["eval"].update(applications=["generation", "rate_distortion", "disentanglement"], fewshot_finetune=False)
    state = fp.pretrain_and_probe(config=validate_config(cfg), out=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    s = pd.read_parquet(tmp_path / "summary.parquet")
    dis = s[s["task"] == "disentanglement"]
    assert set(dis["representation"]) == {"beta_vae", "pca"}
    for rep in ("beta_vae", "pca"):
        got = dis[dis["representation"] == rep].set_index("metric")["value"]
        assert set(got.index) == {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap"}
        assert ((got >= 0) & (got <= 1)).all(), got
    report = (tmp_path / "report.md").read_text()
    assert "](plots/dci_importance.png)" in report and "](plots/traversals_beta_vae.png)" in report
    assert "MIG" in report and "GradientBoostingRegressor" in report  # the estimator settings are recorded


def test_beta_sweep_adds_rate_distortion_points(storage, tmp_path):
    """`eval.rd_betas` trains beta_vae at each beta beside the configured variants; a larger beta buys a
    lower rate, and the sweep is drawn as a curve."""
    cfg = tiny_config().model_dump(mode="json")
    cfg["models"]["variants"] = ["vae"]
    cfg["train"]["epochs"] = 2
    cfg["eval"].update(applications=["rate_distortion"], rd_betas=[0.25, 8.0], fewshot_finetune=False)
    state = fp.pretrain_and_probe(config=validate_config(cfg), out=str(tmp_path), return_state=True)
    assert state.is_completed(), state.message
    s = pd.read_parquet(tmp_path / "summary.parquet")
    rd = s[s["task"] == "rate_distortion"].pivot_table(index="representation", columns="metric", values="value")
    assert set(rd.index) == {"vae", "beta_vae@beta=0.25", "beta_vae@beta=8"}
    assert rd.loc["beta_vae@beta=0.25", "rate"] > rd.loc["beta_vae@beta=8", "rate"]
    for beta in ("0.25", "8"):
        assert (tmp_path / "models" / "beta_sweep" / f"beta_{beta}" / "model.pt").is_file()
    report = (tmp_path / "report.md").read_text()
    assert "](plots/rate_distortion.png)" in report
    assert "eval.rd_budget = 0.5" in report and "beta 8: " in report  # each sweep model's budget and steps


def test_sweep_models_train_within_their_budget():
    """A sweep point gets its beta and a step budget of eval.rd_budget of train.max_steps; the rest is unchanged."""
    cfg = tiny_config(max_steps=1000)
    point = validate_config({**cfg.model_dump(mode="json"), "eval": {**cfg.eval.model_dump(mode="json"),
                                                                        "rd_budget": 0.3}}).with_beta(6.0)
    assert point.train.max_steps == 300 and point.models.model_config_for("beta_vae").beta == 6.0
    assert point.train.model_copy(update={"max_steps": 1000}) == cfg.train
