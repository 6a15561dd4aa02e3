"""Linear probe and kNN on frozen features, with the one logistic-head helper few-shot reuses.

Linear probe (task `linear_probe`, metrics `accuracy` and `macro_f1` on the test split), exactly
reproducible with plain scikit-learn from a feature file::

    df = pd.read_parquet(path)                                    # rows in file order
    Z = df[[c for c in df.columns if c.startswith("z_")]].to_numpy(np.float32)
    y = df["label"].to_numpy(np.int64)
    tr, te = (df["split"] == "train").to_numpy(), (df["split"] == "test").to_numpy()
    pipe = Pipeline([("scale", StandardScaler()),
                     ("logreg", LogisticRegression(max_iter=1000, random_state=seed))])
    search = GridSearchCV(pipe, {"logreg__C": [0.01, 0.1, 1.0, 10.0, 100.0]},    # EvalConfig.probe_c_grid
                          cv=StratifiedKFold(n_splits=5, shuffle=True, random_state=seed),
                          scoring="accuracy")                    # n_splits = EvalConfig.probe_folds
    search.fit(Z[tr], y[tr])
    pred = search.predict(Z[te])
    accuracy_score(y[te], pred), f1_score(y[te], pred, average="macro")

`seed` is the evaluation seed (0 by default). When the smallest train class has fewer members than
`probe_folds`, n_splits drops to that count; below 2 there is no search and C = `fewshot_c`. With more than
`m = cv_rows(cfg, d)` train rows, the search runs on `train_test_split(np.arange(n), train_size=m,
stratify=y[tr], random_state=seed)[0]` of them (`refit=False`), and the head with its best C is fitted on every
train row: the search's cost stops growing with the data. `m` is `probe_cv_max_rows` (5000), or fewer for wide
features, `probe_cv_max_values // d` (2,500,000 values) but at least 500: 610 rows of raw 64x64 pixels
(d = 4096). Digits' 1347 train rows are all searched. A head fitted on at most d / `SPAN_RATIO` rows (few-shot
heads on raw pixels) is solved in the span of its scaled rows (`RowSpace`): the recipe's own optimum, found in
fewer dimensions, equal to solver tolerance.

kNN (task `knn`): `KNeighborsClassifier(n_neighbors=n, metric="cosine")` fitted on the train rows'
features as stored (no scaling); test accuracy is reported once per neighbour count n in
`EvalConfig.knn_k` under the metric name `accuracy_<n>nn` (e.g. `accuracy_5nn`, `accuracy_20nn`),
with `k` left empty: in the summary `k` always means labelled examples per class (few-shot).

Intervals: every number above carries a 95% percentile bootstrap interval over the test rows
(`evaluation.intervals`, `EvalConfig.bootstrap_samples` resamples of the fitted model's test
predictions; the model is not refitted), `ci_method` `test_bootstrap`, `n_seeds` the resample count.

Chance (task `chance`, representation `majority_class`): the test accuracy and macro-F1 of always
predicting the train split's most frequent class (`DummyClassifier(strategy="most_frequent")`), with
the same intervals; the report says "at chance" when the best interval does not clear it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn import config_context
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold, train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile

from .inputs import labels, single_thread, split_mask
from .intervals import interval_fields, macro_f1_interval, mean_interval, ordered_test_rows
from .results import result_frame, result_row

log = logging.getLogger(__name__)


# features per row from which a head is fitted in its rows' span: few-shot heads on raw 64x64 pixels (15-165 rows,
# 4096 features) fit in half the time; at 1499 rows the SVD cost more than it saved (2.9 s -> 8.6 s)
SPAN_RATIO = 8


class RowSpace(TransformerMixin, BaseEstimator):
    """Coordinates in the span of the rows it was fitted on: x -> x V^T, V (r, d) an orthonormal basis of that
    span (economy SVD, numerical rank r <= rows).

    A linear model with an L2 penalty on its weights (and a free intercept), fitted on these r coordinates,
    is the one fitted on x itself: the loss sees the weights only through the fit rows, so the penalty puts
    the optimum in their span, and V^T maps it back. Where features outnumber rows (raw 64x64 pixels, 4096 of
    them, few-shot heads on tens of rows) the solver works in r instead of d dimensions, to the same optimum.
    """

    def fit(self, x: np.ndarray, y: np.ndarray | None = None) -> RowSpace:
        _, s, vt = np.linalg.svd(np.asarray(x, dtype=np.float64), full_matrices=False)
        rank = int((s > s[0] * max(np.shape(x)) * np.finfo(np.float64).eps).sum()) if s.size else 0
        self.components_ = vt[: max(rank, 1)]  # (r, d); all-zero rows keep one direction (weights 0 on it)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.components_.T


def fit_frozen_head(
    x: np.ndarray, y: np.ndarray, *, Cs: Sequence[float], folds: int, seed: int = 0, cv_max_rows: int | None = None
) -> Pipeline | GridSearchCV:
    """StandardScaler + multinomial LogisticRegression on frozen features; C by stratified CV when possible.

    With more than `cv_max_rows` rows, C is chosen by CV on a stratified subsample of that many and the head
    refitted on every row (a Pipeline with the chosen C then): the search's cost stops growing with the data.
    Where the features are at least `SPAN_RATIO` times as many as the rows, the regression runs on the scaled
    rows' span (`RowSpace`, refitted within every CV fold): the same head, found in fewer dimensions.
    """
    wide = SPAN_RATIO * len(x) <= x.shape[1]
    pipe = Pipeline(
        [
            ("scale", StandardScaler()),
            *([("rows", RowSpace())] if wide else []),
            ("logreg", LogisticRegression(C=Cs[0], max_iter=1000, random_state=seed)),
        ]
    )
    n_splits = min(folds, int(np.unique(y, return_counts=True)[1].min()))
    model: Pipeline | GridSearchCV = pipe
    search = len(Cs) > 1 and n_splits >= 2
    if search:
        cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        model = GridSearchCV(pipe, {"logreg__C": list(Cs)}, cv=cv, scoring="accuracy")
    with single_thread(), warnings.catch_warnings():
        # lbfgs at max_iter on separable few-shot data is expected; the head is still usable
        warnings.simplefilter("ignore", ConvergenceWarning)
        if search and cv_max_rows is not None and len(x) > cv_max_rows:
            part, _ = train_test_split(np.arange(len(x)), train_size=cv_max_rows, stratify=y, random_state=seed)
            best = model.set_params(refit=False).fit(x[part], y[part]).best_params_
            log.info("C chosen by %d-fold CV on %d of %d rows", n_splits, cv_max_rows, len(x))
            return pipe.set_params(**best).fit(x, y)
        model.fit(x, y)
    return model


def head_weights(pipe: Pipeline) -> tuple[np.ndarray, np.ndarray]:
    """The fitted head as one affine map of the unscaled features: logits = x @ W.T + b, W (classes, d); a
    binary head's one row becomes two (-w/2, w/2), so the arg-max gives its decision."""
    logreg, scaler = pipe.named_steps["logreg"], pipe.named_steps["scale"]
    w, b = logreg.coef_, logreg.intercept_  # (C, K), (C,); binary: one row for the positive class
    if "rows" in pipe.named_steps:  # coefficients of the span's coordinates: back to the scaled features
        w = w @ pipe.named_steps["rows"].components_
    if w.shape[0] == 1:
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    w = w / scaler.scale_  # logits = W (x - mean) / scale + b
    return w, b - w @ scaler.mean_


