"""User data files (.parquet, .csv, .npy, .npz) read into arrays and validated, with one-line DataErrors.

Tables: every numeric column is a feature, except the reserved columns `label` (integer class, or
class names: stored as int64 codes in sorted name order, the names kept), `split` ("train" | "test")
and `sample_id` (unique integers). Column names must be unique. Arrays: .npy holds the features alone,
2-D (N, D) as a table, 3-D (N, H, W) or 4-D (N, C, H, W) as images; .npz holds the features under
`x` (or `X`, `data`, `features`) and optionally `y` (or `label`, `labels`), `split` and `sample_id`.
Pickled content is never loaded.
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import DataError

log = logging.getLogger(__name__)

LABEL, SPLIT, SAMPLE_ID = "label", "split", "sample_id"
RESERVED = (LABEL, SPLIT, SAMPLE_ID)
NPZ_X_KEYS = ("x", "X", "data", "features")
NPZ_Y_KEYS = ("y", "label", "labels")
SUFFIXES = (".parquet", ".csv", ".csv.gz", ".npy", ".npz")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_ARROW_NUMERIC = frozenset(range(1, 13))  # pyarrow type ids of bool, int8 .. uint64, float16 .. double


@dataclass(frozen=True)
class RawData:
    """Validated arrays from a file; split/sample_id are None when the file has none."""

    x: np.ndarray  # (N, D) or (N, C, H, W)
    labels: np.ndarray | None  # (N,) int64
    split: np.ndarray | None  # (N,) str "train" | "test"
    sample_id: np.ndarray | None  # (N,) int64, unique
    label_names: tuple[str, ...] | None = None  # class names of string labels: code i is label_names[i]


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """The loader a path's suffix selects ("parquet", "csv", "npy", "npz"), or None."""
    name = Path(path).name.lower()
    return next((s.split(".")[1] for s in SUFFIXES if name.endswith(s)), None)


def load_file(path: str | os.PathLike[str]) -> RawData:
    """Read and validate a .parquet, .csv, .npy or .npz data file."""
    path = Path(path).expanduser()
    kind = file_kind(path)
    if kind is None:
        raise DataError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)}")
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    if path.stat().st_size == 0:  # a file just created by a writer that has not written yet looks like this
        what = {"csv": "CSV", "parquet": "Parquet"}.get(kind, f".{kind}")
        raise DataError(f"{path}: empty {what} file (0 bytes); if it is still being written or copied, re-run when "
                        "it is complete")
    if kind in ("parquet", "csv"):
        return _from_frame(path, _read_parquet(path) if kind == "parquet" else _read_csv(path))
    return _read_npy(path) if kind == "npy" else _read_npz(path)


@dataclass(frozen=True)
class FileShape:
    """What a data file's header says, before its content is read: rows, sample shape, bytes per value, labels."""

    n: int
    shape: tuple[int, ...]  # (D,) or (C, H, W)
    itemsize: int
    labels: bool


