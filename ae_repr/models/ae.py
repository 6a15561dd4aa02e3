"""The deterministic autoencoder (Hinton & Salakhutdinov 2006) and, trained on corrupted inputs,
the denoising autoencoder (Vincent et al. 2008, "Extracting and composing robust features with
denoising autoencoders"): an encoder to a `latent_dim`-wide code, a decoder back, and the
reconstruction negative log-likelihood as the only loss. The corruption is config
(`ModelConfig.corruption`), applied by the trainer, so `dae` is this class with a default corruption.
"""

from __future__ import annotations

from typing import Any

import torch

from ..likelihoods import Likelihood
from .backbones import make_decoder, make_encoder
from .base import Autoencoder, ModelConfig


class AEConfig(ModelConfig):
    """The plain autoencoder adds no fields to the shared ones."""


class AE(Autoencoder):
    """Deterministic autoencoder; the code is the representation."""

    Config = AEConfig

    def __init__(self, cfg: AEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian") -> None:
        super().__init__(cfg, input_shape, likelihood)
        self.encoder = make_encoder(self.input_shape, cfg.latent_dim, cfg)
        self.decoder = make_decoder(cfg.latent_dim, self.input_shape, cfg, self.likelihood.params)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code, (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean, (B, *input_shape)."""
        return self.likelihood.mean(self.decoder(z))

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction NLL of `target` (default `x`) from `x`; KL schedules do not apply."""
        recon = self.likelihood.nll(self.decoder(self.encoder(x)), x if target is None else target)
        return {"loss": recon, "recon": recon.detach()}
