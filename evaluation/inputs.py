"""Reading and validating feature files, and recovering the raw inputs behind them from their data set."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import pandas as pd
import torch
from threadpoolctl import OpenBLASController, ThreadpoolController

from ae_repr.data import Dataset, Normalizer, data_changed, load_dataset
from ae_repr.errors import UserError
from ae_repr.io import FeatureFile, read_features

log = logging.getLogger(__name__)
T = TypeVar("T")

REQUIRED_COLUMNS = ("sample_id", "split")  # `label` may be absent: the label tasks are then skipped
BASELINE_NAMES = ("raw", "pca", "ica", "random_projection")


# input elements through a model in one forward pass: bounds the activations' memory (about 100 MB per layer
# for the conv backbone), whatever the input size; measured peak of one 64x64 evaluation 3.0 -> 1.2 GB
PASS_ELEMENTS = 1 << 21


def pass_rows(input_dim: int, draws: int = 1) -> int:
    """Rows per forward pass when each row of `input_dim` elements goes through the model `draws` times."""
    return max(1, PASS_ELEMENTS // (input_dim * draws))


@contextmanager
def single_thread() -> Iterator[None]:
    """One BLAS/OpenMP thread for scikit-learn work on small data.

    Two threads made lbfgs fits ~10x slower on a 2-core machine, and t-SNE's OpenMP barriers stalled
    for tens of seconds whenever other processes shared the cores; one thread is as fast when idle.
    Torch's own OpenMP runtime is left alone: the limit is process-wide, and torch work in another
    thread (a fine-tune arm, a training task) would otherwise switch thread counts mid-run and sum
    in a different order, so its results would depend on timing. For the same reason the limit holds
    until the last thread inside leaves: restored when the first left, it gave the ones still inside two
    BLAS threads, and FastICA's components differ by up to 8.0 between one and two (dSprites), so the
    ica baseline's scores changed from run to run.

    threadpoolctl lets only the thread that last changed OpenBLAS's limit change it while that thread lives;
    the limits here are set and undone under one lock, by whichever thread comes first or leaves last, so
    control is released around each change: otherwise an undo from another thread while the first one still
    lived did nothing, and OpenBLAS stayed at one thread for the rest of the process.
    """
    global _single_inside
    with _SINGLE_LOCK, _openblas_released():
        controller = ThreadpoolController()  # the libraries loaded now (cheap: no thread start)
        others = [lib.filepath for lib in controller.lib_controllers
                  if f"{os.sep}torch{os.sep}" not in lib.filepath and lib.num_threads != 1]
        if others:  # libraries loaded since the first thread came in get limited too
            _single_limits.append(controller.select(filepath=others).limit(limits=1))
        _single_inside += 1
    try:
        yield
    finally:
        with _SINGLE_LOCK, _openblas_released():
            _single_inside -= 1
            while not _single_inside and _single_limits:
                _single_limits.pop().restore_original_limits()


@contextmanager
def _openblas_released() -> Iterator[None]:
    """Any thread may change OpenBLAS's limit inside, and any other after (threadpoolctl's control released)."""
    OpenBLASController.clear_controlling_thread(force=True)
    try:
        yield
    finally:
        OpenBLASController.clear_controlling_thread(force=True)


_SINGLE_LOCK = threading.Lock()
_single_inside = 0  # threads inside `single_thread`
_single_limits: list = []  # the limits they set, undone newest first when the last one leaves


def check_feature_file(ff: FeatureFile) -> FeatureFile:
    """Raise UserError (one line) unless `ff` follows the feature-file contract."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ff.frame.columns]
    if missing:
        raise UserError(f"{ff.path}: missing required column(s) {', '.join(missing)}")
    if "label" not in ff.frame.columns:  # unlabelled data: an all-null label column, as the contract writes it
        ff.frame["label"] = pd.array([pd.NA] * len(ff.frame), dtype="Int64")
    z = ff.z_columns
    if not z:
        raise UserError(f"{ff.path}: no latent columns z_000 .. z_K-1")
    expected = [f"z_{i:03d}" for i in range(len(z))]
    if z != expected:
        raise UserError(
            f"{ff.path}: latent columns must be {expected[0]} .. {expected[-1]} in order, got {z[:3]}..."
        )
    if ff.frame["sample_id"].isna().any() or ff.frame["sample_id"].duplicated().any():
        raise UserError(f"{ff.path}: sample_id must be unique and non-null")
    bad = ~ff.frame["split"].isin(["train", "test"])
    if bad.any():
        raise UserError(
            f"{ff.path}: split has value {ff.frame['split'][bad].iloc[0]!r}; expected 'train' or 'test'"
        )
    for name in ("train", "test"):
        if not (ff.frame["split"] == name).any():
            raise UserError(f"{ff.path}: no {name!r} rows")
    if not np.isfinite(ff.z).all():
        raise UserError(f"{ff.path}: latent columns contain NaN/Inf")
    return ff


