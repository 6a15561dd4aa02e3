"""MIG, DCI and SAP on synthetic factors with known answers, and the disentanglement task end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from ae_repr.config import EvalConfig
from ae_repr.data import factor_values, load_dataset
from ae_repr.io import write_features
from evaluation.context import make_context
from evaluation.disentanglement import dci, dci_scores, disentanglement, mig, sap
from evaluation.inputs import load_feature_file

SIZES = (4, 5, 6, 8, 10)  # values per synthetic factor
N, N_TRAIN = 3000, 2250
METRICS = {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness", "sap"}


def _entropy(*cols: np.ndarray) -> float:
    """Plug-in entropy (nats) of the joint of integer columns, by counting."""
    _, counts = np.unique(np.stack(cols, axis=1), axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def codes() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f = np.stack([rng.integers(0, s, N) for s in SIZES], axis=1)  # (N, 5)
    # each dim a monotone nonlinear function of its own factor, plus noise well below the value spacing
    perfect = np.exp(2.0 * f / (np.array(SIZES) - 1)) + 0.01 * rng.normal(size=f.shape)
    # two extra nuisance dims so that K != F: the entropy bases of D (F) and C (K) differ
    wide = np.concatenate([perfect, rng.normal(size=(N, 2))], axis=1)  # (N, 7)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    return {"factors": f, "perfect": perfect, "rotated": wide @ q, "noise": rng.normal(size=f.shape)}


def _split(z: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return z[:N_TRAIN], f[:N_TRAIN], z[N_TRAIN:], f[N_TRAIN:]


def test_mig_matches_counting_on_a_tiny_example() -> None:
    # three code dims in [0, 1]; with 2 equal-width bins the threshold is 0.5
    c0 = np.array([0.0, 0.1, 0.2, 0.9, 1.0, 0.6, 0.3, 0.8])
    c1 = np.array([0.0, 1.0, 0.0, 1.0, 0.4, 0.7, 0.2, 0.0])
    c2 = np.array([0.0, 0.2, 0.1, 0.0, 0.3, 0.4, 0.1, 1.0])
    f0 = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    f1 = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    b = [(c >= 0.5).astype(int) for c in (c0, c1, c2)]
    expected = []
    for f in (f0, f1):
        mi = sorted((_entropy(f) + _entropy(bi) - _entropy(f, bi) for bi in b), reverse=True)
        expected.append((mi[0] - mi[1]) / _entropy(f))
    score, gaps = mig(np.stack([c0, c1, c2], 1), np.stack([f0, f1], 1), bins=2)
    np.testing.assert_allclose(gaps, expected, atol=1e-12)
    assert score == pytest.approx(np.mean(expected))
    assert min(expected) > 0.03  # no ties: the largest and second largest MI differ for both factors
    # one code dim: the gap is the MI itself over the entropy
    _, single = mig(c0[:, None], f0[:, None], bins=2)
    assert single[0] == pytest.approx((_entropy(f0) + _entropy(b[0]) - _entropy(f0, b[0])) / _entropy(f0))


def test_mig_separates_disentangled_from_rotated(codes: dict[str, np.ndarray]) -> None:
    f = codes["factors"]
    good, good_gaps = mig(codes["perfect"], f)
    bad, _ = mig(codes["rotated"], f)
    assert good > 0.8 and (good_gaps > 0.7).all()
    assert bad < 0.3


@pytest.mark.parametrize("model", ["gbt", "lasso"])
def test_dci_disentangled_vs_rotated(codes: dict[str, np.ndarray], model: str) -> None:
    f = codes["factors"]
    good = dci(*_split(codes["perfect"], f), model=model)
    bad = dci(*_split(codes["rotated"], f), model=model)
    assert good.disentanglement > 0.8 and good.completeness > 0.8
    assert good.informativeness > 0.9
    assert good.disentanglement - bad.disentanglement > 0.3
    assert good.completeness - bad.completeness > 0.3
    # factor j is explained by code dim j
    np.testing.assert_array_equal(good.importance.argmax(axis=0), np.arange(len(SIZES)))
    # the aggregation, recomputed from the importance matrix with natural logs
    r = bad.importance
    p_rows = r / r.sum(axis=1, keepdims=True)
    d = 1 + (p_rows * np.log(np.where(p_rows > 0, p_rows, 1))).sum(axis=1) / np.log(r.shape[1])
    p_cols = r / r.sum(axis=0)
    c = 1 + (p_cols * np.log(np.where(p_cols > 0, p_cols, 1))).sum(axis=0) / np.log(r.shape[0])
    assert bad.disentanglement == pytest.approx((r.sum(axis=1) / r.sum()) @ d)
    assert bad.completeness == pytest.approx((r.sum(axis=0) / r.sum()) @ c)  # weighted by factor importance


def test_dci_scores_weight_codes_and_factors_by_their_importance() -> None:
    # 3 code dims x 2 factors; factor 1 carries 3/4 of the importance, all in code dim 2
    r = np.array([[0.9, 0.0], [0.1, 0.0], [0.0, 3.0]])
    h0 = -(0.9 * np.log(0.9) + 0.1 * np.log(0.1)) / np.log(3)  # factor 0 spread over 2 of 3 dims, base K = 3
    d, c = dci_scores(r)
    assert d == pytest.approx(1.0)  # every code dim explains a single factor
    assert c == pytest.approx(0.25 * (1 - h0) + 0.75 * 1.0)  # not the plain mean (1 - h0 + 1) / 2
    # a dim split evenly between the factors (entropy 1 in base 2) holding half of all importance
    d, c = dci_scores(np.array([[1.0, 1.0], [2.0, 0.0]]))
    assert d == pytest.approx(0.5 * 0.0 + 0.5 * 1.0)
    h_col0 = -(1 / 3 * np.log(1 / 3) + 2 / 3 * np.log(2 / 3)) / np.log(2)
    assert c == pytest.approx(0.75 * (1 - h_col0) + 0.25 * 1.0)
    assert dci_scores(np.zeros((3, 2))) == (0.0, 0.0)


def test_noise_code_is_uninformative(codes: dict[str, np.ndarray]) -> None:
    result = dci(*_split(codes["noise"], codes["factors"]), model="gbt")
    assert 0.0 <= result.informativeness < 0.05  # test R^2 below 0 is clipped
    assert dci(*_split(codes["perfect"], codes["factors"]), model="lasso").informativeness > 0.9


@pytest.mark.parametrize("code", ["rotated", "noise"])
def test_sap_continuous_matches_direct_regressions(codes: dict[str, np.ndarray], code: str) -> None:
    z_tr, f_tr, z_te, f_te = _split(codes[code], codes["factors"])
    s = np.zeros((z_tr.shape[1], f_tr.shape[1]))
    for i in range(z_tr.shape[1]):
        for j in range(f_tr.shape[1]):
            slope, intercept = np.polyfit(z_tr[:, i], f_tr[:, j], 1)
            resid = f_te[:, j] - (slope * z_te[:, i] + intercept)
            s[i, j] = max(0.0, 1 - (resid**2).sum() / ((f_te[:, j] - f_te[:, j].mean()) ** 2).sum())
    top = np.sort(s, axis=0)[::-1]
    assert sap(z_tr, f_tr, z_te, f_te, discrete=[False] * len(SIZES)) == pytest.approx(np.mean(top[0] - top[1]))


def test_sap_discrete_matches_per_dimension_classifiers(codes: dict[str, np.ndarray]) -> None:
    z_tr, f_tr, z_te, f_te = _split(codes["rotated"][:, :3], codes["factors"][:, :2])
    s = np.zeros((3, 2))
    for i in range(3):
        for j in range(2):
            clf = DecisionTreeClassifier(max_leaf_nodes=SIZES[j], random_state=0).fit(z_tr[:, i:i + 1], f_tr[:, j])
            s[i, j] = np.mean(clf.predict(z_te[:, i:i + 1]) == f_te[:, j])
    top = np.sort(s, axis=0)[::-1]
    assert sap(z_tr, f_tr, z_te, f_te) == pytest.approx(np.mean(top[0] - top[1]))


def test_sap_scores_discrete_factors_by_accuracy() -> None:
    # two balanced binary factors over a full 2 x 2 x 5 design; code dim 0 is factor 0, code dim 1 is
    # factor 1 with exactly one row in five flipped (train and test alike). A classifier on a two-valued
    # dim predicts a function of that value, so: S[0, 0] = 1, S[1, 1] = 0.8, and 0.5 for the pairs
    # that share nothing (each value of one factor meets both values of the other equally often).
    f0, f1, rep = np.meshgrid([0, 1], [0, 1], np.arange(5), indexing="ij")
    f0, f1, rep = f0.ravel(), f1.ravel(), rep.ravel()
    flipped = np.where(rep == 0, 1 - f1, f1)
    f = np.tile(np.stack([f0, f1], axis=1), (50, 1))  # (1000, 2)
    z = np.tile(np.stack([f0, flipped], axis=1).astype(np.float64), (50, 1))
    assert sap(z[:500], f[:500], z[500:], f[500:]) == pytest.approx(((1 - 0.5) + (0.8 - 0.5)) / 2)
    # the linear R^2 of the flipped dim is its squared correlation, (1 - 2 * 0.2)^2 = 0.36
    continuous = sap(z[:500], f[:500], z[500:], f[500:], discrete=[False, False])
    assert continuous == pytest.approx(((1 - 0) + (0.36 - 0)) / 2)


def test_sap_separates_disentangled_from_rotated(codes: dict[str, np.ndarray]) -> None:
    good, bad = (sap(*_split(codes[c], codes["factors"])) for c in ("perfect", "rotated"))
    assert good > 0.8 and good - bad > 0.3


def test_constant_factor_is_skipped(codes: dict[str, np.ndarray]) -> None:
    z, f = codes["perfect"], codes["factors"]
    f_const = np.concatenate([f[:, :2], np.full((N, 1), 3), f[:, 2:]], axis=1)  # constant factor at column 2
    score, gaps = mig(z, f_const)
    assert np.isnan(gaps[2]) and score == pytest.approx(mig(z, f)[0])
    with_const, without = dci(*_split(z, f_const), model="lasso"), dci(*_split(z, f), model="lasso")
    assert np.isnan(with_const.importance[:, 2]).all()
    assert with_const.disentanglement == pytest.approx(without.disentanglement)
    assert with_const.completeness == pytest.approx(without.completeness)
    assert with_const.informativeness == pytest.approx(without.informativeness)
    assert sap(*_split(z, f_const)) == pytest.approx(sap(*_split(z, f)))


def _feature_file(tmp_path: Path, spec: str, z_of) -> Path:
    ds = load_dataset(spec)
    return write_features(
        tmp_path / "perfect.parquet",
        sample_id=ds.sample_id,
        split=ds.split,
        label=ds.labels,
        z=z_of(ds),
        metadata={"variant": "perfect", "dataset": spec},
    )


def test_task_on_dsprites(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = _feature_file(
        tmp_path, "dsprites:3000", lambda ds: factor_values(ds.factors) + 0.001 * rng.normal(size=ds.factors.shape)
    )
    ctx = make_context(load_feature_file(path), EvalConfig())
    out = disentanglement(ctx)
    values = dict(zip(out.frame["metric"], out.frame["value"], strict=True))
    assert set(values) == METRICS and set(out.frame["task"]) == {"disentanglement"}
    assert set(out.frame["representation"]) == {"perfect"}
    assert values["mig"] > 0.8
    assert values["dci_disentanglement"] > 0.8 and values["dci_completeness"] > 0.8
    assert out.pictures["perfect/dci_importance"].shape == (5, 5)
    assert out.pictures["perfect/dci_importance"].dtype == np.float32
    np.testing.assert_array_equal(out.pictures["perfect/dci_importance"].argmax(axis=0), np.arange(5))
    gaps = out.pictures["perfect/mig_per_factor"]
    assert gaps.shape == (5,) and gaps.mean() == pytest.approx(values["mig"], rel=1e-6)
    assert len(out.notes) == 1 and "GradientBoostingRegressor" in out.notes[0]


def test_task_without_factors_or_too_wide(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = _feature_file(tmp_path, "digits", lambda ds: rng.normal(size=(len(ds.sample_id), 4)))
    out = disentanglement(make_context(load_feature_file(path), EvalConfig()))
    assert len(out.frame) == 0 and not out.pictures
    assert out.notes == ("perfect: disentanglement not run: the data set has no ground-truth factors",)
    path = _feature_file(tmp_path, "dsprites:3000", lambda ds: rng.normal(size=(len(ds.sample_id), 101)))
    out = disentanglement(make_context(load_feature_file(path), EvalConfig()))
    assert len(out.frame) == 0 and "101 dims" in out.notes[0]