def peek_file(path: str | os.PathLike[str]) -> FileShape | None:
    """The file's size from its header alone (.npy, .npz, .parquet); None for a CSV or a file it cannot tell.

    The load reports what is wrong with a file; this only lets a run be sized before the content is read.
    """
    path = Path(path).expanduser()
    try:
        if file_kind(path) == "npy":
            with open(path, "rb") as f:
                return _array_shape(f, labels=False)
        if file_kind(path) == "npz":
            with zipfile.ZipFile(path) as z:
                names = {Path(n).stem: n for n in z.namelist()}
                x_key = next((k for k in NPZ_X_KEYS if k in names), None)
                if x_key is None:
                    return None
                with z.open(names[x_key]) as f:
                    return _array_shape(f, labels=any(k in names for k in NPZ_Y_KEYS))
        if file_kind(path) == "parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(path)
            widths = [max(1, t.bit_width // 8) for name, t in zip(schema.names, schema.types, strict=True)
                      if name not in RESERVED and t.id in _ARROW_NUMERIC]
            if not widths:
                return None
            return FileShape(pq.read_metadata(path).num_rows, (len(widths),), max(widths), LABEL in schema.names)
    except Exception:  # noqa: BLE001 - the load says what is wrong, in its own words
        return None
    return None


def _array_shape(f, labels: bool) -> FileShape | None:
    """A .npy header's array as the loader will see it: (N, D), (N, H, W) as (N, 1, H, W), or (N, C, H, W)."""
    fmt = np.lib.format
    read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(fmt.read_magic(f))
    if read is None:
        return None
    shape, _, dtype = read(f)  # the header only: the data stays on disk
    if dtype.names or dtype.kind not in "biuf" or len(shape) not in (2, 3, 4) or not shape[0]:
        return None  # a table in a structured array, or what the load refuses
    sample = tuple(shape[1:])
    if len(sample) == 2:
        sample = (1, *sample)
    elif len(sample) == 3 and sample[0] > 4 and sample[2] <= 4:
        sample = (sample[2], sample[0], sample[1])  # channels-last, as the load transposes it
    return FileShape(int(shape[0]), tuple(int(s) for s in sample), dtype.itemsize, labels)


# ---------------------------------------------------------------------------------------------- tables


def _read_parquet(path: Path) -> pd.DataFrame:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        _unique_columns(path, pq.read_schema(path).names)
        return pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot read Parquet file ({_reason(e)})") from None


def _read_csv(path: Path) -> pd.DataFrame:
    try:
        header = pd.read_csv(path, header=None, nrows=1, dtype=str).iloc[0].tolist()
        _unique_columns(path, [str(h) for h in header])  # pandas would rename a repeat to `name.1` silently
        return pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: empty CSV file") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: cannot read CSV file ({_reason(e)})") from None


def _unique_columns(path: Path, names: list[str]) -> None:
    """Refuse repeated column names: which of two same-named columns is the feature would be a guess."""
    seen = pd.Series(names)
    dup = sorted(set(seen[seen.duplicated()]))
    if dup:
        raise DataError(f"{path}: duplicate column names {', '.join(map(repr, dup))}; rename them so every column is unique")


def _from_frame(path: Path, df: pd.DataFrame) -> RawData:
    """Split a frame into features and the reserved columns, validating each."""
    df.columns = [str(c) for c in df.columns]
    if len(df) == 0:
        raise DataError(f"{path}: no rows")
    features = [c for c in df.columns if c not in RESERVED]
    if not features:
        raise DataError(f"{path}: no feature columns (columns: {', '.join(df.columns) or 'none'})")
    columns = []
    for c in features:
        col = df[c]
        if not (pd.api.types.is_numeric_dtype(col.dtype) and not pd.api.types.is_complex_dtype(col.dtype)):
            raise DataError(
                f"{path}: column {c!r} is not numeric ({col.dtype}); features must be numeric "
                f"(reserved columns: {', '.join(RESERVED)})"
            )
        if col.isna().any():
            raise DataError(
                f"{path}: column {c!r} has {int(col.isna().sum())} missing (NaN/null) values, first at row {_first(col.isna())}"
            )
        arr = col.to_numpy(dtype=getattr(col.dtype, "numpy_dtype", col.dtype))
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = ~np.isfinite(arr)
            raise DataError(
                f"{path}: column {c!r} has {int(bad.sum())} infinite values, first at row {_first(bad)}"
            )
        _in_float32_range(path, f"column {c!r}", arr)
        columns.append(arr)
    dtype = np.result_type(*[a.dtype for a in columns])
    x = np.empty((len(df), len(columns)), dtype=dtype)
    for j, a in enumerate(columns):
        x[:, j] = a
    labels, names = _labels(path, f"column {LABEL!r}", df[LABEL]) if LABEL in df else (None, None)
    split = _split(path, f"column {SPLIT!r}", df[SPLIT]) if SPLIT in df else None
    sample_id = _sample_id(path, f"column {SAMPLE_ID!r}", df[SAMPLE_ID]) if SAMPLE_ID in df else None
    return RawData(x, labels, split, sample_id, names)


