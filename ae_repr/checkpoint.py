"""Saving and loading trained models: a state dict plus a JSON description, checksummed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data.dataset import Normalizer
from .errors import UserError
from .io import atomic_path, read_json, sha256_file, write_json
from .models import Autoencoder, build_model, model_config

WEIGHTS = "model.pt"
DESCRIPTION = "config.json"


@dataclass(frozen=True)
class LoadedModel:
    """A trained model in eval mode with the normalizer fitted on its training data and its description."""

    model: Autoencoder
    normalizer: Normalizer
    meta: dict[str, Any]

    @property
    def variant(self) -> str:
        return self.meta["variant"]


def save_model(
    model_dir: str | os.PathLike[str],
    model: Autoencoder,
    *,
    variant: str,
    normalizer: Normalizer,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `model.pt` (state dict) and `config.json` (variant, config, shapes, normalizer, checksum)."""
    model_dir = Path(model_dir)
    with atomic_path(model_dir / WEIGHTS) as tmp:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    meta = {
        "variant": variant,
        "model_config": model.cfg.model_dump(mode="json"),
        "input_shape": list(model.input_shape),
        "likelihood": model.likelihood,
        "normalizer": normalizer.to_dict(),
        "weights_sha256": sha256_file(model_dir / WEIGHTS),
        **(extra or {}),
    }
    write_json(model_dir / DESCRIPTION, meta)
    return model_dir


def load_model(model_dir: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LoadedModel:
    """Load a saved model (weights only, checksum verified) in eval mode."""
    model_dir = Path(model_dir)
    desc, weights = model_dir / DESCRIPTION, model_dir / WEIGHTS
    if not desc.is_file() or not weights.is_file():
        raise UserError(f"no trained model in {model_dir} (expected {DESCRIPTION} and {WEIGHTS})")
    meta = read_json(desc)
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise UserError(f"{weights}: checksum does not match {desc} (corrupt or replaced file)")
    cfg = model_config(meta["variant"], **meta["model_config"])
    model = build_model(meta["variant"], cfg, tuple(meta["input_shape"]), meta["likelihood"])
    model.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True))
    model.eval()
    return LoadedModel(model, Normalizer.from_dict(meta["normalizer"]), meta)
