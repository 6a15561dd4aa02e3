"""Disentanglement scores of a code against ground-truth factors (task `disentanglement`): MIG, DCI and SAP.

MIG (Chen et al. 2018, "Isolating Sources of Disentanglement in Variational Autoencoders"): each code
dimension is cut into equal-width bins over its own range; per factor, the gap between the two largest
mutual informations (nats) with a code dimension, divided by the factor's entropy, averaged over factors.
DCI (Eastwood & Williams 2018, "A Framework for the Quantitative Evaluation of Disentangled
Representations"): one regressor per factor predicts the factor's index from the code; its importances
form R (K, F). As in disentanglement_lib, disentanglement is sum_i rho_i (1 - H_F(P_i.)), P_i. code
dimension i's row of R normalized and rho_i its share of all importance; completeness is
sum_j rho_j (1 - H_K(P_.j)), P_.j factor j's column normalized and rho_j the factor's share of all
importance (entropies in base F and K, so each term lies in [0, 1]). Every factor is treated as
ordinal (its grid index is the regression target), also categorical ones such as dSprites' shape.
Informativeness here is the mean test R^2 clipped to [0, 1], so higher is better; the paper reports a
prediction error instead. SAP (Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts
from Unlabeled Observations"): S[i, j] scores code dimension i alone against factor j, fitted on train
rows and scored on test rows; for a discrete factor it is the test accuracy of a threshold classifier on
the dimension (a greedy decision tree with as many leaves as the factor has values: the line cut into
intervals, one value each, in any order), for a continuous one the test R^2 of a 1-D linear regression
(clipped at 0); per factor, the top score minus the second, averaged. disentanglement_lib scores
discrete factors by the accuracy of a one-vs-rest `LinearSVC(C=0.01)` on the dimension instead; one-vs-rest
lines on one dimension cannot pick out a middle value, so a perfect code of a 10-valued ordinal factor
scores about 0.2 there (the thresholds: 1.0). Factors here are grid indices, so every factor is scored
as discrete (disentanglement_lib does the same for dSprites). Factors with a single value are skipped
by every score. The task scores at most `disentanglement_max_rows` train and
test rows each; DCI's boosted trees see at most 3,000 of those train rows (their cost grows with rows;
the importances hardly change).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.stats import entropy
from sklearn.compose import TransformedTargetRegressor
from sklearn.ensemble import GradientBoostingRegressor
from sklearn.linear_model import Lasso, LinearRegression
from sklearn.metrics import mutual_info_score, r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier

from .context import AppContext, TaskOutput
from .inputs import single_thread, subsample
from .results import result_frame, result_row

log = logging.getLogger(__name__)

TASK = "disentanglement"
MAX_CODE_DIMS = 100  # wider codes (the raw-pixel baseline) are skipped: trees over pixels are slow and meaningless
# The exact-split trees cost ~2.5 s per factor on 10,000 x 16 codes (one core); on 3,000 rows the whole
# task stays near 4 s per representation and the importances barely move.
DCI_GBT_MAX_ROWS = 3000


@dataclass(frozen=True)
class DCIResult:
    """DCI scores and the importance matrix (K, F); columns of constant factors are NaN."""

    disentanglement: float
    completeness: float
    informativeness: float
    importance: np.ndarray


def _varying(*factor_sets: np.ndarray) -> np.ndarray:
    """Mask (F,) of factors taking more than one value in every given set."""
    return np.all([np.ptp(f, axis=0) > 0 for f in factor_sets], axis=0)


def mig(codes: np.ndarray, factors: np.ndarray, bins: int = 20) -> tuple[float, np.ndarray]:
    """Mean normalized mutual-information gap over non-constant factors, and the per-factor gaps (F,)."""
    codes, factors = np.asarray(codes, dtype=np.float64), np.asarray(factors)
    binned = [np.digitize(c, np.histogram_bin_edges(c, bins)[1:-1]) for c in codes.T]  # K arrays of bin ids
    mi = np.array([[mutual_info_score(f, b) for f in factors.T] for b in binned])  # (K, F)
    h = np.array([mutual_info_score(f, f) for f in factors.T])  # (F,) factor entropies
    top = -np.sort(-mi, axis=0)  # (K, F), descending per factor
    second = top[1] if len(top) > 1 else np.zeros(len(h))
    gaps = np.full(len(h), np.nan)
    ok = h > 0
    gaps[ok] = (top[0, ok] - second[ok]) / h[ok]
    return (float(gaps[ok].mean()) if ok.any() else float("nan")), gaps


def _regressor(model: Literal["gbt", "lasso"], seed: int) -> GradientBoostingRegressor | TransformedTargetRegressor:
    if model == "gbt":
        return GradientBoostingRegressor(n_estimators=50, max_depth=3, random_state=seed)
    # codes and target standardized so one alpha means the same on every representation and factor
    return TransformedTargetRegressor(make_pipeline(StandardScaler(), Lasso(alpha=0.01)), transformer=StandardScaler())


def _importance(fitted: GradientBoostingRegressor | TransformedTargetRegressor) -> np.ndarray:
    if isinstance(fitted, GradientBoostingRegressor):
        return fitted.feature_importances_
    return np.abs(fitted.regressor_[-1].coef_)


def _one_minus_entropy(p: np.ndarray, n: int) -> np.ndarray:
    """1 - entropy base n of each row of a row-stochastic matrix; with n == 1 the only choice is certain."""
    return 1.0 - entropy(p, base=n, axis=1) if n > 1 else np.ones(len(p))


def dci_scores(r: np.ndarray) -> tuple[float, float]:
    """DCI disentanglement and completeness of an importance matrix R (K, F), each term weighted by its share of R."""
    rows, cols = r.sum(axis=1), r.sum(axis=0)
    total = r.sum()
    if total == 0:  # no regressor used the code at all
        return 0.0, 0.0
    used = rows > 0  # code dims with zero importance get weight 0
    d = _one_minus_entropy(r[used] / rows[used, None], r.shape[1])
    explained = cols > 0  # factors no dim explains get weight 0
    c = _one_minus_entropy((r[:, explained] / cols[explained]).T, r.shape[0])
    return float(rows[used] / total @ d), float(cols[explained] / total @ c)


def dci(
    z_train: np.ndarray,
    f_train: np.ndarray,
    z_test: np.ndarray,
    f_test: np.ndarray,
    *,
    model: Literal["gbt", "lasso"] = "gbt",
    seed: int = 0,
) -> DCIResult:
    """DCI disentanglement, completeness (both importance-weighted) and informativeness (mean test R^2)."""
    k, n_factors = z_train.shape[1], f_train.shape[1]
    keep = np.flatnonzero(_varying(f_train, f_test))
    importance = np.full((k, n_factors), np.nan)
    r2 = []
    with single_thread():
        for j in keep:
            fitted = _regressor(model, seed).fit(z_train, f_train[:, j].astype(np.float64))
            importance[:, j] = _importance(fitted)
            r2.append(np.clip(fitted.score(z_test, f_test[:, j].astype(np.float64)), 0.0, 1.0))
    if not len(keep):
        return DCIResult(float("nan"), float("nan"), float("nan"), importance)
    d, c = dci_scores(importance[:, keep])
    return DCIResult(d, c, float(np.mean(r2)), importance)


def _sap_score(z_train: np.ndarray, f_train: np.ndarray, z_test: np.ndarray, f_test: np.ndarray, discrete: bool) -> float:
    """One code dimension against one factor: test accuracy of a 1-D threshold classifier, or test R^2 (continuous)."""
    if discrete:
        # thresholds on the one dimension: as many intervals as the factor has values, in any order
        clf = DecisionTreeClassifier(max_leaf_nodes=max(2, len(np.unique(f_train))), random_state=0)
        clf.fit(z_train[:, None], f_train)
        return float(np.mean(clf.predict(z_test[:, None]) == f_test))
    fit = LinearRegression().fit(z_train[:, None], f_train)
    return max(0.0, float(r2_score(f_test, fit.predict(z_test[:, None]))))


def sap(
    z_train: np.ndarray,
    f_train: np.ndarray,
    z_test: np.ndarray,
    f_test: np.ndarray,
    discrete: Sequence[bool] | None = None,
) -> float:
    """SAP: per non-constant factor, the gap between the two best single-dimension test scores, averaged.

    `discrete` (F,) says which factors are scored by classification accuracy (None: all of them), the
    rest by linear R^2.
    """
    keep = np.flatnonzero(_varying(f_train, f_test))
    if not len(keep):
        return float("nan")
    discrete = np.ones(f_train.shape[1], bool) if discrete is None else np.asarray(discrete, bool)
    score = np.zeros((z_train.shape[1], len(keep)))  # (K, F')
    with single_thread():
        for i in range(z_train.shape[1]):
            for col, j in enumerate(keep):
                score[i, col] = _sap_score(z_train[:, i], f_train[:, j], z_test[:, i], f_test[:, j], discrete[j])
    top = -np.sort(-score, axis=0)  # (K, F'), descending per factor
    second = top[1] if len(top) > 1 else np.zeros(len(keep))
    return float(np.mean(top[0] - second))


def disentanglement(ctx: AppContext) -> TaskOutput:
    """MIG, DCI and SAP of the feature file's codes against the data set's ground-truth factors."""
    if ctx.factors is None:
        return TaskOutput(notes=(f"{ctx.name}: disentanglement not run: the data set has no ground-truth factors",))
    z = ctx.ff.z
    if z.shape[1] > MAX_CODE_DIMS:
        return TaskOutput(
            notes=(f"{ctx.name}: disentanglement not run: the code has {z.shape[1]} dims (> {MAX_CODE_DIMS})",)
        )
    start = time.perf_counter()
    cfg = ctx.cfg
    tr = subsample(ctx.ff, "train", cfg.disentanglement_max_rows, ctx.seed)
    te = subsample(ctx.ff, "test", cfg.disentanglement_max_rows, ctx.seed)
    dci_tr = tr if cfg.dci_model == "lasso" else subsample(ctx.ff, "train", min(len(tr), DCI_GBT_MAX_ROWS), ctx.seed)
    z = z.astype(np.float64)
    mig_score, gaps = mig(z[tr], ctx.factors[tr], cfg.mig_bins)
    scores = dci(z[dci_tr], ctx.factors[dci_tr], z[te], ctx.factors[te], model=cfg.dci_model, seed=ctx.seed)
    sap_score = sap(z[tr], ctx.factors[tr], z[te], ctx.factors[te])
    log.info("%s: disentanglement scores in %.1f s", ctx.name, time.perf_counter() - start)
    rows = [
        result_row(ctx.name, TASK, "mig", mig_score),
        result_row(ctx.name, TASK, "dci_disentanglement", scores.disentanglement),
        result_row(ctx.name, TASK, "dci_completeness", scores.completeness),
        result_row(ctx.name, TASK, "dci_informativeness", scores.informativeness),
        result_row(ctx.name, TASK, "sap", sap_score),
    ]
    estimator = (
        "GradientBoostingRegressor(n_estimators=50, max_depth=3) per factor, importances from feature_importances_"
        if cfg.dci_model == "gbt"
        else "Lasso(alpha=0.01) on standardized codes and target per factor, importances |coef|"
    )
    note = (
        f"disentanglement ({ctx.name}): MIG {cfg.mig_bins} equal-width bins on {len(tr)} train rows; "
        f"DCI {estimator} on {len(dci_tr)} train rows, factors as ordinal indices, "
        f"informativeness = mean test R² on {len(te)} test rows, completeness weighted by factor importance; "
        f"SAP test accuracy of a threshold classifier (at most one interval per value) per dimension and factor "
        f"(every factor discrete) "
        f"on {len(tr)}/{len(te)} rows"
    )
    pictures = {
        f"{ctx.name}/dci_importance": scores.importance.astype(np.float32),
        f"{ctx.name}/mig_per_factor": gaps.astype(np.float32),
    }
    return TaskOutput(frame=result_frame(rows), pictures=pictures, notes=(note,))
