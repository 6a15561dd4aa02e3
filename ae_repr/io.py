"""Atomic file writes and the feature-Parquet contract (DESIGN section 5)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

META_PREFIX = "ae_repr."
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the mode a plain open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")
    return Path(path)


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's contents, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def latent_columns(k: int) -> list[str]:
    """The contract's latent column names z_000 .. z_{k-1}."""
    return [f"z_{i:03d}" for i in range(k)]


def write_features(
    path: str | os.PathLike[str],
    *,
    sample_id: np.ndarray,
    split: np.ndarray,
    label: np.ndarray | None,
    z: np.ndarray,
    metadata: Mapping[str, Any],
) -> Path:
    """Write a feature Parquet file in the contract schema, atomically; metadata keys get the `ae_repr.` prefix."""
    z = np.asarray(z, dtype=np.float32)
    n, k = z.shape
    cols: dict[str, pa.Array] = {
        "sample_id": pa.array(np.asarray(sample_id, dtype=np.int64)),
        "split": pa.array(np.asarray(split).astype(str), type=pa.string()),
        "label": pa.nulls(n, pa.int64()) if label is None else pa.array(np.asarray(label, dtype=np.int64)),
    }
    for name, col in zip(latent_columns(k), z.T, strict=True):
        cols[name] = pa.array(np.ascontiguousarray(col), type=pa.float32())
    meta = {f"{META_PREFIX}{key}": str(value) for key, value in metadata.items() if value is not None}
    meta.setdefault(f"{META_PREFIX}latent_dim", str(k))
    table = pa.table(cols).replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        # dictionary pages only where values repeat: trying them on float columns costs ~5x the write
        pq.write_table(table, tmp, use_dictionary=["split", "label"])
    return Path(path)


@dataclass(frozen=True)
class FeatureFile:
    """A feature Parquet file read back: its frame and its `ae_repr.` metadata (prefix stripped)."""

    path: Path
    frame: pd.DataFrame
    meta: dict[str, str]

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def z_columns(self) -> list[str]:
        return [c for c in self.frame.columns if c.startswith("z_")]

    @property
    def z(self) -> np.ndarray:
        return self.frame[self.z_columns].to_numpy(dtype=np.float32)

    @property
    def has_labels(self) -> bool:
        return bool(self.frame["label"].notna().all())


def read_features(path: str | os.PathLike[str]) -> FeatureFile:
    """Read a feature Parquet file and its metadata."""
    path = Path(path)
    table = pq.read_table(path)
    raw = table.schema.metadata or {}
    meta = {
        k.decode()[len(META_PREFIX) :]: v.decode() for k, v in raw.items() if k.decode().startswith(META_PREFIX)
    }
    return FeatureFile(path=path, frame=table.to_pandas(), meta=meta)


def write_table(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike[str], what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the block; UserError at once if another process holds it.

    The lock is an flock on `folder/.lock`, so the kernel releases it when the holder exits or crashes.
    """
    import fcntl

    from .errors import UserError

    path = Path(folder) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{folder}: another {what} is using this folder (pid {holder}); use a different --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
