"""The Wasserstein autoencoder with an MMD penalty (Tolstikhin et al. 2018, "Wasserstein Auto-Encoders"):
a deterministic encoder and decoder trained on the reconstruction NLL plus `mmd_weight` times the maximum mean
discrepancy between the batch's codes Q_Z and as many draws from the prior P_Z = N(0, prior_std^2 I). The
MMD uses the paper's inverse multiquadratics kernel k(x, y) = C / (C + ||x - y||^2), summed over the scales
C = s * 2 * latent_dim * prior_std^2 for s in `kernel_scales` (the paper's MNIST setting), with the unbiased
U-statistic estimator. It matches the aggregate posterior to the prior, so it has a prior to sample from,
but no per-example posterior (no KL, no ELBO). The representation is the code.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from ..likelihoods import Likelihood
from .ae import AE, AEConfig


class WAEConfig(AEConfig):
    """WAE fields: the MMD weight (the paper's lambda), the prior's std and the kernel scales."""

    mmd_weight: float = Field(10.0, ge=0)
    prior_std: float = Field(1.0, gt=0)
    kernel_scales: tuple[float, ...] = Field((0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0), min_length=1)


def imq_mmd(a: torch.Tensor, b: torch.Tensor, scales: tuple[float, ...] | list[float]) -> torch.Tensor:
    """Unbiased MMD^2 between samples `a` (n, d) and `b` (m, d) under the sum of IMQ kernels C / (C + ||x - y||^2)
    at each C in `scales` (absolute, not relative)."""
    n, m = len(a), len(b)
    assert n > 1 and m > 1, f"the unbiased MMD needs two or more rows per side, got {n} and {m}"
    d_aa, d_bb, d_ab = torch.cdist(a, a).pow(2), torch.cdist(b, b).pow(2), torch.cdist(a, b).pow(2)  # (n, n) ...
    k_aa, k_bb, k_ab = (sum(c / (c + d) for c in scales) for d in (d_aa, d_bb, d_ab))
    # the U-statistic leaves out the diagonal (k(x, x) = len(scales) for every x)
    same_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    same_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return same_a + same_b - 2 * k_ab.mean()


class WAE(AE):
    """WAE-MMD; `encode` is the code. Capabilities: Prior (no GaussianPosterior: it has no per-example posterior)."""

    Config = WAEConfig
    latent_geometry = "spherical"  # a Gaussian prior: interpolate along its shells

    def __init__(self, cfg: WAEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian") -> None:
        super().__init__(cfg, input_shape, likelihood)  # the AE's encoder, decoder, encode and decode
        assert isinstance(cfg, WAEConfig), f"WAE needs a WAEConfig, got {type(cfg).__name__}"

    def prior_draws(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` draws from N(0, prior_std^2 I), (n, latent_dim)."""
        device = next(self.parameters()).device
        return self.cfg.prior_std * torch.randn(n, self.latent_dim, generator=generator, device=device)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded draws from the prior, (n, *input_shape)."""
        return self.decode(self.prior_draws(n, generator))

    def mmd(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """MMD^2 between codes `z` (B, latent_dim) and as many prior draws, at the configured kernel scales."""
        base = 2 * self.latent_dim * self.cfg.prior_std**2  # the paper's C for a Gaussian prior
        return imq_mmd(z.float(), self.prior_draws(len(z), generator), [s * base for s in self.cfg.kernel_scales])

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """recon + mmd_weight * MMD(codes, prior draws); KL schedules do not apply."""
        z = self.encoder(x)
        recon = self.likelihood.nll(self.decoder(z), x if target is None else target)
        if self.cfg.mmd_weight == 0:  # a zero-weight term is not computed
            return {"loss": recon, "recon": recon.detach()}
        # a single row (a last batch) has no unbiased MMD: it adds nothing, and the term keeps its key
        mmd = self.mmd(z, generator) if len(z) > 1 else recon.new_zeros(())
        return {"loss": recon + self.cfg.mmd_weight * mmd, "recon": recon.detach(), "mmd": mmd.detach()}
