"""End to end over a synthetic features folder: baselines, every task, summary contract, report, honesty."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from eval_synth import K, learned_feature_file, make_synth, save_tiny_ae, write_ff
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ae_repr.config import EvalConfig
from ae_repr.io import write_features
from evaluation import evaluate_dir, evaluate_representation

CFG = EvalConfig(
    baselines=("raw", "pca"),  # ica and random_projection files: test_eval_tasks.py
    fewshot_k=(1, 5),
    fewshot_seeds=3,
    finetune_epochs=8,
    map_max_rows=80,
    trustworthiness_max_rows=200,
)
SUMMARY_ARROW = pa.schema(
    [
        ("representation", pa.string()),
        ("task", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("k", pa.int64()),
        ("n_seeds", pa.int64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("ci_method", pa.string()),
    ]
)
SUMMARY_PANDAS = {
    "representation": "string",
    "task": "string",
    "metric": "string",
    "value": "float64",
    "k": "Int64",
    "n_seeds": "Int64",
    "ci_low": "Float64",
    "ci_high": "Float64",
    "ci_method": "string",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with a tiny `ae` (model + features) and a model-less learned file, fully evaluated."""
    out = tmp_path_factory.mktemp("run")
    synth = make_synth(out)
    features = out / "features"
    learned_feature_file(features, synth, save_tiny_ae(out / "models" / "ae"))
    onehot = np.eye(K)[synth.y] + 0.3 * np.random.default_rng(5).normal(size=(len(synth.y), K))
    write_ff(features / "onehot.parquet", synth, onehot)
    logged: dict[str, float] = {}
    summary = evaluate_dir(features, out, CFG, log=logged.update)
    return out, summary, logged


def test_summary_matches_the_contract_exactly(run):
    out, summary, _ = run
    assert summary == out / "summary.parquet"
    assert pq.read_schema(summary).remove_metadata() == SUMMARY_ARROW
    frame = pd.read_parquet(summary)
    assert {c: str(t) for c, t in frame.dtypes.items()} == SUMMARY_PANDAS
    assert list(frame.columns) == list(SUMMARY_PANDAS)
    assert frame["value"].notna().all()


def test_every_task_runs_where_it_applies(run):
    out, summary, _ = run
    s = pd.read_parquet(summary)
    reps = {"ae", "onehot", "raw", "pca"}
    for task in ("linear_probe", "knn", "fewshot_frozen", "reduction"):
        assert set(s.loc[s["task"] == task, "representation"]) == reps, task
    for arm in ("fewshot_finetune", "fewshot_scratch"):  # only the learned file with a model
        rows = s[s["task"] == arm]
        assert set(rows["representation"]) == {"ae"}
        assert list(rows["k"]) == [1, 5] and (rows["n_seeds"] == 3).all()
        assert ((rows["ci_low"] <= rows["value"]) & (rows["value"] <= rows["ci_high"])).all()
    recon = s[s["metric"] == "recon_mse"]
    assert set(recon["representation"]) == {"ae", "pca"}
    fit = s[s["metric"] == "fit_time_s"].set_index("representation")["value"]
    assert fit["ae"] == 1.25  # the trainer's train_time_s in the model's config.json
    assert {"raw", "pca"} <= set(fit.index) and "onehot" not in fit.index
    trust = s[s["metric"] == "trustworthiness"].set_index("representation")["value"]
    assert trust["raw"] == pytest.approx(1.0)
    for task in s["task"].unique():
        per_task = pd.read_parquet(out / "eval" / f"{task}.parquet")
        pd.testing.assert_frame_equal(per_task, s[s["task"] == task].reset_index(drop=True))


