"""Dimensionality-reduction quality of a representation, label-free (task `reduction`).

- `trustworthiness`: `sklearn.manifold.trustworthiness(X, Z, n_neighbors=10)` between the raw input
  (flattened, normalized with a Normalizer fitted on the feature file's train rows) and the
  representation, on at most `trustworthiness_max_rows` test rows chosen by `inputs.subsample`.
- `recon_mse`: mean squared test reconstruction error per input element, in normalized input space,
  where an inverse exists: PCA (refitted on the train rows exactly as the baseline, then
  `inverse_transform(transform(x))`) and every autoencoder (`decode(encode(x))` through the model in
  `model_dir`, in that model's own normalized space). Other baselines report none.
- `fit_time_s`: baselines: their fit time recorded in the feature file (`fit_time_s`); learned
  representations: `train_time_s` of the model directory's `config.json` (where the trainer records
  it), else of `history.json` when that is a mapping; omitted when neither has it.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch
from sklearn.manifold import trustworthiness

from ae_repr.checkpoint import load_model
from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile, read_json

from .baselines import make_baseline
from .inputs import RawInputs, is_learned, model_dir, raw_inputs, single_thread, split_mask, subsample
from .results import result_frame, result_row

log = logging.getLogger(__name__)

TRUST_NEIGHBORS = 10
_BATCH = 2048


def reduction(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Trustworthiness, reconstruction MSE and fit time of one representation."""
    raw = raw_inputs(ff)
    rows = []
    sub = subsample(ff, "test", cfg.trustworthiness_max_rows, seed)
    n_neighbors = min(TRUST_NEIGHBORS, (len(sub) - 1) // 2)  # sklearn needs n_neighbors < n / 2
    if n_neighbors >= 1:
        with single_thread():
            t = trustworthiness(raw.flat[sub], ff.z[sub], n_neighbors=n_neighbors)
        rows.append(result_row(ff.name, "reduction", "trustworthiness", t))
    mse = recon_mse(ff, raw, seed=seed)
    if mse is not None:
        rows.append(result_row(ff.name, "reduction", "recon_mse", mse))
    seconds = fit_time_s(ff)
    if seconds is not None:
        rows.append(result_row(ff.name, "reduction", "fit_time_s", seconds))
    return result_frame(rows)


def recon_mse(ff: FeatureFile, raw: RawInputs, *, seed: int = 0) -> float | None:
    """Test reconstruction MSE in normalized input space, or None when the representation has no inverse."""
    train, test = split_mask(ff, "train"), split_mask(ff, "test")
    if not is_learned(ff):
        if ff.meta.get("variant", ff.name) != "pca":
            return None
        pca = make_baseline("pca", len(ff.z_columns), raw.flat[train], seed=seed)
        with single_thread():
            pca.fit(raw.flat[train])
            x = raw.flat[test]
            return float(np.mean((pca.inverse_transform(pca.transform(x)) - x) ** 2))
    mdir = model_dir(ff)
    if mdir is None or not mdir.is_dir():
        if mdir is not None:
            log.warning("%s: model directory %s not found; recon_mse omitted", ff.name, mdir)
        return None
    loaded = load_model(mdir)
    x = loaded.normalizer.torch(torch.from_numpy(np.ascontiguousarray(raw.x[test])))
    x = x.reshape(len(x), *loaded.model.input_shape)  # (N, *input_shape)
    total = 0.0
    with torch.inference_mode():
        for xb in x.split(_BATCH):
            total += float(((loaded.model.reconstruct(xb) - xb) ** 2).double().sum())
    return total / x.numel()


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
