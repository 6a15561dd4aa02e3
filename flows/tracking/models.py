"""Exporting a variant's encoder as an MLflow model, and registering it (the first version is the champion)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .record import safe

CHAMPION = "champion"
MODEL_NAME = "encoder"


def registered_name(variant: str) -> str:
    """The registered model name of a variant's encoder."""
    return f"ae-repr-{variant}"


def log_encoder(client: Any, run_id: str, variant: str, model_dir: Path, example: np.ndarray,
                info: dict[str, Any], *, register: bool, seed: int | None = None) -> None:
    """Log the variant's encoder (raw inputs -> representation) to a run; register it when `register`, as a
    version tagged with its pretraining `seed` when it is one of a seed grid.

    `client` is the session's MlflowClient; the process-wide tracking URI must name the same store
    (log_model and the registry resolve it, not the client's).
    """
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from ae_repr.encoder import Encoder

    enc = Encoder.from_dir(model_dir)
    x = np.ascontiguousarray(example, dtype=np.float32).reshape(-1, *enc.input_shape)  # (B, *input_shape)
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *enc.input_shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, enc.latent_dim))]))
    model = mlflow.pytorch.log_model(
        enc, name=MODEL_NAME, run_id=run_id, signature=signature, input_example=x,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
        registered_model_name=registered_name(variant) if register else None,
        validate_serving_input=False,  # a reload + predict per model; the tests load and run the model
        metadata=safe({"variant": variant, "latent_dim": enc.latent_dim, "dataset": info.get("dataset"),
                       "dataset_sha256": info.get("sha256"), "input": "raw rows, float32"}),
    )
    version = getattr(model, "registered_model_version", None)
    if register and version is not None:
        name = registered_name(variant)
        if seed is not None:
            client.set_model_version_tag(name, str(version), "seed", str(seed))
        if CHAMPION not in client.get_registered_model(name).aliases:
            client.set_registered_model_alias(name, CHAMPION, str(version))