@pytest.mark.parametrize("name", ["ae", "pca"])
def test_linear_probe_is_reproducible_with_plain_sklearn(run, name):
    """The documented recipe (evaluation.probe docstring), run by hand, gives the summary's numbers."""
    out, summary, _ = run
    df = pd.read_parquet(out / "features" / f"{name}.parquet")
    Z = df[[c for c in df.columns if c.startswith("z_")]].to_numpy(np.float32)
    y = df["label"].to_numpy(np.int64)
    tr, te = (df["split"] == "train").to_numpy(), (df["split"] == "test").to_numpy()
    pipe = Pipeline(
        [("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000, random_state=0))]
    )
    search = GridSearchCV(
        pipe,
        {"logreg__C": [0.01, 0.1, 1.0, 10.0, 100.0]},
        cv=StratifiedKFold(n_splits=5, shuffle=True, random_state=0),
        scoring="accuracy",
    )
    search.fit(Z[tr], y[tr])
    pred = search.predict(Z[te])
    s = pd.read_parquet(summary)
    got = s[(s["representation"] == name) & (s["task"] == "linear_probe")].set_index("metric")["value"]
    assert got["accuracy"] == accuracy_score(y[te], pred)
    assert got["macro_f1"] == f1_score(y[te], pred, average="macro")


def test_report_plots_and_metric_callback(run):
    out, _, logged = run
    report = (out / "report.md").read_text()
    assert "| representation | linear probe acc | linear probe macro-F1 | kNN acc (5-NN) |" in report
    assert "few-shot k=5 frozen" in report and "few-shot k=5 finetune" in report and "recon MSE" in report
    verdict = (out / "verdict.md").read_text().strip()
    assert report.splitlines()[2] == f"**Verdict.** {verdict}"
    s = pd.read_parquet(out / "summary.parquet")
    probe = s[(s["task"] == "linear_probe") & (s["metric"] == "accuracy")].set_index("representation")["value"]
    assert verdict.startswith(f"On synth.parquet (K={K}), {probe.idxmax()} is best by linear-probe test accuracy")
    assert "| *winner* |" in report and " [" in _row(report, "ae")  # intervals in the cells
    for png in ("latent_maps.png", "fewshot.png"):
        assert f"](plots/{png})" in report
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.rglob("*.tmp"))
    assert "ae/eval/linear_probe/accuracy" in logged and "pca/eval/fewshot_frozen/accuracy_k5" in logged
    assert "ae/eval/fewshot_finetune/accuracy_k1" in logged and "raw/eval/knn/accuracy_20nn" in logged


def _row(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {name} |"))


def test_rerun_reproduces_results(run, tmp_path):
    out, summary, _ = run
    again = evaluate_representation(out / "features" / "pca.parquet", CFG, eval_dir=tmp_path)
    a = pd.read_parquet(again)
    b = pd.read_parquet(summary)
    b = b[(b["representation"] == "pca") & b["task"].isin(set(a["task"]))].reset_index(drop=True)
    pd.testing.assert_frame_equal(
        a[a["metric"] != "fit_time_s"].reset_index(drop=True),
        b[b["metric"] != "fit_time_s"].reset_index(drop=True),
    )


def test_summary_says_what_each_interval_is_over(run):
    out, summary, _ = run
    s = pd.read_parquet(summary)
    boot = s[s["task"].isin(["linear_probe", "knn", "chance"]) | s["metric"].isin(["trustworthiness", "recon_mse"])]
    assert (boot["ci_method"] == "test_bootstrap").all() and (boot["n_seeds"] == CFG.bootstrap_samples).all()
    assert ((boot["ci_low"] <= boot["value"]) & (boot["value"] <= boot["ci_high"])).all()
    fewshot = s[s["task"].str.startswith("fewshot_")]
    assert (fewshot["ci_method"] == "fewshot_episodes").all() and (fewshot["n_seeds"] == CFG.fewshot_seeds).all()
    assert s.loc[s["metric"] == "fit_time_s", "ci_method"].isna().all()
    chance = s[s["task"] == "chance"].set_index("metric")
    assert list(s.loc[s["task"] == "chance", "representation"].unique()) == ["majority_class"]
    test_labels = pd.read_parquet(out / "features" / "ae.parquet").query("split == 'test'")["label"]
    assert chance.at["accuracy", "value"] == pytest.approx(test_labels.value_counts(normalize=True).max())


def test_random_labels_on_a_narrow_table_read_as_a_tie_at_chance(tmp_path, caplog):
    """10 features, 4 random labels, a learned width of 16: the report bolds no accuracy, says chance, and warns
    that a latent at least as wide as the input is no bottleneck."""
    rng = np.random.default_rng(0)
    n, d = 240, 10
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.integers(0, 4, n)
    split = np.where(rng.permutation(n) < n // 4, "test", "train")
    table = pd.DataFrame({f"f{i}": x[:, i] for i in range(d)}).assign(label=y, split=split)
    table.to_parquet(tmp_path / "table.parquet", index=False)
    features = tmp_path / "features"
    write_features(features / "ae.parquet", sample_id=np.arange(n), split=split, label=y,
                   z=np.tanh(x @ rng.normal(size=(d, 16))), metadata={"variant": "ae", "dataset": str(tmp_path / "table.parquet")})
    cfg = EvalConfig(baselines=("raw", "pca"), fewshot_k=(5,), fewshot_seeds=3, applications=(), map_method="none")
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        evaluate_dir(features, tmp_path, cfg)
    assert any("K=16 is at or above the input width 10" in r.getMessage() for r in caplog.records)
    report = (tmp_path / "report.md").read_text()
    verdict = (tmp_path / "verdict.md").read_text().strip()
    assert report.splitlines()[2] == f"**Verdict.** {verdict}"
    assert verdict.startswith("On table.parquet (K=16), ") and "tied with" in verdict
    assert "That is chance level" in verdict
    assert "the latent width K=16 is at or above the input width 10, so no representation here is a bottleneck" in verdict
    for name in ("ae", "raw", "pca"):
        probe_acc, probe_f1, knn_acc, fewshot_acc = _row(report, name).split(" | ")[1:5]
        assert "**" not in probe_acc + probe_f1 + knn_acc + fewshot_acc, _row(report, name)
    assert _row(report, "*winner*").startswith("| *winner* | tie at chance | tie: ")
    assert "| tie at chance | tie at chance |" in _row(report, "*winner*")  # kNN and few-shot
