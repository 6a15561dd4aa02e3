"""The per-representation tasks on synthetic feature files: probe, kNN, few-shot frozen, reduction."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from eval_synth import D, Synth, make_synth, write_ff
from scipy import stats
from sklearn.decomposition import PCA
from traced import traced_peak

from ae_repr.config import EvalConfig
from ae_repr.data import load_dataset
from ae_repr.errors import UserError
from ae_repr.io import read_features, write_features
from evaluation import fewshot_frozen, knn, linear_probe, reduction, write_baselines
from evaluation.fewshot import fewshot_episodes, t_interval
from evaluation.inputs import raw_inputs
from evaluation.results import RESULT_COLUMNS, RESULT_DTYPES


def _onehot_noise(synth: Synth, noise: float = 0.1) -> np.ndarray:
    rng = np.random.default_rng(1)
    return np.eye(synth.y.max() + 1)[synth.y] + noise * rng.normal(size=(len(synth.y), synth.y.max() + 1))


def _random_labels_file(tmp_path, synth: Synth):
    rng = np.random.default_rng(2)
    z = rng.normal(size=(len(synth.y), 8))
    labels = rng.integers(0, 4, size=len(synth.y))
    return read_features(write_ff(tmp_path / "noise.parquet", synth, z, labels=labels))


def _value(frame, metric: str) -> float:
    return float(frame.loc[frame["metric"] == metric, "value"].item())


def test_probe_near_chance_on_noise(tmp_path, synth):
    rows = linear_probe(_random_labels_file(tmp_path, synth), EvalConfig())
    assert abs(_value(rows, "accuracy") - 0.25) < 0.15
    assert _value(rows, "macro_f1") < 0.45


def test_probe_near_perfect_on_onehot_labels(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "onehot.parquet", synth, _onehot_noise(synth)))
    rows = linear_probe(ff, EvalConfig())
    assert list(rows.columns) == RESULT_COLUMNS
    assert {c: str(t) for c, t in rows.dtypes.items()} == RESULT_DTYPES
    assert set(rows["task"]) == {"linear_probe"} and set(rows["metric"]) == {"accuracy", "macro_f1"}
    assert _value(rows, "accuracy") >= 0.98 and _value(rows, "macro_f1") >= 0.98
    assert rows["k"].isna().all()
    assert (rows["n_seeds"] == EvalConfig().bootstrap_samples).all() and (rows["ci_method"] == "test_bootstrap").all()


def test_knn_chance_and_perfect(tmp_path, synth):
    cfg = EvalConfig(knn_k=(5, 20))
    noise = knn(_random_labels_file(tmp_path, synth), cfg)
    good = knn(read_features(write_ff(tmp_path / "onehot.parquet", synth, _onehot_noise(synth))), cfg)
    assert list(good["metric"]) == ["accuracy_5nn", "accuracy_20nn"]
    assert good["k"].isna().all()  # k is reserved for labels per class
    assert (good["value"] >= 0.98).all()
    assert (abs(noise["value"] - 0.25) < 0.15).all()


def test_knn_holds_a_bounded_block_of_distances(tmp_path, monkeypatch):
    """kNN on 6,000 train and 6,000 test rows: the full distance matrix is 288 MB (float64); predicted in chunks
    of KNN_WORKING_MB, it never is all in memory, and the neighbours, so the accuracies, are the same."""
    import evaluation.probe

    rng = np.random.default_rng(0)
    n = 12000
    y = rng.integers(0, 4, size=n)
    z = np.eye(4)[y] + rng.normal(size=(n, 4))
    path = write_features(tmp_path / "wide.parquet", sample_id=np.arange(n), split=np.array(["train", "test"] * (n // 2)),
                          label=y, z=z, metadata={"variant": "wide"})
    ff, cfg = read_features(path), EvalConfig(knn_k=(5,))
    peaks, values = {}, {}
    for mb in (1024, evaluation.probe.KNN_WORKING_MB):
        monkeypatch.setattr(evaluation.probe, "KNN_WORKING_MB", mb)
        frame, peak = traced_peak(lambda: knn(ff, cfg))
        values[mb], peaks[mb] = frame["value"].tolist(), peak / 2**20
    assert peaks[1024] > 288, peaks  # the whole matrix at once: the measurement sees it
    assert peaks[evaluation.probe.KNN_WORKING_MB] < 144, peaks  # less than half of it
    assert values[1024] == values[evaluation.probe.KNN_WORKING_MB]


def test_fewshot_frozen_interval_and_seeds(tmp_path, synth):
    cfg = EvalConfig(fewshot_k=(1, 5), fewshot_seeds=6)
    ff = read_features(write_ff(tmp_path / "onehot.parquet", synth, _onehot_noise(synth, noise=0.8)))
    rows = fewshot_frozen(ff, cfg)
    assert list(rows["k"]) == [1, 5]
    assert (rows["n_seeds"] == 6).all()
    assert (rows["ci_low"] <= rows["value"]).all() and (rows["value"] <= rows["ci_high"]).all()
    assert ((rows["value"] > 0.25) & (rows["value"] <= 1)).all()


def test_t_interval_matches_scipy():
    values = [0.5, 0.6, 0.55, 0.7, 0.65]
    mean, lo, hi = t_interval(values)
    ref_lo, ref_hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert (lo, hi) == pytest.approx((ref_lo, ref_hi))


def test_fewshot_episodes_are_train_rows_k_per_class_and_seeded(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "onehot.parquet", synth, _onehot_noise(synth)))
    a = fewshot_episodes(ff, 3, 4, seed=0)
    b = fewshot_episodes(ff, 3, 4, seed=0)
    assert len(a) == 4 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1])
    for shots in a:
        assert (synth.split[shots] == "train").all()
        assert np.bincount(synth.y[shots]).tolist() == [3, 3, 3, 3]


def test_k_larger_than_smallest_class_is_skipped(tmp_path, caplog):
    synth = make_synth(tmp_path, class_sizes=(60, 60, 60, 8))  # smallest class: 6 train rows
    ff = read_features(write_ff(tmp_path / "onehot.parquet", synth, _onehot_noise(synth)))
    with caplog.at_level(logging.WARNING, logger="evaluation"):
        rows = fewshot_frozen(ff, EvalConfig(fewshot_k=(1, 5, 10), fewshot_seeds=3))
    assert list(rows["k"]) == [1, 5]
    assert any("k=10 skipped" in r.getMessage() for r in caplog.records)


def test_trustworthiness_identity_is_one_and_projection_lower(tmp_path, synth):
    cfg = EvalConfig()
    mean, std = synth.x[synth.train].mean(0), synth.x[synth.train].std(0)
    identity = (synth.x - mean) / std  # the raw input as the evaluator normalizes it
    rp = synth.x @ np.random.default_rng(3).normal(size=(D, 2))
    t_id = _value(
        reduction(read_features(write_ff(tmp_path / "ident.parquet", synth, identity)), cfg),
        "trustworthiness",
    )
    t_rp = _value(
        reduction(read_features(write_ff(tmp_path / "rp2.parquet", synth, rp)), cfg), "trustworthiness"
    )
    assert t_id == pytest.approx(1.0, abs=1e-6)
    assert t_rp < t_id - 0.02


def test_raw_inputs_normalize_only_the_rows_asked_for(tmp_path):
    """A task's few rows of normalized input cost those rows, not a float32 copy of the data set; they equal the
    same rows of the full copy, and the train split's z-score computed here."""
    synth = make_synth(tmp_path, class_sizes=(500, 500, 500, 500))
    raw = raw_inputs(read_features(write_ff(tmp_path / "f.parquet", synth, _onehot_noise(synth))))
    rows = np.array([17, 0, 5])
    assert raw.normalizer.kind == "standard"  # fitted once, on the train rows
    part, peak = traced_peak(lambda: raw.flat_rows(rows))
    assert peak < synth.x.size * 4 / 10
    x_train = synth.x[synth.train].astype(np.float64)
    np.testing.assert_allclose(part, (synth.x[rows] - x_train.mean(0)) / x_train.std(0), rtol=1e-5)
    np.testing.assert_array_equal(part, raw.flat[rows])