# ---------------------------------------------------------------------------------------------- arrays


def _read_npy(path: Path) -> RawData:
    _check_magic(path, (_NPY_MAGIC,), "a .npy file")
    try:
        a = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise _np_error(path, e) from None
    if a.dtype.names:  # a structured array is a table with named columns
        return _from_frame(path, pd.DataFrame.from_records(a))
    return RawData(_features(path, "array", a), None, None, None)


def _read_npz(path: Path) -> RawData:
    _check_magic(path, _ZIP_MAGIC, "a .npz (zip) file")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            x_key = next((k for k in NPZ_X_KEYS if k in keys), None)
            if x_key is None:
                raise DataError(
                    f"{path}: no features array; expected one named {', '.join(NPZ_X_KEYS)} (found: {', '.join(keys) or 'none'})"
                )
            y_key = next((k for k in NPZ_Y_KEYS if k in keys), None)
            arrays = {k: z[k] for k in (x_key, y_key, SPLIT, SAMPLE_ID) if k is not None and k in keys}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _np_error(path, e) from None
    unused = sorted(set(keys) - set(arrays))
    if unused:
        log.info("%s: ignoring arrays %s", path, ", ".join(unused))
    x = _features(path, f"array {x_key!r}", arrays[x_key])
    n = len(x)
    for k, a in arrays.items():
        if k != x_key and (a.ndim != 1 or len(a) != n):
            raise DataError(f"{path}: array {k!r} has shape {a.shape}; expected ({n},) to match {x_key!r}")
    labels, names = _labels(path, f"array {y_key!r}", pd.Series(arrays[y_key])) if y_key else (None, None)
    split = _split(path, f"array {SPLIT!r}", pd.Series(arrays[SPLIT])) if SPLIT in arrays else None
    sid = (
        _sample_id(path, f"array {SAMPLE_ID!r}", pd.Series(arrays[SAMPLE_ID]))
        if SAMPLE_ID in arrays
        else None
    )
    return RawData(x, labels, split, sid, names)


def _features(path: Path, what: str, a: np.ndarray) -> np.ndarray:
    """Validate a features array: numeric, finite, (N, D) table or images, (N, H, W) -> (N, 1, H, W)."""
    if a.dtype.kind not in "biuf":
        raise DataError(f"{path}: {what} has dtype {a.dtype}; features must be numeric")
    if a.ndim == 3:
        a = a[:, None]  # (N, 1, H, W)
    elif a.ndim == 4 and a.shape[1] > 4 and a.shape[3] <= 4:
        log.info("%s: %s looks channels-last %s; using (N, C, H, W)", path, what, a.shape)
        a = np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # (N, C, H, W)
    elif a.ndim not in (2, 4):
        raise DataError(
            f"{path}: {what} has shape {a.shape}; expected (N, D) features or (N, H, W) / (N, C, H, W) images"
        )
    if len(a) == 0 or a[0].size == 0:
        raise DataError(f"{path}: {what} is empty (shape {a.shape})")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            where = np.argwhere(bad)[0]
            pos = (
                f"row {where[0]}, column {where[1]}"
                if a.ndim == 2
                else f"index {tuple(int(i) for i in where)}"
            )
            raise DataError(f"{path}: {what} has {int(bad.sum())} NaN/Inf values, first at {pos}")
    _in_float32_range(path, what, a)
    return a


# ---------------------------------------------------------------------------------------------- reserved


