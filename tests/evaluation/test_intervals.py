"""Bootstrap intervals over test rows: the vectorized statistics against sklearn per resample, and the task rows."""

from __future__ import annotations

import numpy as np
import pytest
from eval_synth import write_ff
from scipy import stats
from sklearn.manifold import trustworthiness
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from ae_repr.config import EvalConfig
from ae_repr.io import read_features
from evaluation import fewshot_frozen, knn, linear_probe, reduction
from evaluation.intervals import (
    auroc_interval,
    macro_f1_interval,
    mean_interval,
    ordered_test_rows,
    resample_indices,
)
from evaluation.reduction import trustworthiness_per_row

B = 400


def _predictions(n: int = 300, n_classes: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and noisy predictions, one predicted class never in the labels (as a weak probe produces)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    pred = np.where(rng.random(n) < 0.6, y, rng.integers(0, n_classes + 1, n))
    return y, pred


def _percentiles(values: list[float]) -> tuple[float, float]:
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def test_accuracy_and_macro_f1_intervals_match_sklearn_on_every_resample():
    y, pred = _predictions()
    idx = resample_indices(len(y), B, seed=3)
    assert idx.shape == (B, len(y))
    acc_ref = _percentiles([accuracy_score(y[i], pred[i]) for i in idx])
    f1_ref = _percentiles([f1_score(y[i], pred[i], average="macro") for i in idx])
    acc = mean_interval(y == pred, B, seed=3)
    f1 = macro_f1_interval(y, pred, B, seed=3)
    assert acc == pytest.approx(acc_ref, abs=1e-12)
    assert f1 == pytest.approx(f1_ref, abs=1e-12)
    assert acc[0] < accuracy_score(y, pred) < acc[1]
    assert f1[0] < f1_score(y, pred, average="macro") < f1[1]
    assert mean_interval(y == pred, B, seed=3) == acc  # seeded
    assert mean_interval(y == pred, B, seed=4) != acc


def test_accuracy_interval_agrees_with_scipy_bootstrap():
    """An independent resampler (scipy's percentile bootstrap, its own random stream) gives nearly the same interval."""
    y, pred = _predictions(n=400)
    hit = (y == pred).astype(float)
    ref = stats.bootstrap((hit,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(1))
    lo, hi = mean_interval(hit, 4000, seed=0)
    assert lo == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert hi == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_interval_resamples_in_chunks_like_all_at_once(monkeypatch):
    """Chunking (to bound memory) draws the same positions as one call: the interval does not depend on it."""
    import evaluation.intervals as iv

    y, pred = _predictions()
    whole = macro_f1_interval(y, pred, B, seed=1)
    monkeypatch.setattr(iv, "_CHUNK_ELEMENTS", len(y) * 7)  # 7 resamples per chunk
    assert macro_f1_interval(y, pred, B, seed=1) == whole
    assert np.array_equal(resample_indices(len(y), B, seed=1)[:3], iv.resample_indices(len(y), 3, seed=1))


def test_trustworthiness_per_row_averages_to_sklearns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(150, 12))
    z = x[:, :3] + 0.3 * rng.normal(size=(150, 3))
    for k in (1, 5, 10):
        assert trustworthiness_per_row(x, z, k).mean() == pytest.approx(trustworthiness(x, z, n_neighbors=k), abs=1e-12)


def _onehot(synth, noise: float) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.eye(4)[synth.y] + noise * rng.normal(size=(len(synth.y), 4))


def test_probe_knn_and_reduction_rows_carry_test_bootstrap_intervals(tmp_path, synth):
    cfg = EvalConfig(bootstrap_samples=B, knn_k=(5,))
    ff = read_features(write_ff(tmp_path / "noisy.parquet", synth, _onehot(synth, noise=0.9)))
    rows = [linear_probe(ff, cfg, seed=2), knn(ff, cfg, seed=2), reduction(ff, cfg, seed=2)]
    for frame in rows:
        bounded = frame[frame["metric"] != "fit_time_s"]
        assert len(bounded) and (bounded["ci_method"] == "test_bootstrap").all()
        assert (bounded["n_seeds"] == B).all()
        assert ((bounded["ci_low"] <= bounded["value"]) & (bounded["value"] <= bounded["ci_high"])).all()
    assert (rows[0]["ci_high"] - rows[0]["ci_low"] > 0.01).all()  # 60 test rows: a real interval
    # kNN's interval is the one of its own test predictions, resampled in sample_id order
    te, tr = ordered_test_rows(ff), synth.train
    hit = KNeighborsClassifier(n_neighbors=5, metric="cosine").fit(ff.z[tr], synth.y[tr]).predict(ff.z[te]) == synth.y[te]
    idx = resample_indices(len(te), B, seed=2)
    got = rows[1].iloc[0]
    assert (got["ci_low"], got["ci_high"]) == pytest.approx(_percentiles(list(hit[idx].mean(axis=1))), abs=1e-12)
    fit = rows[2][rows[2]["metric"] == "fit_time_s"]
    assert fit["ci_method"].isna().all() and fit["ci_low"].isna().all()


def test_fewshot_rows_say_their_interval_is_over_episodes(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "noisy.parquet", synth, _onehot(synth, noise=0.8)))
    rows = fewshot_frozen(ff, EvalConfig(fewshot_k=(1, 5), fewshot_seeds=4))
    assert (rows["ci_method"] == "fewshot_episodes").all() and (rows["n_seeds"] == 4).all()


def test_auroc_interval_is_the_percentiles_of_scikit_learn_on_every_resample():
    rng = np.random.default_rng(3)
    truth = rng.random(120) < 0.3
    scores = np.round(rng.normal(truth * 0.8, 1.0), 1)  # rounded: ties, which count half
    lo, hi = auroc_interval(truth, scores, 300, seed=5)
    idx = resample_indices(120, 300, seed=5)
    values = [roc_auc_score(truth[i], scores[i]) for i in idx if truth[i].any() and not truth[i].all()]
    assert (lo, hi) == pytest.approx(tuple(np.quantile(values, [0.025, 0.975])), abs=1e-12)
    assert lo < roc_auc_score(truth, scores) < hi