def test_pca_baseline_recon_mse_equals_sklearn(tmp_path, synth):
    write_ff(tmp_path / "features" / "learned.parquet", synth, _onehot_noise(synth))
    paths = write_baselines(tmp_path / "features", EvalConfig(baselines=("pca",)))
    assert [p.name for p in paths] == ["pca.parquet"]
    rows = reduction(read_features(paths[0]), EvalConfig())
    x_train = synth.x[synth.train].astype(np.float64)
    xn = ((synth.x - x_train.mean(0)) / x_train.std(0)).astype(np.float32)
    pca = PCA(n_components=4, svd_solver="full").fit(xn[synth.train])
    expected = np.mean((pca.inverse_transform(pca.transform(xn[synth.test])) - xn[synth.test]) ** 2)
    assert _value(rows, "recon_mse") == pytest.approx(expected, rel=1e-5)
    assert _value(rows, "fit_time_s") >= 0


def test_baselines_copy_rows_split_and_labels_from_the_learned_file(tmp_path, synth):
    split = synth.split.copy()
    split[:5] = "test"  # the feature file's split wins over the data file's
    digest = load_dataset(str(synth.path)).sha256  # the data file's: evaluation refuses features of other content
    learned = write_features(
        tmp_path / "features" / "vae.parquet",
        sample_id=np.arange(len(synth.y)),
        split=split,
        label=synth.y,
        z=_onehot_noise(synth),
        metadata={"variant": "vae", "dataset": str(synth.path), "dataset_sha256": digest, "model_dir": "../m"},
    )
    paths = write_baselines(tmp_path / "features", EvalConfig())
    assert [p.stem for p in paths] == ["raw", "pca", "ica", "random_projection"]
    ref = read_features(learned)
    for path, width in zip(paths, (D, 4, 4, 4), strict=True):
        ff = read_features(path)
        assert ff.meta["variant"] == path.stem and int(ff.meta["latent_dim"]) == width == len(ff.z_columns)
        assert ff.meta["dataset"] == str(synth.path) and ff.meta["dataset_sha256"] == digest
        assert "model_dir" not in ff.meta and float(ff.meta["fit_time_s"]) >= 0
        cols = ["sample_id", "split", "label"]
        pd.testing.assert_frame_equal(ff.frame[cols], ref.frame[cols])
    raw = read_features(paths[0]).z
    train = split == "train"
    np.testing.assert_allclose(raw[train].mean(0), 0, atol=1e-5)  # normalized on the train rows only
    np.testing.assert_allclose(raw[train].std(0), 1, atol=1e-4)