def _labels(path: Path, what: str, s: pd.Series) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """Integer class labels (floats must be whole numbers; any values, gaps and negatives too), or class
    names: int64 codes in sorted name order and the names."""
    if s.isna().any():
        raise DataError(
            f"{path}: {what} has missing values, first at row {_first(s.isna())}; every row needs a label"
        )
    dtype = s.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_integer_dtype(dtype):
        return s.to_numpy(dtype=np.int64), None
    if pd.api.types.is_float_dtype(dtype):
        v = s.to_numpy(dtype=np.float64)
        bad = ~np.isfinite(v) | (v != np.round(v))
        if bad.any():
            i = _first(bad)
            raise DataError(
                f"{path}: {what} must hold integer class labels or class names; found {float(v[i])!r} at row {i}"
            )
        return v.astype(np.int64), None
    values = [t.decode() if isinstance(t, bytes) else t for t in s]
    if all(isinstance(t, str) for t in values):
        names, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
        return codes.astype(np.int64), tuple(str(n) for n in names)
    for i, val in enumerate(values):  # a mix: name the first value that is neither a whole number nor a name
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)):
            shown = val.item() if isinstance(val, np.generic) else val
            raise DataError(
                f"{path}: {what} must hold integer class labels or class names (not a mix); found {shown!r} at row {i}"
            )
    return s.to_numpy(dtype=np.int64), None


def _split(path: Path, what: str, s: pd.Series) -> np.ndarray:
    """Split names, "train" or "test" (case and surrounding spaces ignored), with both present."""
    v = s.map(lambda t: t.decode() if isinstance(t, bytes) else t)
    v = v.map(lambda t: t.strip().lower() if isinstance(t, str) else t)
    bad = ~v.isin(["train", "test"]).to_numpy()
    if bad.any():
        i = _first(bad)
        shown = s.iloc[i].item() if isinstance(s.iloc[i], np.generic) else s.iloc[i]
        raise DataError(f"{path}: {what} has value {shown!r} at row {i}; expected 'train' or 'test'")
    out = v.to_numpy(dtype=str)
    for name in ("train", "test"):
        if not (out == name).any():
            raise DataError(f"{path}: {what} has no {name!r} rows; both 'train' and 'test' are needed")
    return out


def _sample_id(path: Path, what: str, s: pd.Series) -> np.ndarray:
    """Unique integer ids."""
    if not pd.api.types.is_integer_dtype(s.dtype) or s.isna().any():
        raise DataError(f"{path}: {what} must hold integers (found {s.dtype})")
    ids = s.to_numpy(dtype=np.int64)
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        i = _first(dup)
        raise DataError(f"{path}: {what} is not unique: {ids[i]} repeats at row {i}")
    return ids


# ---------------------------------------------------------------------------------------------- helpers


def _in_float32_range(path: Path, what: str, a: np.ndarray) -> None:
    """Refuse magnitudes float32 cannot hold: training computes in float32, where they become infinite."""
    if a.dtype.itemsize > 4 and a.size and (big := np.abs(a) > np.finfo(np.float32).max).any():
        i = np.unravel_index(int(np.flatnonzero(big)[0]), a.shape)
        raise DataError(
            f"{path}: {what} has {int(big.sum())} values beyond float32's range (±3.4e38), first {float(a[i]):.3g} "
            f"at {f'index {tuple(int(j) for j in i)}' if a.ndim > 1 else f'row {int(i[0])}'}; rescale the data"
        )


def _check_magic(path: Path, magics: tuple[bytes, ...], what: str) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(max(len(m) for m in magics))
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({_reason(e)})") from None
    if not any(head.startswith(m) for m in magics):
        raise DataError(f"{path}: not {what} (bad magic bytes {head[:6]!r})")


def _np_error(path: Path, e: BaseException) -> DataError:
    if "pickle" in str(e).lower():
        return DataError(f"{path}: contains Python objects; refusing to unpickle (save plain numeric arrays)")
    return DataError(f"{path}: cannot read NumPy file ({_reason(e)})")


def _first(mask: np.ndarray | pd.Series) -> int:
    return int(np.flatnonzero(np.asarray(mask))[0])


def _reason(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0] or type(e).__name__
