"""Dimensionality-reduction quality of a representation, label-free (task `reduction`).

- `trustworthiness`: `sklearn.manifold.trustworthiness(X, Z, n_neighbors=10)` between the raw input
  (flattened, normalized with a Normalizer fitted on the feature file's train rows) and the
  representation, on at most `trustworthiness_max_rows` test rows chosen by `inputs.subsample`.
  It is computed as the mean of each row's term (`trustworthiness_per_row`, equal to scikit-learn's
  value up to float rounding), so its interval resamples those terms with the neighbourhoods fixed.
- `recon_mse`: mean squared test reconstruction error per input element, in normalized input space,
  where an inverse exists: PCA (refitted on the train rows exactly as the baseline, then
  `inverse_transform(transform(x))`) and every autoencoder (`decode(encode(x))` through the model in
  `model_dir`, in that model's own normalized space). Other baselines report none.
- `fit_time_s`: baselines: their fit time recorded in the feature file (`fit_time_s`); learned
  representations: `train_time_s` of the model directory's `config.json` (where the trainer records
  it), else of `history.json` when that is a mapping; omitted when neither has it.

`trustworthiness` and `recon_mse` carry 95% percentile bootstrap intervals over the test rows
(`evaluation.intervals`, `ci_method` `test_bootstrap`); `fit_time_s` has none.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestNeighbors

from ae_repr.checkpoint import load_model
from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile, read_json

from .baselines import make_baseline
from .inputs import (
    RawInputs,
    is_learned,
    model_dir,
    pass_rows,
    raw_inputs,
    single_thread,
    split_mask,
    subsample,
)
from .intervals import interval_fields, mean_interval, ordered_test_rows
from .results import result_frame, result_row

log = logging.getLogger(__name__)

TRUST_NEIGHBORS = 10


def reduction(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Trustworthiness, reconstruction MSE and fit time of one representation."""
    raw = raw_inputs(ff)
    rows = []
    n_boot = cfg.bootstrap_samples
    sub = subsample(ff, "test", cfg.trustworthiness_max_rows, seed)
    n_neighbors = min(TRUST_NEIGHBORS, (len(sub) - 1) // 2)  # sklearn needs n_neighbors < n / 2
    if n_neighbors >= 1:
        with single_thread():
            t = trustworthiness_per_row(raw.flat_rows(sub), ff.z[sub], n_neighbors)
        rows.append(result_row(ff.name, "reduction", "trustworthiness", t.mean(),
                               **interval_fields(mean_interval(t, n_boot, seed), n_boot)))
    mse = recon_mse_per_row(ff, raw, seed=seed)
    if mse is not None:
        rows.append(result_row(ff.name, "reduction", "recon_mse", mse.mean(),
                               **interval_fields(mean_interval(mse, n_boot, seed), n_boot)))
    seconds = fit_time_s(ff)
    if seconds is not None:
        rows.append(result_row(ff.name, "reduction", "fit_time_s", seconds))
    return result_frame(rows)


def trustworthiness_per_row(x: np.ndarray, z: np.ndarray, n_neighbors: int) -> np.ndarray:
    """Each row's term of trustworthiness (Venna & Kaski 2001); their mean is
    `sklearn.manifold.trustworthiness(x, z, n_neighbors=n_neighbors)`.

    Row i loses, for each of its `n_neighbors` nearest neighbours in z that is not among its nearest
    in x, that neighbour's excess rank in x, scaled so a perfect embedding scores 1.
    """
    n, k = len(x), n_neighbors
    dist = pairwise_distances(x)
    np.fill_diagonal(dist, np.inf)  # a row is not its own neighbour
    rank = np.empty((n, n), dtype=np.int64)  # rank[i, j]: j's rank among i's neighbours in x, from 1
    np.put_along_axis(rank, np.argsort(dist, axis=1), np.arange(1, n + 1)[None, :], axis=1)
    near_z = NearestNeighbors(n_neighbors=k).fit(z).kneighbors(return_distance=False)  # (n, k)
    excess = np.take_along_axis(rank, near_z, axis=1) - k
    return 1.0 - np.clip(excess, 0, None).sum(axis=1) * (2.0 / (k * (2.0 * n - 3.0 * k - 1.0)))


def recon_mse_per_row(ff: FeatureFile, raw: RawInputs, *, seed: int = 0) -> np.ndarray | None:
    """Each test row's reconstruction MSE (rows in `ordered_test_rows` order), or None without an inverse."""
    train, test = split_mask(ff, "train"), ordered_test_rows(ff)
    if not is_learned(ff):
        if ff.meta.get("variant", ff.name) != "pca":
            return None
        x_train = raw.flat_rows(train)
        pca = make_baseline("pca", len(ff.z_columns), x_train, seed=seed)
        with single_thread():
            pca.fit(x_train)
            x = raw.flat_rows(test)
            return np.mean((pca.inverse_transform(pca.transform(x)) - x) ** 2, axis=1, dtype=np.float64)
    mdir = model_dir(ff)
    if mdir is None or not mdir.is_dir():
        if mdir is not None:
            log.warning("%s: model directory %s not found; recon_mse omitted", ff.name, mdir)
        return None
    loaded = load_model(mdir)
    x = loaded.normalizer.torch(torch.from_numpy(np.ascontiguousarray(raw.x[test])))
    x = x.reshape(len(x), *loaded.model.input_shape)  # (N, *input_shape)
    per_row = []
    with torch.inference_mode():
        for xb in x.split(pass_rows(x[0].numel())):
            per_row.append(((loaded.model.reconstruct(xb) - xb) ** 2).double().flatten(1).mean(1))
    return torch.cat(per_row).numpy()


def fit_time_s(ff: FeatureFile) -> float | None:
    """Seconds spent fitting the representation (see the module docstring for the sources)."""
    if "fit_time_s" in ff.meta:
        return float(ff.meta["fit_time_s"])
    mdir = model_dir(ff)
    if mdir is None:
        return None
    for name in ("config.json", "history.json"):
        path = mdir / name
        doc = read_json(path) if path.is_file() else None
        if isinstance(doc, dict) and isinstance(doc.get("train_time_s"), (int, float)):
            return float(doc["train_time_s"])
    return None