def test_unknown_baseline_is_a_user_error(tmp_path, synth):
    write_ff(tmp_path / "features" / "vae.parquet", synth, _onehot_noise(synth))
    with pytest.raises(UserError, match="unknown baseline 'umap'"):
        write_baselines(tmp_path / "features", EvalConfig(baselines=("pca", "umap")))


def test_baselines_follow_the_reference_file_past_an_earlier_runs_leftover(tmp_path, synth):
    features = tmp_path / "features"
    current = write_ff(features / "vae.parquet", synth, _onehot_noise(synth))  # this run: width 4
    write_ff(features / "ae.parquet", synth, np.zeros((len(synth.y), 2), np.float32))  # an earlier run's, width 2
    with pytest.raises(UserError, match="disagree on latent width"):
        write_baselines(features, EvalConfig(baselines=("pca",)))
    (path,) = write_baselines(features, EvalConfig(baselines=("pca",)), reference=current)
    assert len(read_features(path).z_columns) == 4


def test_probe_chooses_c_on_a_bounded_subsample_and_fits_every_row():
    """Above probe_cv_max_rows, C comes from CV on the documented stratified subsample; the head sees every row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from evaluation.probe import fit_frozen_head

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=600)
    x = rng.normal(size=(600, 5)) + 0.8 * y[:, None]
    Cs = (0.001, 0.1, 10.0)
    head = fit_frozen_head(x, y, Cs=Cs, folds=3, seed=4, cv_max_rows=200)
    part = train_test_split(np.arange(600), train_size=200, stratify=y, random_state=4)[0]
    pipe = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000, random_state=4))])
    search = GridSearchCV(pipe, {"logreg__C": list(Cs)}, cv=StratifiedKFold(3, shuffle=True, random_state=4),
                          scoring="accuracy").fit(x[part], y[part])
    assert head.get_params()["logreg__C"] == search.best_params_["logreg__C"]
    full = pipe.set_params(logreg__C=search.best_params_["logreg__C"]).fit(x, y)
    np.testing.assert_allclose(head.predict_proba(x), full.predict_proba(x))  # fitted on all 600 rows
    assert head.named_steps["scale"].n_samples_seen_ == 600
    # at or below the bound: the plain search over every row, as before
    small = fit_frozen_head(x, y, Cs=Cs, folds=3, seed=4, cv_max_rows=600)
    assert isinstance(small, GridSearchCV) and small.n_splits_ == 3


def test_wide_features_search_c_on_fewer_rows(tmp_path, caplog):
    """The C search's rows shrink with the features' width (probe_cv_max_values), never below CV_MIN_ROWS; the
    probe on a wide file then equals plain scikit-learn's search on the documented subsample, refitted on all."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from evaluation.probe import CV_MIN_ROWS, cv_rows

    default = EvalConfig()
    assert cv_rows(default, 16) == default.probe_cv_max_rows == 5000
    assert cv_rows(default, 4096) == 2_500_000 // 4096 == 610  # raw 64x64 pixels
    assert cv_rows(default, 100_000) == CV_MIN_ROWS
    synth = make_synth(tmp_path, class_sizes=(300, 300, 300))  # 675 train rows of 16 features
    cfg = EvalConfig(probe_c_grid=(0.001, 0.1, 10.0), probe_folds=3, probe_cv_max_values=16 * 540,
                     bootstrap_samples=100)
    assert cv_rows(cfg, 16) == 540
    ff = read_features(write_ff(tmp_path / "wide.parquet", synth, synth.x))
    with caplog.at_level(logging.INFO, logger="evaluation.probe"):
        rows = linear_probe(ff, cfg, seed=2)
    assert "C chosen by 3-fold CV on 540 of 675 rows" in caplog.text
    tr, te = synth.train, synth.test
    part = train_test_split(np.arange(tr.sum()), train_size=540, stratify=synth.y[tr], random_state=2)[0]
    pipe = Pipeline([("scale", StandardScaler()), ("logreg", LogisticRegression(max_iter=1000, random_state=2))])
    search = GridSearchCV(pipe, {"logreg__C": list(cfg.probe_c_grid)},
                          cv=StratifiedKFold(3, shuffle=True, random_state=2), scoring="accuracy")
    best = search.fit(synth.x[tr][part], synth.y[tr][part]).best_params_
    pred = pipe.set_params(**best).fit(synth.x[tr], synth.y[tr]).predict(synth.x[te])
    accuracy = rows.set_index("metric").loc["accuracy", "value"]
    assert accuracy == pytest.approx(float((pred == synth.y[te]).mean()))


