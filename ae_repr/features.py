"""Feature extraction: a trained encoder's representation of every row, written as contract Parquet."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from .checkpoint import LoadedModel, load_model
from .data.dataset import Dataset
from .errors import UserError
from .io import write_features

log = logging.getLogger(__name__)


@torch.inference_mode()
def encode_all(loaded: LoadedModel, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Encode raw rows in batches without autograd; returns (N, latent_dim) float32."""
    model = loaded.model
    device = next(model.parameters()).device
    shift = torch.as_tensor(loaded.normalizer.shift, dtype=torch.float32, device=device)
    scale = torch.as_tensor(loaded.normalizer.scale, dtype=torch.float32, device=device)
    out = np.empty((len(x), model.latent_dim), dtype=np.float32)
    src = torch.from_numpy(x)
    for start in range(0, len(x), batch_size):
        xb = (src[start : start + batch_size].to(device).float() - shift) * scale
        out[start : start + len(xb)] = model.encode(xb).float().cpu().numpy()
    return out


def extract_features(
    model_dir: str | os.PathLike[str],
    data: Dataset,
    out_path: str | os.PathLike[str],
    *,
    mlflow_run_id: str | None = None,
    batch_size: int = 4096,
) -> Path:
    """Write `out_path` (features of every train and test row) from the model in `model_dir`."""
    model_dir, out_path = Path(model_dir), Path(out_path)
    loaded = load_model(model_dir)
    if tuple(loaded.model.input_shape) != data.shape:
        raise UserError(
            f"{data.name}: samples have shape {data.shape}, but the model in {model_dir} "
            f"expects {tuple(loaded.model.input_shape)}"
        )
    if loaded.meta.get("dataset_sha256") not in (None, data.sha256):
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
        "mlflow_run_id": mlflow_run_id,
    }
    return write_features(out_path, sample_id=data.sample_id, split=data.split, label=data.labels, z=z, metadata=meta)
