"""Atomic file writes and the feature-Parquet contract (DESIGN section 5)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .memory import release_free_memory

log = logging.getLogger(__name__)

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


def remove_torn_writes(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files (`.<name>.<random>.tmp`) that `atomic_path` writes of a process killed mid-write
    left under `folder`; only safe while no other process writes there (hold the folder's lock)."""
    torn = [p for p in Path(folder).rglob(".*.tmp") if p.is_file()]
    for p in torn:
        p.unlink(missing_ok=True)
    return torn


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
    frame = table.to_pandas()
    del table
    release_free_memory()  # the table's buffers, now copied into the frame, else kept by Arrow's pool (raw pixels: 0.4 GB)
    return FeatureFile(path=path, frame=frame, meta=meta)


def write_table(path: str | os.PathLike[str], frame: pd.DataFrame) -> Path:
    """Write a DataFrame to Parquet atomically."""
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return Path(path)


def lock_path(folder: str | os.PathLike[str]) -> Path:
    """Where the lock guarding `folder` lives: beside it (`<parent>/.<name>.lock`), so it outlives the folder."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_alive(holder: dict[str, Any]) -> bool | None:
    """True or False for a holder on this host; None when it is on another host (its liveness is unknown here)."""
    if holder.get("host") != socket.gethostname():
        return None
    pid = int(holder.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return holder.get("start") in (None, _process_start(pid))


def _read_holder(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # being written, or not ours: treated as held


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike[str], what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on `folder` for the block; UserError at once if another process holds it.

    The lock is a file beside the folder (`lock_path`), created atomically (O_EXCL, which shared file
    systems honour, unlike flock) and naming host, pid and start time: deleting the folder does not
    free it, and a lock whose holder died on this host is taken over with a warning. Re-entrant within
    one process: an inner lock of the same folder is a no-op.
    """
    from .errors import UserError

    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": what}
    held = _read_holder(path)
    if held and all(held.get(k) == mine[k] for k in ("host", "pid", "start")):
        yield  # this process holds it already (`ae-repr run` around the flow, which locks for deployments too)
        return
    for _ in range(5):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None:
                continue  # released in between: try again
            alive = _holder_alive(holder) if holder else True
            if alive is None:
                raise UserError(
                    f"{folder}: another {what} on host {holder.get('host')} (pid {holder.get('pid')}, since "
                    f"{holder.get('since')}) holds {path}; use a different --out, or delete {path} if that run is gone"
                ) from None
            if alive:
                raise UserError(
                    f"{folder}: another {what} is using this folder (pid {holder.get('pid', '?')}); use a different --out"
                ) from None
            _take_over(path, holder)
            log.warning("%s: took over the lock of a %s that is gone (pid %s, since %s)", folder,
                        holder.get("what", what), holder.get("pid"), holder.get("since"))
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(mine, f)
        break
    else:
        raise UserError(f"{folder}: could not take the lock {path}; another {what} keeps taking it")
    try:
        yield
    finally:
        if _read_holder(path) == mine:  # never remove a lock another process took over
            path.unlink(missing_ok=True)


def _take_over(path: Path, stale: dict[str, Any]) -> None:
    """Remove a dead holder's lock, unless another process replaced it in the meantime (then it is put back)."""
    aside = path.with_name(f"{path.name}.{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read_holder(aside) != stale:
        try:
            os.link(aside, path)  # put the live lock back; fails if yet another one exists, which then rules
        except FileExistsError:
            pass
    aside.unlink(missing_ok=True)
