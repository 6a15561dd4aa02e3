"""Percentile bootstrap intervals over test rows: resample the rows' scores, never refit a model.

A statistic is computed on `n_boot` resamples of the test rows (drawn with replacement) and the 95%
interval is the 2.5th to 97.5th percentile of those values. Resampled positions come from
`numpy.random.default_rng([seed, BOOTSTRAP_STREAM])` and refer to the test rows in sample_id order
(`ordered_test_rows`), so every representation of a data set is scored on the same resampled rows, and the
same seed gives the same interval. The statistics are vectorized over the resamples (a resample is
one row of an index matrix), in chunks of about `_CHUNK_ELEMENTS` positions to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from scipy import stats

from ae_repr.io import FeatureFile

from .inputs import split_mask
from .results import CI_TEST_BOOTSTRAP

CONFIDENCE = 0.95
BOOTSTRAP_STREAM = 0xB007  # keeps the bootstrap's random stream apart from the other uses of the eval seed
_CHUNK_ELEMENTS = 1 << 22  # resampled positions held at once (32 MiB of int64)

Statistic = Callable[[np.ndarray], np.ndarray]  # (b, n) resampled positions -> (b,) values


def ordered_test_rows(ff: FeatureFile) -> np.ndarray:
    """Positions of the test rows in sample_id order: the rows every bootstrap resamples."""
    rows = np.flatnonzero(split_mask(ff, "test"))
    return rows[np.argsort(ff.frame["sample_id"].to_numpy()[rows], kind="stable")]


def _index_chunks(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng([seed, BOOTSTRAP_STREAM])
    per_chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, per_chunk):
        yield rng.integers(0, n, size=(min(per_chunk, n_boot - start), n))  # (b, n)


def resample_indices(n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """The (n_boot, n) positions `bootstrap_interval` resamples with (all chunks at once)."""
    return np.concatenate(list(_index_chunks(n, n_boot, seed)))


def bootstrap_distribution(statistic: Statistic, n: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """`statistic` on `n_boot` resamples of `n` rows: (n_boot,) values."""
    return np.concatenate([np.asarray(statistic(idx), dtype=np.float64) for idx in _index_chunks(n, n_boot, seed)])


def bootstrap_interval(
    statistic: Statistic, n: int, n_boot: int, seed: int = 0, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Percentile interval of `statistic` over `n_boot` resamples of `n` rows."""
    values = bootstrap_distribution(statistic, n, n_boot, seed)
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def mean_interval(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-row values (accuracy: the 0/1 correctness vector)."""
    v = np.asarray(values, dtype=np.float64)
    return bootstrap_interval(lambda idx: v[idx].mean(axis=1), len(v), n_boot, seed)


def macro_f1_interval(y_true: np.ndarray, y_pred: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of scikit-learn's macro F1 (classes present in either vector of a resample)."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    n_classes = len(classes)
    t, p = codes[: len(y_true)], codes[len(y_true) :]
    hit = (t == p).astype(np.float64)

    def macro_f1(idx: np.ndarray) -> np.ndarray:
        offset = np.arange(len(idx))[:, None] * n_classes  # one block of class counts per resample
        size = len(idx) * n_classes
        support = np.bincount((t[idx] + offset).ravel(), minlength=size)
        predicted = np.bincount((p[idx] + offset).ravel(), minlength=size)
        tp = np.bincount((t[idx] + offset).ravel(), weights=hit[idx].ravel(), minlength=size)
        denom = (support + predicted).reshape(-1, n_classes)  # 2tp + fp + fn per class
        f1 = np.divide(2 * tp.reshape(-1, n_classes), denom, out=np.zeros(denom.shape), where=denom > 0)
        return f1.sum(axis=1) / (denom > 0).sum(axis=1)

    return bootstrap_interval(macro_f1, len(t), n_boot, seed)


def auroc_interval(truth: np.ndarray, scores: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the area under the ROC curve (the Mann-Whitney statistic from mid-ranks,
    ties counted half, as scikit-learn's `roc_auc_score`); a resample with a single class scores NaN and is
    left out."""
    y = np.asarray(truth).astype(bool)
    s = np.asarray(scores, dtype=np.float64)

    def auroc(idx: np.ndarray) -> np.ndarray:
        ranks = stats.rankdata(s[idx], axis=1)  # (b, n) mid-ranks within each resample
        pos = y[idx]
        n_pos = pos.sum(axis=1)
        n_neg = pos.shape[1] - n_pos
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((ranks * pos).sum(axis=1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)

    values = bootstrap_distribution(auroc, len(s), n_boot, seed)
    lo, hi = np.nanquantile(values, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return float(lo), float(hi)


def interval_fields(lo_hi: tuple[float, float], n_boot: int) -> dict[str, Any]:
    """The result-row keywords of a test-row bootstrap interval."""
    return {"ci_low": lo_hi[0], "ci_high": lo_hi[1], "n_seeds": n_boot, "ci_method": CI_TEST_BOOTSTRAP}
