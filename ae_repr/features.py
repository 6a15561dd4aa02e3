"""Feature extraction: a trained encoder's representation of every row, written as contract Parquet."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import LoadedModel, load_model
from .data import data_changed
from .data.dataset import Dataset
from .errors import UserError
from .io import write_features

log = logging.getLogger(__name__)


@torch.inference_mode()
def encode_all(loaded: LoadedModel, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Encode raw rows in batches without autograd; returns (N, latent_dim) float32."""
    model = loaded.model
    norm = loaded.normalizer
    device = next(model.parameters()).device
    shift = torch.as_tensor(norm.shift, dtype=torch.float32, device=device)
    scale = torch.as_tensor(norm.scale, dtype=torch.float32, device=device)
    # [0, 1] data (binary images) needs no arithmetic: only the per-batch float conversion
    identity = norm.kind == "minmax" and float(norm.shift) == 0.0 and float(norm.scale) == 1.0
    out = torch.empty((len(x), model.latent_dim), dtype=torch.float32)  # written in place, returned as numpy
    src = torch.from_numpy(x)
    for start in range(0, len(x), batch_size):
        xb = src[start : start + batch_size].to(device=device, dtype=torch.float32)  # may be a view of `x`
        if not identity:
            xb = (xb - shift).mul_(scale)  # out of place first: never write into the caller's array
        out[start : start + len(xb)] = model.encode(xb)
    return out.numpy()


def extract_features(
    model_dir: str | os.PathLike[str],
    data: Dataset,
    out_path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    batch_size: int = 4096,
) -> Path:
    """Write `out_path` (features of every train and test row) from the model in `model_dir`.

    `metadata` adds the caller's own keys to the file's metadata (a tracking run id, say); it cannot
    replace the keys that describe the features themselves.
    """
    model_dir, out_path = Path(model_dir), Path(out_path)
    loaded = load_model(model_dir)
    if tuple(loaded.model.input_shape) != data.shape:
        raise UserError(
            f"{data.name}: samples have shape {data.shape}, but the model in {model_dir} "
            f"expects {tuple(loaded.model.input_shape)}"
        )
    if loaded.meta.get("dataset_sha256") not in (None, data.sha256):
        if loaded.meta.get("dataset") == data.name:  # the same data set, other content: it changed since training
            raise data_changed(data.name, loaded.meta["dataset_sha256"], data.sha256)
        log.warning("%s: extracting on data that differs from the training data (%s)", model_dir, data.name)
    z = encode_all(loaded, data.x, batch_size)
    if not np.isfinite(z).all():
        raise RuntimeError(f"{loaded.variant}: the encoder produced non-finite features")
    meta = {
        "variant": loaded.variant,
        "latent_dim": loaded.model.latent_dim,
        "dataset": data.name,
        "dataset_sha256": data.sha256,
        "config_sha256": loaded.meta.get("config_sha256", ""),
        "model_dir": os.path.relpath(model_dir.resolve(), out_path.resolve().parent),
        # the class names behind the int64 `label` codes, when the data named its classes
        "label_names": None if data.label_names is None else json.dumps(list(data.label_names)),
    }
    clash = sorted(set(meta) & set(metadata or {}))
    if clash:
        raise ValueError(f"extract_features: metadata may not replace {', '.join(clash)}")
    meta.update(metadata or {})
    return write_features(out_path, sample_id=data.sample_id, split=data.split, label=data.labels, z=z, metadata=meta)
