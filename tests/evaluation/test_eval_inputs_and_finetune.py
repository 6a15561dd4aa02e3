"""Input validation, label-free runs, failure reporting, and the end-to-end few-shot arms."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from eval_synth import K, learned_feature_file, save_tiny_ae, write_ff

import evaluation
from ae_repr.config import EvalConfig
from ae_repr.errors import UserError
from ae_repr.io import read_features
from evaluation import (
    EvaluationFailed,
    evaluate_dir,
    fewshot_finetune,
    fewshot_frozen,
    fewshot_scratch,
    summarize,
)
from evaluation.finetune import holdout_rows
from evaluation.results import read_results

QUICK = EvalConfig(fewshot_k=(1, 5), fewshot_seeds=3, map_method="none", trustworthiness_max_rows=100)


def _z(synth, width=K, seed=0):
    return np.random.default_rng(seed).normal(size=(len(synth.y), width))


def test_missing_or_empty_features_dir(tmp_path):
    with pytest.raises(UserError, match="features folder not found"):
        evaluate_dir(tmp_path / "nope", tmp_path / "out", QUICK)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no feature files"):
        evaluate_dir(tmp_path / "empty", tmp_path / "out", QUICK)
    assert not (tmp_path / "out").exists()


def test_file_lacking_required_columns(tmp_path, synth):
    (tmp_path / "f").mkdir()
    pd.DataFrame({"sample_id": [0, 1], "z_000": [0.0, 1.0]}).to_parquet(tmp_path / "f" / "bad.parquet")
    # `label` may be absent (label tasks are skipped then); `split` may not
    with pytest.raises(UserError, match=r"bad.parquet: missing required column\(s\) split$"):
        evaluate_dir(tmp_path / "f", tmp_path / "out", QUICK)


def test_files_disagreeing_on_sample_ids_or_width(tmp_path, synth):
    f = tmp_path / "f"
    write_ff(f / "a.parquet", synth, _z(synth))
    short = write_ff(f / "b.parquet", synth, _z(synth))
    frame = read_features(short).frame.iloc[:-1]
    frame.to_parquet(short)
    with pytest.raises(UserError, match="sample_id set differs"):
        evaluate_dir(f, tmp_path / "out", QUICK)
    write_ff(f / "b.parquet", synth, _z(synth, width=K + 1))
    with pytest.raises(UserError, match=r"disagree on latent width \(a=4, b=5\)"):
        evaluate_dir(f, tmp_path / "out", QUICK)


def test_without_labels_the_label_free_parts_still_run(tmp_path, synth):
    write_ff(tmp_path / "features" / "a.parquet", synth, _z(synth), labels=None)
    cfg = QUICK.model_copy(update={"map_method": "tsne", "map_max_rows": 40})
    summary = pd.read_parquet(evaluate_dir(tmp_path / "features", tmp_path, cfg))
    assert set(summary["task"]) == {"reduction"}
    assert set(summary["representation"]) == {"a", "raw", "pca", "ica", "random_projection"}
    assert {"trustworthiness", "recon_mse"} <= set(summary["metric"])
    report = (tmp_path / "report.md").read_text()
    assert "linear_probe, knn and few-shot tasks not run: the feature file has no labels" in report
    assert "](plots/latent_maps.png)" in report and "fewshot.png" not in report
    assert (tmp_path / "plots" / "latent_maps.png").is_file()


def test_learned_file_whose_model_dir_is_gone(tmp_path, synth):
    path = write_ff(tmp_path / "features" / "ae.parquet", synth, _z(synth), model_dir="../models/ae")
    out = evaluation.evaluate_representation(path, QUICK, eval_dir=tmp_path / "eval")
    rows, notes = read_results(out)
    assert not rows["task"].isin(["fewshot_finetune", "fewshot_scratch"]).any()
    assert "recon_mse" not in set(rows["metric"]) and "trustworthiness" in set(rows["metric"])
    assert any("fewshot_finetune/fewshot_scratch not run: no model directory" in n for n in notes)


def test_runtime_failure_is_reported_and_raised(tmp_path, synth, monkeypatch):
    import evaluation.pipeline as pipeline

    write_ff(tmp_path / "features" / "a.parquet", synth, _z(synth))
    real = pipeline.reduction

    def flaky(ff, cfg, *, seed=0):
        if ff.name == "ica":
            raise RuntimeError("boom")
        return real(ff, cfg, seed=seed)

    monkeypatch.setattr(pipeline, "reduction", flaky)
    cfg = QUICK.model_copy(update={"baselines": ("pca", "ica")})
    with pytest.raises(EvaluationFailed, match="evaluation failed for ica"):
        evaluate_dir(tmp_path / "features", tmp_path, cfg)
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    assert "ica" not in set(summary["representation"]) and "pca" in set(summary["representation"])
    report = (tmp_path / "report.md").read_text()
    assert "## Failed representations" in report and "**ica**: RuntimeError: boom" in report
    # a stale result must not stand in for a representation the flow reports as failed
    summarize(tmp_path, cfg, failures={"pca": "TimeoutError: took too long"})
    assert "pca" not in set(pd.read_parquet(tmp_path / "summary.parquet")["representation"])


def test_holdout_rows_are_train_rows_disjoint_from_shots():
    train = np.arange(0, 200, 2)
    shots = train[:10]
    val = holdout_rows(train, shots, 50, seed=1)
    assert len(val) == 50 and np.isin(val, train).all() and not np.isin(val, shots).any()
    assert np.array_equal(val, holdout_rows(train, shots, 50, seed=1))
    assert len(holdout_rows(train, shots, 10_000, seed=1)) == len(train) - len(shots)


@pytest.fixture
def ae_file(tmp_path, synth):
    return read_features(
        learned_feature_file(tmp_path / "features", synth, save_tiny_ae(tmp_path / "models" / "ae"))
    )


def test_finetune_starts_from_the_frozen_head(ae_file):
    """With a vanishing learning rate, fine-tuning keeps its linear-probe init: it scores as the frozen arm."""
    cfg = QUICK.model_copy(update={"finetune_lr": 1e-12, "finetune_epochs": 1})
    frozen = fewshot_frozen(ae_file, cfg)
    tuned = fewshot_finetune(ae_file, cfg)
    assert list(tuned["k"]) == list(frozen["k"]) == [1, 5]
    n_test = int((ae_file.frame["split"] == "test").sum())
    np.testing.assert_allclose(tuned["value"], frozen["value"], atol=1.5 / n_test)


def test_finetune_and_scratch_rows(ae_file):
    cfg = QUICK.model_copy(
        update={"fewshot_k": (2,), "finetune_epochs": 6, "finetune_patience": 3, "finetune_lr": 1e-2}
    )
    for fn, task in ((fewshot_finetune, "fewshot_finetune"), (fewshot_scratch, "fewshot_scratch")):
        rows = fn(ae_file, cfg)
        assert set(rows["task"]) == {task} and list(rows["k"]) == [2]
        assert (rows["n_seeds"] == 3).all()
        assert ((rows["value"] >= 0) & (rows["value"] <= 1)).all()
        assert ((rows["ci_low"] <= rows["value"]) & (rows["value"] <= rows["ci_high"])).all()
        if task == "fewshot_finetune":
            pd.testing.assert_frame_equal(rows, fn(ae_file, cfg))  # seeded: the same numbers twice


def test_scratch_builds_a_fresh_model_of_the_same_variant_and_config(ae_file, monkeypatch):
    import evaluation.finetune as finetune

    built = []

    def spy(variant, cfg, input_shape, likelihood, *, seed=None):
        built.append((variant, cfg, input_shape, likelihood))
        assert seed is not None  # scratch models are seeded per run
        return real(variant, cfg, input_shape, likelihood, seed=seed)

    real = finetune.build_model
    monkeypatch.setattr(finetune, "build_model", spy)
    fewshot_scratch(ae_file, QUICK.model_copy(update={"finetune_epochs": 2}))
    assert len(built) == 2 * 3  # one fresh model per k and seed
    variant, cfg, shape, likelihood = built[0]
    assert (variant, cfg.latent_dim, cfg.hidden, shape, likelihood) == ("ae", K, (32,), (16,), "gaussian")
    built.clear()
    fewshot_finetune(ae_file, QUICK.model_copy(update={"finetune_epochs": 2}))
    assert built == []  # fine-tuning starts from the pretrained weights


@pytest.mark.parametrize("n_classes", [2, 4])
def test_lp_head_folds_the_scaler_and_logistic_head_exactly(tmp_path, n_classes):
    """The fine-tune head at epoch 0 computes the frozen head's decision function (binary case included)."""
    import torch

    from ae_repr.checkpoint import load_model
    from evaluation.finetune import _lp_head
    from evaluation.probe import fit_frozen_head

    loaded = load_model(save_tiny_ae(tmp_path / "m"))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32) * 3)
    y = np.arange(40) % n_classes
    head = _lp_head(loaded.model, x, y, n_classes, QUICK, seed=0)
    with torch.inference_mode():
        z = loaded.model.encode(x)
        logits = head(z).numpy()
    ref = fit_frozen_head(z.numpy(), y, Cs=(QUICK.fewshot_c,), folds=0, seed=0).decision_function(z.numpy())
    if n_classes == 2:  # sklearn's binary decision function is logit(1) - logit(0)
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref, rtol=1e-4, atol=1e-4)
    else:  # multinomial: logits up to a per-row constant
        np.testing.assert_allclose(
            logits - logits.mean(1, keepdims=True), ref - ref.mean(1, keepdims=True), rtol=1e-4, atol=1e-4
        )