CV_MIN_ROWS = 500  # the fewest rows the C search gets however wide the features (when the data has them)


def cv_rows(cfg: EvalConfig, n_features: int) -> int:
    """Train rows the C search runs on at most, for `n_features`-wide features: `probe_cv_max_rows`, or fewer
    (`probe_cv_max_values` // n_features, at least CV_MIN_ROWS) where the features are wide."""
    return min(cfg.probe_cv_max_rows, max(CV_MIN_ROWS, cfg.probe_cv_max_values // max(1, n_features)))


def linear_probe(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Test accuracy and macro-F1 of a CV-tuned logistic head on the train split's frozen features."""
    z, y = ff.z, labels(ff)
    tr, te = split_mask(ff, "train"), ordered_test_rows(ff)
    Cs = cfg.probe_c_grid if np.unique(y[tr], return_counts=True)[1].min() >= 2 else (cfg.fewshot_c,)
    head = fit_frozen_head(z[tr], y[tr], Cs=Cs, folds=cfg.probe_folds, seed=seed, cv_max_rows=cv_rows(cfg, z.shape[1]))
    if len(Cs) > 1:
        log.info("%s: linear probe chose C=%g", ff.name, head.get_params()["logreg__C"] if isinstance(head, Pipeline)
                 else head.best_params_["logreg__C"])
    return result_frame(classification_rows(ff.name, "linear_probe", y[te], head.predict(z[te]), cfg, seed=seed))


def classification_rows(
    name: str, task: str, y_true: np.ndarray, y_pred: np.ndarray, cfg: EvalConfig, *, seed: int = 0
) -> list[dict]:
    """`accuracy` and `macro_f1` rows of test predictions (in `ordered_test_rows` order) with bootstrap intervals."""
    n_boot = cfg.bootstrap_samples
    return [
        result_row(name, task, "accuracy", accuracy_score(y_true, y_pred),
                   **interval_fields(mean_interval(y_true == y_pred, n_boot, seed), n_boot)),
        result_row(name, task, "macro_f1", f1_score(y_true, y_pred, average="macro"),
                   **interval_fields(macro_f1_interval(y_true, y_pred, n_boot, seed), n_boot)),
    ]


CHANCE_NAME = "majority_class"  # the representation name of the chance rows


def chance(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Test accuracy and macro-F1 of always predicting the train split's most frequent class (task `chance`)."""
    y, tr, te = labels(ff), split_mask(ff, "train"), ordered_test_rows(ff)
    dummy = DummyClassifier(strategy="most_frequent").fit(np.zeros((int(tr.sum()), 1)), y[tr])
    return result_frame(classification_rows(CHANCE_NAME, "chance", y[te], dummy.predict(np.zeros((len(te), 1))), cfg,
                                            seed=seed))


def knn_metric(n_neighbors: int) -> str:
    """The summary metric name of kNN accuracy with `n_neighbors` neighbours."""
    return f"accuracy_{n_neighbors}nn"


# MB of test-to-train distances scikit-learn holds at once while kNN predicts. Its default, 1024, made kNN the
# largest allocation of a 20,000-row dSprites run: 0.86 GB on 16-d codes, 1.2 GB on raw pixels (then 0.59 GB,
# the train rows it normalizes again for each chunk); the neighbours are the same
KNN_WORKING_MB = 64


def knn(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Test accuracy of cosine kNN classifiers fitted on the train split, one row per neighbour count."""
    z, y = ff.z, labels(ff)
    tr, te = split_mask(ff, "train"), ordered_test_rows(ff)
    rows = []
    for n in cfg.knn_k:
        if n > tr.sum():
            log.warning("%s: kNN with %d neighbours skipped: only %d train rows", ff.name, n, tr.sum())
            continue
        with single_thread(), config_context(working_memory=KNN_WORKING_MB):
            hit = KNeighborsClassifier(n_neighbors=n, metric="cosine").fit(z[tr], y[tr]).predict(z[te]) == y[te]
        interval = interval_fields(mean_interval(hit, cfg.bootstrap_samples, seed), cfg.bootstrap_samples)
        rows.append(result_row(ff.name, "knn", knn_metric(n), float(hit.mean()), **interval))
    return result_frame(rows)
