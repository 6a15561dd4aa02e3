"""MNIST-style IDX files, gzipped or not: a reader, a writer, and discovery of image/label pairs in a folder.

Header: two zero bytes, a type code (0x08 = uint8, ...), the number of dimensions, then each dimension
as a big-endian uint32; the data follows in C order, big-endian. Gzip is recognized by its magic bytes
(1f 8b), not by the file name.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_IMAGES_NDIM, _LABELS_NDIM = 3, 1


@dataclass(frozen=True)
class IdxHeader:
    """An IDX file's parsed header."""

    path: Path
    dtype: np.dtype
    dims: tuple[int, ...]
    gzipped: bool

    @property
    def magic(self) -> int:
        """The 32-bit magic number, e.g. 0x00000803 for a uint8 image stack."""
        code = next(k for k, v in IDX_TYPES.items() if v == self.dtype)
        return (code << 8) | len(self.dims)

    @property
    def header_bytes(self) -> int:
        return 4 + 4 * len(self.dims)


def _open(path: Path):
    with open(path, "rb") as f:
        gz = f.read(2) == _GZIP_MAGIC
    return (gzip.open(path, "rb") if gz else open(path, "rb")), gz


def read_idx_header(path: str | os.PathLike[str]) -> IdxHeader:
    """Parse an IDX header; DataError when the file is missing, not IDX, or of an unsupported type."""
    path = Path(path)
    try:
        f, gz = _open(path)
        with f:
            head = f.read(4)
            if len(head) == 4 and head[:2] == b"\x00\x00" and head[2] in IDX_TYPES and head[3] > 0:
                dims_raw = f.read(4 * head[3])
            else:
                dims_raw = b""
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: cannot read IDX file ({_reason(e)})") from None
    if len(head) < 4 or head[:2] != b"\x00\x00" or head[3] == 0:
        magic = int.from_bytes(head.ljust(4, b"\x00"), "big")
        raise DataError(f"{path}: not an IDX file (bad magic number 0x{magic:08x})")
    if head[2] not in IDX_TYPES:
        known = ", ".join(f"0x{k:02x} ({v.name})" for k, v in IDX_TYPES.items())
        raise DataError(f"{path}: unsupported IDX data type 0x{head[2]:02x}; supported: {known}")
    if len(dims_raw) < 4 * head[3]:
        raise DataError(
            f"{path}: truncated IDX header (expected {4 * head[3]} bytes of dimensions, got {len(dims_raw)})"
        )
    dims = struct.unpack(f">{head[3]}I", dims_raw)
    return IdxHeader(path, IDX_TYPES[head[2]], tuple(int(d) for d in dims), gz)


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a whole IDX file into a native-endian array of its declared shape."""
    header = read_idx_header(path)
    expected = math.prod(header.dims) * header.dtype.itemsize
    data, complete = _read_bytes(header.path, header.gzipped)
    body = memoryview(data)[header.header_bytes :]
    if len(body) != expected or not complete:
        shape = "x".join(map(str, header.dims))
        what = "truncated" if len(body) < expected or not complete else "longer than its header says"
        stream = " (gzip stream cut short)" if not complete else ""
        raise DataError(
            f"{header.path}: IDX file {what}{stream}: header ({shape} {header.dtype.name}) needs {expected} "
            f"data bytes, found {len(body)}"
        )
    return np.frombuffer(body, dtype=header.dtype).reshape(header.dims).astype(header.dtype.newbyteorder("="))


def _read_bytes(path: Path, gz: bool) -> tuple[bytes, bool]:
    """The file's (decompressed) bytes and whether the gzip stream was complete."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read IDX file ({_reason(e)})") from None
    if not gz:
        return raw, True
    parts: list[bytes] = []
    try:
        while raw:  # a gzip file may hold several members back to back
            d = zlib.decompressobj(wbits=31)
            parts.append(d.decompress(raw))
            if not d.eof:
                return b"".join(parts), False
            raw = d.unused_data
    except zlib.error as e:
        raise DataError(f"{path}: corrupt gzip data ({_reason(e)})") from None
    return b"".join(parts), True