@pytest.mark.parametrize("n_classes", [2, 3])
def test_wide_few_shot_head_in_the_rows_span_is_plain_sklearns_head(n_classes):
    """30 rows of 600 features: fit_frozen_head solves in the 30-dimensional span of the scaled rows, and
    its head (mapped back by head_weights) is the one plain scikit-learn finds on all 600, to solver tolerance."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from evaluation.probe import SPAN_RATIO, fit_frozen_head, head_weights

    rng = np.random.default_rng(0)
    y = np.arange(30) % n_classes
    x = (rng.normal(size=(30, 600)) + 0.3 * y[:, None] * rng.normal(size=600)).astype(np.float32)
    x_test = rng.normal(size=(200, 600)).astype(np.float32)
    assert SPAN_RATIO * len(x) <= x.shape[1]
    span = fit_frozen_head(x, y, Cs=(1.0,), folds=0)
    assert "rows" in span.named_steps and span.named_steps["rows"].components_.shape == (30, 600)
    plain = Pipeline([("scale", StandardScaler()),
                      ("logreg", LogisticRegression(C=1.0, tol=1e-10, max_iter=100_000))]).fit(x, y)
    # at the default tolerance lbfgs stops where the CPU's rounding takes it (just over 2e-3 apart on some CPUs);
    # both solved to 1e-10 they differ by the float32 scaling of the data alone (at most 6e-4 seen)
    span.set_params(logreg__tol=1e-10, logreg__max_iter=100_000).fit(x, y)
    np.testing.assert_allclose(span.predict_proba(x_test), plain.predict_proba(x_test), atol=2e-3)
    # the weights themselves: in the rows' span, equal to plain's (which the penalty put there too)
    w, b = head_weights(span)
    w_plain, b_plain = head_weights(plain)
    np.testing.assert_allclose(w, w_plain, atol=2e-3 * np.abs(w_plain).max())
    np.testing.assert_allclose(b, b_plain, atol=2e-3 * max(1.0, np.abs(b_plain).max()))
    # head_weights is the pipeline's own decision: the same arg-max on every test row
    np.testing.assert_array_equal((x_test @ w.T + b).argmax(1), span.predict(x_test))


def test_narrow_features_keep_the_plain_head():
    from evaluation.probe import fit_frozen_head

    rng = np.random.default_rng(1)
    head = fit_frozen_head(rng.normal(size=(40, 16)), np.arange(40) % 2, Cs=(1.0,), folds=0)
    assert list(head.named_steps) == ["scale", "logreg"]
