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
        "likelihood": str(model.likelihood),
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
    try:
        meta = read_json(desc)
    except (OSError, ValueError) as e:
        raise UserError(f"{desc}: unreadable model description ({_first_line(e)})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{desc}: not a model description (expected a JSON object)")
    if sha256_file(weights) != meta.get("weights_sha256"):
        raise UserError(f"{weights}: checksum does not match {desc} (corrupt or replaced file)")
    try:
        cfg = model_config(meta["variant"], **meta["model_config"])
        model = build_model(meta["variant"], cfg, tuple(meta["input_shape"]), meta["likelihood"])
        normalizer = Normalizer.from_dict(meta["normalizer"])
    except (KeyError, TypeError, ValueError, AssertionError) as e:
        raise UserError(f"{desc}: invalid model description ({e.__class__.__name__}: {_first_line(e)})") from None
    try:
        # weights_only: tensors and plain containers only; a pickled object is refused, never executed
        state = torch.load(weights, map_location=map_location, weights_only=True)
    except Exception as e:
        raise UserError(f"{weights}: refused: not a plain state dict of tensors ({_first_line(e)})") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError, ValueError) as e:
        raise UserError(f"{weights}: weights do not fit the model described in {desc} ({_first_line(e)})") from None
    model.eval()
    return LoadedModel(model, normalizer, meta)


def _first_line(e: BaseException) -> str:
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), e.__class__.__name__)[:300]