def load_feature_file(path: str | os.PathLike[str]) -> FeatureFile:
    """Read and validate one feature file; UserError when it is missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such feature file")
    try:
        ff = read_features(path)
    except (OSError, ValueError) as e:  # pyarrow errors subclass these
        raise UserError(
            f"{path}: cannot read feature Parquet ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return check_feature_file(ff)


def feature_paths(features_dir: str | os.PathLike[str]) -> list[Path]:
    """The feature files in a folder, sorted; UserError when the folder is missing or has none."""
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise UserError(f"{features_dir}: features folder not found")
    paths = sorted(features_dir.glob("*.parquet"))
    if not paths:
        raise UserError(f"{features_dir}: no feature files (*.parquet)")
    return paths


def is_learned(ff: FeatureFile) -> bool:
    """A learned representation (an encoder's output) rather than a baseline."""
    return "model_dir" in ff.meta or ff.meta.get("variant", ff.name) not in BASELINE_NAMES


def load_feature_dir(
    features_dir: str | os.PathLike[str], *, learned_only: bool = False
) -> list[FeatureFile]:
    """Read and cross-validate the feature files of a folder (same sample ids and splits; learned widths equal)."""
    files = [load_feature_file(p) for p in feature_paths(features_dir)]
    if learned_only:
        files = [f for f in files if is_learned(f)]
        if not files:
            raise UserError(
                f"{features_dir}: no learned feature files (only baselines {', '.join(BASELINE_NAMES)})"
            )
    ref = files[0]
    ref_rows = ref.frame.set_index("sample_id")["split"].sort_index()
    for ff in files[1:]:
        rows = ff.frame.set_index("sample_id")["split"].sort_index()
        if not rows.index.equals(ref_rows.index):
            raise UserError(
                f"{ff.path}: sample_id set differs from {ref.path.name} ({len(rows)} vs {len(ref_rows)} rows); "
                "all feature files must come from the same data"
            )
        if not (rows == ref_rows).all():
            raise UserError(f"{ff.path}: train/test split differs from {ref.path.name}")
    widths = {ff.name: len(ff.z_columns) for ff in files if is_learned(ff)}
    if len(set(widths.values())) > 1:
        desc = ", ".join(f"{n}={w}" for n, w in widths.items())
        raise UserError(f"{features_dir}: learned feature files disagree on latent width ({desc})")
    return files


def model_dir(ff: FeatureFile) -> Path | None:
    """The model directory a learned feature file points at (its `model_dir` is relative to the file's folder)."""
    rel = ff.meta.get("model_dir")
    return None if not rel else (ff.path.parent / rel).resolve()


@functools.lru_cache(maxsize=2)
def _dataset(spec: str, sha256: str | None = None) -> Dataset:
    # keyed by the checksum the feature file recorded too: a data file changed since an earlier load is read again
    return load_dataset(spec)


class RawInputs:
    """The raw samples behind a feature file's rows (same order) and their normalization, fitted on its train
    rows. The normalization and the normalized copy are computed when first asked for: a task that needs only
    the samples, or the normalized form of a few rows, never holds a float32 copy of the whole data set."""

    def __init__(self, x: np.ndarray, train: np.ndarray) -> None:
        self.x = x  # (N, *shape) raw dtype, aligned with the feature file's rows
        self._train = train  # boolean mask of the train rows

    @functools.cached_property
    def normalizer(self) -> Normalizer:
        """Fitted on the feature file's train rows."""
        return Normalizer.fit(self.x[self._train])

    def flat_rows(self, rows: np.ndarray | slice) -> np.ndarray:
        """Rows `rows`, flattened and normalized with `normalizer`: (len(rows), D) float32."""
        return self.normalizer.numpy(self.x[rows]).reshape(-1, int(np.prod(self.x.shape[1:])))

    @functools.cached_property
    def flat(self) -> np.ndarray:
        """Every row, flattened and normalized: (N, D) float32."""
        return self.flat_rows(slice(None))


def dataset_of(ff: FeatureFile) -> tuple[Dataset, np.ndarray]:
    """The data set named in `ff`'s metadata and the positions of `ff`'s rows in it (by sample_id)."""
    spec = ff.meta.get("dataset")
    if not spec:
        raise UserError(f"{ff.path}: metadata has no 'dataset'; cannot recover the raw inputs")
    ds = _dataset(spec, ff.meta.get("dataset_sha256"))
    if ff.meta.get("dataset_sha256") and ff.meta["dataset_sha256"] != ds.sha256:
        # the features encode another version of the data than the raw inputs read now: never mix the two
        raise data_changed(spec, ff.meta["dataset_sha256"], ds.sha256)
    pos = pd.Index(ds.sample_id).get_indexer(ff.frame["sample_id"].to_numpy())
    if (pos < 0).any():
        raise UserError(f"{ff.path}: {int((pos < 0).sum())} sample_ids are not in data set {spec!r}")
    return ds, pos


def raw_inputs(ff: FeatureFile) -> RawInputs:
    """Load the data set named in `ff`'s metadata and align it to `ff`'s rows by sample_id."""
    ds, pos = dataset_of(ff)
    return RawInputs(ds.x[pos], (ff.frame["split"] == "train").to_numpy())


def split_mask(ff: FeatureFile, split: str) -> np.ndarray:
    """Boolean mask of a split's rows, in file order."""
    return (ff.frame["split"] == split).to_numpy()


def labels(ff: FeatureFile) -> np.ndarray:
    """Labels as int64 (only call when `ff.has_labels`)."""
    return ff.frame["label"].to_numpy(dtype=np.int64)


def subsample(ff: FeatureFile, split: str, max_rows: int, seed: int) -> np.ndarray:
    """Row positions of at most `max_rows` rows of a split, chosen by sample_id so every file gets the same ones."""
    rows = np.flatnonzero(split_mask(ff, split))
    rows = rows[np.argsort(ff.frame["sample_id"].to_numpy()[rows], kind="stable")]
    if len(rows) > max_rows:
        rows = rows[np.sort(np.random.default_rng(seed).choice(len(rows), max_rows, replace=False))]
    return rows


def label_problem(ff: FeatureFile) -> str | None:
    """Why the label tasks cannot run on `ff` (no labels, a single class), or None when they can."""
    if not ff.has_labels:
        return "the feature file has no labels (label column empty or incomplete)"
    n_classes = ff.frame.loc[split_mask(ff, "train"), "label"].nunique()
    if n_classes < 2:
        return f"the train split has {n_classes} class(es); classification needs at least 2"
    return None


class SharedResults(Generic[T]):
    """Results computed once per key in this process; a caller asking for a key that another
    thread is computing waits for that result (a failed computation is retried by the next caller)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._results: dict[str, Future[T]] = {}

    def get(self, key: str, compute: Callable[[], T]) -> T:
        """The result for `key`: stored, awaited from the thread computing it, or computed here by `compute`."""
        while True:
            with self._lock:
                future = self._results.get(key)
                owner = future is None
                if owner:
                    future = self._results[key] = Future()
            if owner:
                break
            try:
                return future.result()
            except BaseException:
                if not future.done():  # interrupted while waiting
                    raise
        try:
            result = compute()
        except BaseException as e:
            with self._lock:
                del self._results[key]
            future.set_exception(e)
            raise
        future.set_result(result)
        return result

    def clear(self) -> None:
        """Forget every stored result."""
        with self._lock:
            self._results.clear()


def digest(*arrays: torch.Tensor | np.ndarray) -> bytes:
    """A hash of the arrays' dtypes, shapes and values."""
    h = hashlib.blake2b(digest_size=20)
    for a in arrays:
        a = np.ascontiguousarray(a.numpy() if isinstance(a, torch.Tensor) else a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1))
    return h.digest()
