"""Data sets by name (`--dataset`): digits, dsprites[:N], idx:DIR, or a .parquet/.csv/.npy/.npz file."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from ..errors import ConfigError, DataChanged, DataError
from .dataset import Dataset, Normalizer, content_sha256, make_dataset, n_features, stratified_split
from .dsprites import FACTOR_NAMES as DSPRITES_FACTOR_NAMES
from .dsprites import GRID_SIZE as DSPRITES_GRID_SIZE
from .dsprites import IMAGE_SIZE as DSPRITES_IMAGE_SIZE
from .dsprites import factor_values, generate_dsprites
from .idx import find_idx_pairs, read_idx
from .tabular import FileShape, file_kind, load_file, peek_file

__all__ = [
    "DATASET_FORMS",
    "Dataset",
    "DatasetSpec",
    "FileShape",
    "Normalizer",
    "content_sha256",
    "data_changed",
    "factor_values",
    "generate_dsprites",
    "load_dataset",
    "make_dataset",
    "n_features",
    "parse_dataset_spec",
    "peek_dataset",
    "source_files",
    "stratified_split",
]

log = logging.getLogger(__name__)

DATASET_FORMS = "digits, dsprites, dsprites:N, idx:DIR, or a path to a .parquet, .csv, .npy or .npz file"
DSPRITES_DEFAULT_N = 20_000
DSPRITES_SEED = 0  # generation seed: fixed, so `dsprites:N` names one data set whatever the split seed
T = TypeVar("T")
DIGITS_ROWS = 1797  # scikit-learn's bundled digits: 1797 images of 8x8, values 0..16


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
        ds = _read_whole(parsed.path, lambda: _load_idx(name, parsed.path, split_for))
    else:
        raw = _read_whole(parsed.path, lambda: load_file(parsed.path))
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


def source_files(spec: str) -> list[Path]:
    """The files a data set spec reads (none for the built-in data sets; an IDX folder's files)."""
    path = parse_dataset_spec(spec).path
    if path is None:
        return []
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _file_states(path: Path) -> dict[str, tuple[int, int]]:
    """Size and modification time (ns) of a file, or of each file in a folder."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    out = {}
    for f in files:
        try:
            st = f.stat()
        except OSError:  # gone: the load says so
            continue
        out[str(f)] = (st.st_size, st.st_mtime_ns)
    return out


def _read_whole(path: Path, read: Callable[[], T]) -> T:
    """`read()`, refused when the file(s) at `path` changed while it ran (a file still being written or copied):
    what was read may be half of one version and half of another."""
    before = _file_states(path) if path.exists() else {}
    try:
        result = read()
    except DataError:
        after = _file_states(path) if path.exists() else {}
        if after != before:  # a torn read explains the error better than the error does
            raise _changed_while_read(path, before, after) from None
        raise
    after = _file_states(path) if path.exists() else {}
    if after != before:
        raise _changed_while_read(path, before, after)
    return result


def _changed_while_read(path: Path, before: dict, after: dict) -> DataError:
    changed = sorted(set(before) ^ set(after) | {f for f in before.keys() & after.keys() if before[f] != after[f]})
    f = changed[0]
    sizes = f"{before[f][0] if f in before else 'absent'} -> {after[f][0] if f in after else 'absent'} bytes"
    return DataError(f"{f}: changed while it was being read ({sizes}); it is still being written or copied: "
                     "re-run when it is complete")


def data_changed(spec: str, at_start: str, now: str) -> DataChanged:
    """The error of a run whose data set no longer has the content it started with (`now`: a digest or why
    there is none)."""
    path = parse_dataset_spec(spec).path
    return DataChanged(f"{path if path is not None else spec} changed during the run (sha256 {at_start[:12]} at "
                       f"start, {now[:12] if len(now) == 64 else now} now); re-run when it is no longer being written")


def peek_dataset(spec: str) -> FileShape | None:
    """Rows and sample shape of a data set from its headers alone, before its content is read (None: unknown
    before loading, e.g. a CSV file; or a spec the load will refuse)."""
    try:
        parsed = parse_dataset_spec(spec)
        if parsed.kind == "digits":
            return FileShape(DIGITS_ROWS, (1, 8, 8), 1, True)
        if parsed.kind == "dsprites":
            return FileShape(parsed.n, (1, DSPRITES_IMAGE_SIZE, DSPRITES_IMAGE_SIZE), 1, True)
        if parsed.kind == "idx":
            pairs = find_idx_pairs(parsed.path)
            head = next(iter(pairs.values())).images
            return FileShape(sum(p.images.dims[0] for p in pairs.values()), (1, *head.dims[1:]),
                             head.dtype.itemsize, all(p.labels is not None for p in pairs.values()))
        return peek_file(parsed.path)
    except (DataError, OSError):
        return None


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
