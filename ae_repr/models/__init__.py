"""The variant registry: public name -> (model class, config defaults). The only registry there is."""

from __future__ import annotations

from typing import Any

from .ae import AE
from .base import Autoencoder, Corruption, ModelConfig
from .hier_vae import HierVAE
from .vae import VAE
from .vq_vae import VQVAE

REGISTRY: dict[str, tuple[type[Autoencoder], dict[str, Any]]] = {
    "ae": (AE, {}),
    # masking rather than additive Gaussian noise: on the 8x8 digits zeroed pixels force the code to
    # infer strokes from their context (Vincent et al. 2008's choice too), and it gave the better
    # linear probe in our comparison (see the registry notes in the report)
    "dae": (AE, {"corruption": {"kind": "masking", "level": 0.3}}),
    "vae": (VAE, {}),
    "beta_vae": (VAE, {"beta": 4.0}),
    "vq_vae": (VQVAE, {}),
    "hier_vae": (HierVAE, {}),
}


def model_config(variant: str, **fields: Any) -> ModelConfig:
    """The variant's typed config: its registry defaults, then `fields` (validated; unknown keys rejected)."""
    cls, defaults = REGISTRY[variant]
    return cls.Config.model_validate({**defaults, **fields})


def build_model(variant: str, cfg: ModelConfig, input_shape: tuple[int, ...], likelihood: str) -> Autoencoder:
    """Instantiate a registered variant for inputs of `input_shape`."""
    cls, _ = REGISTRY[variant]
    return cls(cfg, input_shape, likelihood)


__all__ = ["REGISTRY", "Autoencoder", "Corruption", "ModelConfig", "build_model", "model_config"]
