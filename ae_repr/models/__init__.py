"""The variant registry: public name -> (model class, config defaults). The only registry there is."""

from __future__ import annotations

from typing import Any

from .base import Autoencoder, Corruption, ModelConfig

# Filled in as the variant files land: e.g. "beta_vae": (VAE, {"beta": 4.0}), "dae": (AE, {"corruption": ...}).
REGISTRY: dict[str, tuple[type[Autoencoder], dict[str, Any]]] = {}


def model_config(variant: str, **fields: Any) -> ModelConfig:
    """The variant's typed config: its registry defaults, then `fields` (validated; unknown keys rejected)."""
    cls, defaults = REGISTRY[variant]
    return cls.Config.model_validate({**defaults, **fields})


def build_model(variant: str, cfg: ModelConfig, input_shape: tuple[int, ...], likelihood: str) -> Autoencoder:
    """Instantiate a registered variant for inputs of `input_shape`."""
    cls, _ = REGISTRY[variant]
    return cls(cfg, input_shape, likelihood)


__all__ = ["REGISTRY", "Autoencoder", "Corruption", "ModelConfig", "build_model", "model_config"]
