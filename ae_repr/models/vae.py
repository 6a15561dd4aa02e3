"""The variational autoencoder (Kingma & Welling 2014, "Auto-Encoding Variational Bayes") and,
with `beta` != 1, the beta-VAE (Higgins et al. 2017, "beta-VAE: Learning Basic Visual Concepts with
a Constrained Variational Framework"): a diagonal Gaussian posterior q(z|x), a standard normal prior
and the loss recon + beta * kl_weight * KL, with optional free bits (Kingma et al. 2016) as a
per-dimension KL floor. The representation is the posterior mean.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..likelihoods import Likelihood
from ..losses import (
    gaussian_kl,
    gaussian_log_density,
    mixture_log_density,
    proposal_shift,
    reparameterize,
    repeat_rows,
    vae_terms,
)
from .backbones import make_decoder, make_encoder
from .base import Autoencoder, ModelConfig
from .capabilities import GaussianLatentScores


class VAEConfig(ModelConfig):
    """VAE fields: the KL weight beta (1: the ELBO; > 1: beta-VAE)."""

    beta: float = Field(1.0, ge=0)


class VAE(GaussianLatentScores, Autoencoder):
    """Gaussian-latent VAE; `encode` is the posterior mean. Capabilities: GaussianPosterior, Prior, AnomalyScorer."""

    Config = VAEConfig
    LOSS_ONLY_FIELDS = Autoencoder.LOSS_ONLY_FIELDS | {"beta"}  # beta weighs the KL in `loss` and nothing else

    def __init__(self, cfg: VAEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian") -> None:
        super().__init__(cfg, input_shape, likelihood)
        assert isinstance(cfg, VAEConfig), f"VAE needs a VAEConfig, got {type(cfg).__name__}"
        self.encoder = make_encoder(self.input_shape, 2 * cfg.latent_dim, cfg)  # -> (mu, logvar)
        self.decoder = make_decoder(cfg.latent_dim, self.input_shape, cfg, self.likelihood.params)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) as (mu, logvar), each (B, latent_dim)."""
        # float32 even under bf16 autocast: exp(logvar) and the KL lose too much in bf16
        mu, logvar = self.encoder(x).float().chunk(2, dim=1)
        return mu, logvar

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean, (B, latent_dim)."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean, (B, *input_shape)."""
        return self.likelihood.mean(self.decoder(z))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded draws from the N(0, I) prior, (n, *input_shape)."""
        device = next(self.parameters()).device
        return self.decode(torch.randn(n, self.latent_dim, generator=generator, device=device))

    def kl_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-row, per-dimension KL(q(z|x) || N(0, I)), (B, latent_dim); exact, so `generator` is unused."""
        return gaussian_kl(*self.posterior(x))

    def log_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1, widen: float = 1.0
    ) -> torch.Tensor:
        """log p(x, z) - log r(z|x) at `draws` z ~ r(z|x) per row, constants included, (draws * B,) draw-major;
        r is q(z|x), or with `widen` > 1 the defensive mixture 1/2 q + 1/2 q_widen (`proposal_shift`).

        With r = q its mean over draws is the ELBO; -log of the mean of exp over S draws is the importance-sampled
        NLL for any r. The encoder runs once per row, whatever the number of draws.
        """
        mu, logvar, x = (repeat_rows(t, draws) for t in (*self.posterior(x), x))
        z = reparameterize(mu, logvar + proposal_shift(len(mu), widen, generator, mu.device), generator)
        log_px = self.likelihood.log_prob(self.decoder(z), x)
        return log_px + gaussian_log_density(z) - mixture_log_density([(z, mu, logvar)], widen)

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        kl_weight: float = 1.0,
        free_bits: float = 0.0,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """recon + beta * kl_weight * KL (free-bits floored); also reports kl, elbo, active_units."""
        mu, logvar = self.posterior(x)
        recon = self.likelihood.nll(self.decoder(reparameterize(mu, logvar, generator)), x if target is None else target)
        return vae_terms(
            recon,
            gaussian_kl(mu, logvar),  # (B, latent_dim)
            mu,
            weight=self.cfg.beta * kl_weight,
            free_bits=free_bits,
        )
