"""The in-memory data set every stage works on, its deterministic split, and train-fitted normalization."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import DataError


@dataclass(frozen=True)
class Dataset:
    """Raw samples (images kept in their storage dtype, e.g. uint8) with ids, split and optional labels."""

    name: str  # the --dataset spec it was loaded from
    x: np.ndarray  # (N, D) tabular or (N, C, H, W) images, raw dtype
    split: np.ndarray  # (N,) str: "train" | "test"
    sample_id: np.ndarray  # (N,) int64
    sha256: str  # of the raw content (x, labels, split, sample_id), stable across runs: see content_sha256
    labels: np.ndarray | None = None  # (N,) int64
    factors: np.ndarray | None = None  # (N, F) ground-truth generative factors (dsprites)
    factor_names: tuple[str, ...] = field(default=())
    label_names: tuple[str, ...] | None = None  # class names when the labels were names: code i is label_names[i]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def train_idx(self) -> np.ndarray:
        return np.flatnonzero(self.split == "train")

    @property
    def test_idx(self) -> np.ndarray:
        return np.flatnonzero(self.split == "test")

    def __len__(self) -> int:
        return len(self.x)


def content_sha256(
    x: np.ndarray,
    labels: np.ndarray | None,
    split: np.ndarray,
    sample_id: np.ndarray | None = None,
    label_names: tuple[str, ...] | None = None,
) -> str:
    """Hex sha256 of a data set's content, independent of memory layout, byte order, machine and spec string.

    Hashed in order: a version tag; x's dtype (little-endian code) and shape, then its bytes in C order
    and little-endian; the labels as int64 (or a "none" marker); the split as one byte per row
    (1 = test); the sample ids as int64 (or "none", meaning 0..N-1); class names, when the labels had names.
    """
    h = hashlib.sha256(b"ae_repr.dataset.v1\n")

    def array(tag: str, a: np.ndarray | None, dtype: np.dtype | None = None) -> None:
        if a is None:
            h.update(f"{tag} none\n".encode())
            return
        a = np.asarray(a)
        dt = (np.dtype(dtype) if dtype is not None else a.dtype).newbyteorder("<")
        h.update(f"{tag} {dt.str} {tuple(a.shape)}\n".encode())
        h.update(np.ascontiguousarray(a, dtype=dt).reshape(-1).view(np.uint8))

    array("x", x)
    array("labels", labels, np.int64)
    array("split", np.asarray(split) == "test", np.uint8)
    if sample_id is not None and np.array_equal(sample_id, np.arange(len(x))):
        sample_id = None  # the default ids are implied by the row order
    array("sample_id", sample_id, np.int64)
    if label_names is not None:  # absent for numeric labels, so their digests stay what they were
        h.update(("label_names " + "\x1f".join(label_names) + "\n").encode())
    return h.hexdigest()


def make_dataset(
    name: str,
    x: np.ndarray,
    split: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    sample_id: np.ndarray | None = None,
    factors: np.ndarray | None = None,
    factor_names: tuple[str, ...] = (),
    label_names: tuple[str, ...] | None = None,
) -> Dataset:
    """Build a Dataset with default sample ids (0..N-1) and its content hash."""
    sample_id = np.arange(len(x), dtype=np.int64) if sample_id is None else np.asarray(sample_id, dtype=np.int64)
    split = np.asarray(split).astype(str)
    labels = None if labels is None else np.asarray(labels, dtype=np.int64)
    for what, a in (("split", split), ("sample_id", sample_id), ("labels", labels), ("factors", factors)):
        assert a is None or len(a) == len(x), f"{what} has {len(a)} rows, x has {len(x)}"
    digest = content_sha256(x, labels, split, sample_id, label_names)
    return Dataset(name, x, split, sample_id, digest, labels, factors, tuple(factor_names), label_names)


def stratified_split(n: int, labels: np.ndarray | None, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Deterministic train/test assignment, stratified by label when labels exist."""
    if labels is not None and len(np.unique(labels)) > 1 and np.unique(labels, return_counts=True)[1].max() < 2:
        raise DataError(
            f"each of the {len(np.unique(labels))} classes has a single row: a stratified split has nothing to "
            "test on; give at least 2 rows per class, or a 'split' column"
        )
    rng = np.random.default_rng(seed)
    split = np.full(n, "train", dtype=object)
    groups = [np.arange(n)] if labels is None else [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for idx in groups:
        idx = rng.permutation(idx)
        n_test = int(round(len(idx) * test_fraction))
        split[idx[:n_test]] = "test"
    if (split == "test").sum() == 0 or (split == "train").sum() < 2:
        raise DataError(f"too few rows to split ({n}): need at least 2 for training and 1 for testing")
    return split.astype(str)


@dataclass(frozen=True)
class Normalizer:
    """x -> (x - shift) * scale, fitted on the train split; scalar for images, per-feature for tables."""

    shift: np.ndarray
    scale: np.ndarray
    kind: str  # "minmax" (images: global min/max to [0, 1]) | "standard" (tables: per-feature z-score)

    @classmethod
    def fit(cls, x_train: np.ndarray) -> Normalizer:
        """Fit on training rows: images are scaled to [0, 1]; tabular features are standardized."""
        if x_train.ndim == 4:
            # min and max are exact in the raw dtype: no float64 copy (8x a uint8 image set's size)
            lo, hi = float(x_train.min()), float(x_train.max())
            return cls(np.array(lo), np.array(1.0 / (hi - lo) if hi > lo else 1.0), "minmax")
        x = x_train.astype(np.float64, copy=False)
        mean, std = x.mean(axis=0), x.std(axis=0)
        return cls(mean, np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 1.0), "standard")

    @property
    def bounded(self) -> bool:
        """True when normalized training data lies in [0, 1] (a Bernoulli likelihood applies)."""
        return self.kind == "minmax"

    def log_abs_det(self, dim: int) -> float:
        """log |d normalized / d raw| of one sample of `dim` elements: what turns a density of normalized data
        into a density in the data's own units (log p(x) = log p(normalize(x)) + this)."""
        log_scale = np.log(np.abs(np.asarray(self.scale, dtype=np.float64)))
        return float(log_scale.sum() * (dim if log_scale.ndim == 0 else 1))  # a scalar scale applies to every element

    def torch(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize a raw batch on its device as float32."""
        shift = torch.as_tensor(self.shift, dtype=torch.float32, device=x.device)
        scale = torch.as_tensor(self.scale, dtype=torch.float32, device=x.device)
        return (x.float() - shift).mul_(scale)  # in place on the difference: one float copy of the batch, not two

    def numpy(self, x: np.ndarray) -> np.ndarray:
        """Normalize a raw array as float32 (one float32 copy of `x`, normalized in place: no temporaries of its size)."""
        out = x.astype(np.float32)
        out -= self.shift.astype(np.float32)
        out *= self.scale.astype(np.float32)
        return out

    def to_dict(self) -> dict:
        return {"kind": self.kind, "shift": np.asarray(self.shift).tolist(), "scale": np.asarray(self.scale).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> Normalizer:
        return cls(np.asarray(d["shift"], dtype=np.float64), np.asarray(d["scale"], dtype=np.float64), d["kind"])


def n_features(shape: tuple[int, ...]) -> int:
    """Number of scalar inputs of a sample shape."""
    return math.prod(shape)
