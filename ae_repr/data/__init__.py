"""Data sets by name (`--dataset`): digits, dsprites[:N], idx:DIR, or a .parquet/.csv/.npy/.npz file."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .dataset import Dataset, Normalizer, content_sha256, make_dataset, n_features, stratified_split
from .dsprites import FACTOR_NAMES as DSPRITES_FACTOR_NAMES
from .dsprites import GRID_SIZE as DSPRITES_GRID_SIZE
from .dsprites import factor_values, generate_dsprites
from .idx import find_idx_pairs, read_idx
from .tabular import file_kind, load_file

__all__ = [
    "DATASET_FORMS",
    "Dataset",
    "DatasetSpec",
    "Normalizer",
    "content_sha256",
    "factor_values",
    "generate_dsprites",
    "load_dataset",
    "make_dataset",
    "n_features",
    "parse_dataset_spec",
    "stratified_split",
]

log = logging.getLogger(__name__)

DATASET_FORMS = "digits, dsprites, dsprites:N, idx:DIR, or a path to a .parquet, .csv, .npy or .npz file"
DSPRITES_DEFAULT_N = 20_000
DSPRITES_SEED = 0  # generation seed: fixed, so `dsprites:N` names one data set whatever the split seed


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed --dataset value: kind is "digits" | "dsprites" | "idx" | "file"."""

    kind: str
    n: int | None = None  # dsprites: number of images
    path: Path | None = None  # idx: folder; file: data file


def parse_dataset_spec(spec: str) -> DatasetSpec:
    """Parse a --dataset value; DataError listing the accepted forms when it matches none."""
    s = str(spec).strip()
    head, sep, arg = s.partition(":")
    name = head.lower()
    if name == "digits" and not sep:
        return DatasetSpec("digits")
    if name == "dsprites":
        if not sep:
            return DatasetSpec("dsprites", n=DSPRITES_DEFAULT_N)
        try:
            n = int(arg)
        except ValueError:
            n = None
        if n is None or not 1 <= n <= DSPRITES_GRID_SIZE:
            raise DataError(
                f"bad data set {s!r}: dsprites:N needs a whole number of images N between 1 and "
                f"{DSPRITES_GRID_SIZE} (the size of the factor grid)"
            )
        return DatasetSpec("dsprites", n=n)
    if name == "idx" and sep:
        if not arg:
            raise DataError(f"bad data set {s!r}: idx:DIR needs a folder")
        return DatasetSpec("idx", path=Path(arg).expanduser())
    if s and file_kind(s) is not None:
        return DatasetSpec("file", path=Path(s).expanduser())
    if s and Path(s).expanduser().exists():
        raise DataError(f"{s}: unsupported data file type; expected {DATASET_FORMS}")
    raise DataError(f"unknown data set {s!r}; expected {DATASET_FORMS}")


def load_dataset(spec: str, *, test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Load a data set by its --dataset spec; a split column in the data wins, else a stratified split by seed."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    parsed = parse_dataset_spec(spec)
    name = str(spec).strip()

    def split_for(labels: np.ndarray | None, n: int, source: str) -> np.ndarray:
        try:
            return stratified_split(n, labels, test_fraction, seed)
        except DataError as e:
            raise DataError(f"{source}: {e}") from None

    if parsed.kind == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = bunch.images.astype(np.uint8)[:, None]  # (N, 1, 8, 8), values 0..16
        labels = bunch.target.astype(np.int64)
        ds = make_dataset(name, x, split_for(labels, len(x), name), labels=labels)
    elif parsed.kind == "dsprites":
        x, factors = generate_dsprites(parsed.n, seed=DSPRITES_SEED)
        labels = factors[:, 0].copy()  # shape index
        ds = make_dataset(
            name,
            x,
            split_for(labels, len(x), name),
            labels=labels,
            factors=factors,
            factor_names=DSPRITES_FACTOR_NAMES,
        )
    elif parsed.kind == "idx":
        ds = _load_idx(name, parsed.path, split_for)
    else:
        raw = load_file(parsed.path)
        split = raw.split if raw.split is not None else split_for(raw.labels, len(raw.x), str(parsed.path))
        ds = make_dataset(name, raw.x, split, labels=raw.labels, sample_id=raw.sample_id, label_names=raw.label_names)
    if ds.labels is not None and len(np.unique(ds.labels)) < 2:
        raise DataError(
            f"{name}: every row has the same label ({ds.labels[0]}); the probes need at least 2 classes "
            "(drop the label column to train and evaluate without labels)"
        )
    log.info(
        "data set %s: %d samples of shape %s (%s), %d train / %d test, %s labels, sha256 %s",
        name, len(ds), ds.shape, ds.x.dtype, len(ds.train_idx), len(ds.test_idx),
        "with" if ds.labels is not None else "no", ds.sha256[:12],
    )  # fmt: skip
    return ds


def _load_idx(name: str, directory: Path, split_for) -> Dataset:
    """Images (and labels) from IDX files; train-*/t10k-* pairs give the split, else it is made."""
    pairs = find_idx_pairs(directory)
    xs, ys, splits = [], [], []
    for role, pair in pairs.items():
        x = read_idx(pair.images.path)[:, None]  # (N, 1, H, W)
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise DataError(f"{pair.images.path}: contains NaN/Inf values")
        xs.append(x)
        ys.append(None if pair.labels is None else read_idx(pair.labels.path).astype(np.int64))
        splits.append(role)
    if len(xs) == 2:
        (tr, te), (ytr, yte) = xs, ys
        if tr.shape[1:] != te.shape[1:] or tr.dtype != te.dtype:
            raise DataError(
                f"{directory}: train images are {tr.shape[2:]} {tr.dtype} but test images are {te.shape[2:]} {te.dtype}"
            )
        if (ytr is None) != (yte is None):
            raise DataError(f"{directory}: labels found for only one of the train and test images")
        x = np.concatenate([tr, te])
        labels = None if ytr is None else np.concatenate([ytr, yte])
        split = np.array(["train"] * len(tr) + ["test"] * len(te))
    else:
        x, labels = xs[0], ys[0]
        split = split_for(labels, len(x), str(directory))
    return make_dataset(name, x, split, labels=labels)