def write_idx(path: str | os.PathLike[str], array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write an array as an IDX file; gzip when `compress`, or by default when the name ends in .gz."""
    path = Path(path)
    array = np.asarray(array)
    code = next(
        (
            k
            for k, v in IDX_TYPES.items()
            if v.kind == array.dtype.kind and v.itemsize == array.dtype.itemsize
        ),
        None,
    )
    if code is None:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    payload = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()
    gz = path.name.endswith(".gz") if compress is None else compress
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


@dataclass(frozen=True)
class IdxPair:
    """An images file and its (optional) labels file."""

    images: IdxHeader
    labels: IdxHeader | None


def find_idx_pairs(directory: str | os.PathLike[str]) -> dict[str, IdxPair]:
    """Find image/label IDX files in a folder by their headers: {"all": pair} or {"train": .., "test": ..}."""
    directory = Path(directory)
    if not directory.exists():
        raise DataError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory (idx:DIR takes a folder holding IDX files)")
    images: list[IdxHeader] = []
    labels: list[IdxHeader] = []
    for p in sorted(directory.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        try:
            header = read_idx_header(p)
        except DataError:
            if _looks_like_idx(p.name):
                raise  # named like an IDX file but broken: say so rather than silently skip it
            log.debug("skipping %s: not an IDX file", p)
            continue
        if len(header.dims) == _IMAGES_NDIM:
            images.append(header)
        elif len(header.dims) == _LABELS_NDIM:
            labels.append(header)
        else:
            log.warning(
                "skipping %s: IDX file with %d dimensions (expected 3 for images, 1 for labels)",
                p,
                len(header.dims),
            )
    if not images:
        raise DataError(f"{directory}: no IDX images file (magic 0x00000803, N x rows x cols) found")

    roles: dict[str, list[IdxHeader]] = {}
    for h in images:
        roles.setdefault(_role(h.path.name), []).append(h)
    if len(images) == 1:
        return {"all": IdxPair(images[0], _match_labels(images[0], labels, directory))}
    if set(roles) == {"train", "test"} and all(len(v) == 1 for v in roles.values()):
        return {
            r: IdxPair(roles[r][0], _match_labels(roles[r][0], labels, directory)) for r in ("train", "test")
        }
    names = ", ".join(h.path.name for h in images)
    raise DataError(
        f"{directory}: several IDX images files ({names}); expected one, or one train-* and one t10k-*/test-* file"
    )


def _match_labels(images: IdxHeader, labels: list[IdxHeader], directory: Path) -> IdxHeader | None:
    """The labels file for an images file: same role (train/test) and prefix when several, same count."""
    if not labels:
        return None
    if len(labels) > 1:
        role, stem = _role(images.path.name), _stem(images.path.name)
        same = [h for h in labels if _stem(h.path.name) == stem] or [
            h for h in labels if _role(h.path.name) == role
        ]
        if len(same) != 1:
            names = ", ".join(h.path.name for h in labels)
            raise DataError(
                f"{directory}: cannot tell which IDX labels file ({names}) belongs to {images.path.name}"
            )
        labels = same
    if labels[0].dims[0] != images.dims[0]:
        raise DataError(
            f"{labels[0].path}: {labels[0].dims[0]} labels but {images.path.name} holds {images.dims[0]} images"
        )
    return labels[0]


def _role(name: str) -> str:
    name = name.lower()
    if "t10k" in name or "test" in name:
        return "test"
    return "train" if "train" in name else "all"


def _stem(name: str) -> str:
    """The file name with the images/labels part and extensions removed: train-images-idx3-ubyte.gz -> train-."""
    return re.sub(r"(images?|labels?)[-_.]?(idx\d)?.*$", "", name.lower())


def _looks_like_idx(name: str) -> bool:
    return bool(re.search(r"idx\d|ubyte", name.lower()))


def _reason(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0] or type(e).__name__
