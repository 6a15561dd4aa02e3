"""Shared math for every variant, written once: Gaussian KLs, reparameterization, free bits, active
units, the VAE objective's terms and the vector-quantization helpers. The observation likelihoods
(reconstruction terms) live in `likelihoods.py`: a reconstruction loss there is the exact negative
log-likelihood summed over a sample's dimensions and averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# --- Gaussian latents --------------------------------------------------------------------------


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per dimension, same shape as `mu`."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def gaussian_kl_two(
    mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor
) -> torch.Tensor:
    """KL(q || p) between diagonal Gaussians per dimension, same shape as `mu_q`."""
    return 0.5 * (logvar_p - logvar_q + (logvar_q.exp() + (mu_q - mu_p).pow(2)) * (-logvar_p).exp() - 1.0)


def gaussian_log_density(z: torch.Tensor, mu: torch.Tensor | None = None, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dimension, (B,); mu/logvar None: the standard normal."""
    sq = z.pow(2) if mu is None else (z - mu).pow(2)
    if logvar is None:
        return -0.5 * (sq + math.log(2 * math.pi)).sum(-1)
    return -0.5 * (sq * (-logvar).exp() + logvar + math.log(2 * math.pi)).sum(-1)


def reparameterize(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I); differentiable in mu and logvar."""
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
    return mu + (0.5 * logvar).exp() * eps


def proposal_shift(n: int, widen: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor | float:
    """Log-variance offsets, (n, 1), drawing n rows from the defensive mixture 1/2 q + 1/2 q_widen (q with every
    standard deviation times `widen`): 0 for a row drawn from q, 2 log widen for one drawn wide, each with
    probability 1/2. `widen` 1: plain q, 0.0, and no random number is drawn."""
    if widen == 1.0:
        return 0.0
    wide = torch.rand(n, 1, generator=generator, device=device) < 0.5
    return wide * (2 * math.log(widen))


def mixture_log_density(levels: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], widen: float) -> torch.Tensor:
    """log of the proposal density at its draws, (B,): q = prod over `levels` (z, mu, logvar) of N(z; mu,
    exp(logvar)), and for `widen` > 1 the mixture 1/2 q + 1/2 q_widen that `proposal_shift` draws from (one
    component for all levels of a row, so the mixture is of the joint densities)."""
    log_q = sum(gaussian_log_density(z, mu, logvar) for z, mu, logvar in levels)
    if widen == 1.0:
        return log_q
    shift = 2 * math.log(widen)
    log_wide = sum(gaussian_log_density(z, mu, logvar + shift) for z, mu, logvar in levels)
    return torch.logaddexp(log_q, log_wide) - math.log(2)


def repeat_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """(B, ...) -> (n * B, ...): `t` stacked n times, draw-major (row i of draw s at s * B + i)."""
    return t if n == 1 else t.repeat(n, *([1] * (t.dim() - 1)))


def kl_penalty(kl_dims: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """Batch-mean KL of (B, D) per-dimension terms, each dimension floored at `free_bits` nats first."""
    per_dim = kl_dims.mean(0)  # (D,)
    return per_dim.clamp(min=free_bits).sum() if free_bits > 0 else per_dim.sum()


@torch.no_grad()
def active_units(mu: torch.Tensor, threshold: float = 0.01) -> torch.Tensor:
    """Number of latent dims whose posterior mean varies over the rows of `mu` (B, D) by more than `threshold`."""
    return (mu.detach().var(0, correction=0) > threshold).sum().to(torch.float32)


@torch.no_grad()
def active_units_of(
    encode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    batch_size: int = 1024,
    threshold: float = 0.01,
) -> int:
    """Active units over a whole data tensor, given a posterior-mean `encode` (e.g. `model.encode`)."""
    mu = torch.cat([encode(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    return int(active_units(mu, threshold).item())


def vae_terms(
    recon: torch.Tensor,
    kl_dims: torch.Tensor,
    posterior_mean: torch.Tensor,
    *,
    weight: float,
    free_bits: float,
) -> dict[str, torch.Tensor]:
    """The VAE objective from its parts: total, recon, kl, elbo (-(recon + kl), a bound on log p(x)), active_units."""
    kl = kl_dims.sum(1).mean()
    # a zero KL weight (warm-up start) leaves the KL out of the graph altogether
    total = recon + weight * kl_penalty(kl_dims, free_bits) if weight > 0 else recon
    return {
        "loss": total,
        "recon": recon.detach(),
        "kl": kl.detach(),
        "elbo": -(recon.detach() + kl.detach()),
        "active_units": active_units(posterior_mean),
    }


# --- vector quantization -----------------------------------------------------------------------


@torch.no_grad()
def nearest_code(z: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared Euclidean) for each row of `z` (N, D) -> (N,)."""
    # ||z||^2 is the same for every code, so argmin ||e||^2 - 2 z.e suffices; float32 even under
    # autocast, where bf16 distances would pick wrong codes
    with torch.autocast(z.device.type, enabled=False):
        dist = torch.addmm(codebook.float().pow(2).sum(1), z.float(), codebook.float().t(), alpha=-2.0)  # (N, K)
    return dist.argmin(1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Forward value z_q, gradient passed unchanged to z_e."""
    return z_e + (z_q - z_e).detach()


def code_counts(
    indices: torch.Tensor, codebook_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """How often each code was chosen, (K,); no host sync (unlike bincount on CUDA)."""
    ones = torch.ones(indices.shape, dtype=dtype, device=indices.device)
    return torch.zeros(codebook_size, dtype=dtype, device=indices.device).index_add_(0, indices, ones)


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the code usage distribution given by `counts` (K,): K for uniform use, 1 for one code."""
    p = counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum())
