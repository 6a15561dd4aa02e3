"""A sparse autoencoder (Ng 2011, "Sparse autoencoder" lecture notes; here the L1 form of Lee et al. 2007,
"Efficient sparse coding algorithms"), as an ae-repr variant from its own package: the reconstruction NLL
plus `sparsity` times the mean absolute code value. It declares one capability, its own anomaly score
(`code_l1`); it has no prior and no posterior, so ae-repr fits a prior to its codes for generation and skips
the posterior-only tasks with a note.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ae_repr.likelihoods import Likelihood
from ae_repr.models import Autoencoder, ModelConfig
from ae_repr.models.backbones import make_decoder, make_encoder


class SparseAEConfig(ModelConfig):
    """The shared fields plus the weight of the L1 penalty on the code."""

    sparsity: float = Field(0.01, ge=0)


class SparseAE(Autoencoder):
    """Deterministic autoencoder with an L1 penalty on its code."""

    Config = SparseAEConfig

    def __init__(
        self, cfg: SparseAEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian"
    ) -> None:
        super().__init__(cfg, input_shape, likelihood)
        self.encoder = make_encoder(self.input_shape, cfg.latent_dim, cfg)
        self.decoder = make_decoder(cfg.latent_dim, self.input_shape, cfg, self.likelihood.params)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The code, (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean, (B, *input_shape)."""
        return self.likelihood.mean(self.decoder(z))

    def anomaly_scores(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`code_l1`: the code's L1 norm per row, (B,)."""
        return {"code_l1": self.encode(x).abs().sum(1)}

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """Reconstruction NLL of `target` (default `x`) + sparsity * mean |z|; KL schedules do not apply."""
        z = self.encoder(x)
        recon = self.likelihood.nll(self.decoder(z), x if target is None else target)
        l1 = z.abs().sum(1).mean()
        total = recon + self.cfg.sparsity * l1 if self.cfg.sparsity > 0 else recon
        return {"loss": total, "recon": recon.detach(), "code_l1": l1.detach()}
