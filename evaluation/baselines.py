"""Baseline representations written as feature files beside the learned ones.

`raw` is every input feature, flattened and normalized with a Normalizer fitted on the train rows;
`pca`, `ica` (FastICA) and `random_projection` (Gaussian) map that normalized input to the learned
latent width K, fitted on train rows only. Rows, sample ids, split and labels are copied from the
learned feature files (the split comes from them, not from the data set), so every representation is
evaluated on exactly the same rows. Each file records its fit time in the metadata key `fit_time_s`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.base import TransformerMixin
from sklearn.decomposition import PCA, FastICA
from sklearn.exceptions import ConvergenceWarning
from sklearn.pipeline import make_pipeline
from sklearn.random_projection import GaussianRandomProjection

from ae_repr.config import EvalConfig
from ae_repr.errors import UserError
from ae_repr.io import FeatureFile, write_features

from .inputs import BASELINE_NAMES, load_feature_dir, load_feature_file, raw_inputs, single_thread, split_mask

log = logging.getLogger(__name__)


def make_baseline(name: str, k: int, x_train: np.ndarray, *, seed: int = 0) -> TransformerMixin | None:
    """The unfitted scikit-learn transformer for a baseline (None for `raw`, the identity)."""
    if name == "raw":
        return None
    if name == "random_projection":
        return GaussianRandomProjection(n_components=k, random_state=seed)
    width = min(k, *x_train.shape)  # PCA/ICA cannot exceed the rank bound
    if width < k:
        log.warning("baseline %s: latent width %d exceeds min(train rows, inputs); using %d", name, k, width)
    # scikit-learn's "auto" solver: exact for small inputs (digits), randomized for wide ones (64x64 images),
    # where the full SVD takes ~50x longer for the same components
    pca = PCA(n_components=width, svd_solver="auto", random_state=seed)
    if name == "pca":
        return pca
    if name == "ica":
        # ICA on the PCA projection: the same components as FastICA's own whitening (checked on digits), but
        # FastICA alone turns NaN on inputs with constant pixels (the empty border of every dSprites image)
        return make_pipeline(pca, FastICA(n_components=width, whiten="unit-variance", max_iter=1000, random_state=seed))
    raise UserError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")


def fit_baseline(name: str, k: int, x: np.ndarray, train: np.ndarray, *, seed: int = 0) -> np.ndarray:
    """Fit a baseline on the train rows of normalized inputs `x` (N, D) and transform every row."""
    model = make_baseline(name, k, x[train], seed=seed)
    if model is None:
        return x
    with single_thread(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x[train])
        z = model.transform(x)
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            log.warning("baseline %s: %s", name, w.message)
    return z


def write_baselines(
    features_dir: Path, cfg: EvalConfig, *, seed: int = 0, reference: Path | None = None
) -> list[Path]:
    """Write `features_dir/<baseline>.parquet` for each of `cfg.baselines`, matched to a learned file:
    `reference` (a run's own file: the folder may still hold an earlier run's, of another width), else
    the first of the folder's learned files, which must then agree on rows, split and width."""
    for name in cfg.baselines:
        if name not in BASELINE_NAMES:
            raise UserError(
                f"unknown baseline {name!r} in eval.baselines; choose from {', '.join(BASELINE_NAMES)}"
            )
    ref = load_feature_file(reference) if reference is not None else load_feature_dir(features_dir, learned_only=True)[0]
    k = len(ref.z_columns)
    raw = raw_inputs(ref)
    train = split_mask(ref, "train")
    paths = []
    for name in cfg.baselines:
        start = time.perf_counter()
        z = fit_baseline(name, k, raw.flat, train, seed=seed)
        fit_time = time.perf_counter() - start
        paths.append(_write(Path(features_dir) / f"{name}.parquet", name, z, ref, fit_time, seed))
        log.info("baseline %s: %d features, fitted in %.2fs", name, z.shape[1], fit_time)
    return paths


def _write(path: Path, name: str, z: np.ndarray, ref: FeatureFile, fit_time: float, seed: int) -> Path:
    labels = ref.frame["label"]
    if labels.isna().any() and labels.notna().any():
        log.warning("%s: some labels missing; baseline %s is written without labels", ref.path.name, name)
    setup = {"baseline": name, "latent_dim": int(z.shape[1]), "seed": seed}
    return write_features(
        path,
        sample_id=ref.frame["sample_id"].to_numpy(),
        split=ref.frame["split"].to_numpy(),
        label=labels.to_numpy(dtype=np.int64) if labels.notna().all() else None,
        z=z,
        metadata={
            "variant": name,
            "latent_dim": int(z.shape[1]),
            "dataset": ref.meta.get("dataset"),
            "dataset_sha256": ref.meta.get("dataset_sha256"),
            "config_sha256": hashlib.sha256(json.dumps(setup, sort_keys=True).encode()).hexdigest(),
            "fit_time_s": f"{fit_time:.6f}",
        },
    )


__all__ = ["fit_baseline", "make_baseline", "write_baselines"]
