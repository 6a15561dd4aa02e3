"""The shared math in ae_repr.losses against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ae_repr import losses


def _posterior(seed: int = 0, b: int = 6, d: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g), torch.randn(b, d, generator=g) * 0.7


def test_gaussian_kl_matches_monte_carlo() -> None:
    mu, logvar = torch.tensor([[0.8, -1.5, 0.0]]), torch.tensor([[0.5, -1.0, 1.2]])
    q, p = Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)
    z = q.sample((200_000,))  # (S, 1, 3)
    mc = (q.log_prob(z) - p.log_prob(z)).mean(0)
    torch.testing.assert_close(losses.gaussian_kl(mu, logvar), mc, atol=0.03, rtol=0.02)


def test_gaussian_kl_matches_torch_distributions() -> None:
    mu, logvar = _posterior()
    expected = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(losses.gaussian_kl(mu, logvar), expected)


def test_gaussian_kl_two_matches_torch_distributions() -> None:
    mu_q, logvar_q = _posterior(1)
    mu_p, logvar_p = _posterior(2)
    expected = kl_divergence(Normal(mu_q, (0.5 * logvar_q).exp()), Normal(mu_p, (0.5 * logvar_p).exp()))
    torch.testing.assert_close(losses.gaussian_kl_two(mu_q, logvar_q, mu_p, logvar_p), expected)
    # against the standard normal it reduces to gaussian_kl
    zeros = torch.zeros_like(mu_q)
    torch.testing.assert_close(
        losses.gaussian_kl_two(mu_q, logvar_q, zeros, zeros), losses.gaussian_kl(mu_q, logvar_q)
    )


def test_reparameterize_gradients_and_moments() -> None:
    mu = torch.tensor([1.0, -2.0], requires_grad=True)
    logvar = torch.tensor([0.0, math.log(4.0)], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    z = losses.reparameterize(mu.expand(200_000, 2), logvar.expand(200_000, 2), g)
    torch.testing.assert_close(z.mean(0), mu.detach(), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([1.0, 2.0]), atol=0.02, rtol=0)
    (z.pow(2).mean(0).sum()).backward()
    # d E[z^2] / d mu = 2 mu; d E[z^2] / d logvar = sigma^2
    torch.testing.assert_close(mu.grad, 2 * mu.detach(), atol=0.05, rtol=0)
    torch.testing.assert_close(logvar.grad, torch.tensor([1.0, 4.0]), atol=0.1, rtol=0)


def test_reparameterize_generator_is_reproducible() -> None:
    mu, logvar = _posterior()
    a = losses.reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    b = losses.reparameterize(mu, logvar, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, mu)


def test_mixture_log_density_is_the_two_component_density_of_the_joint() -> None:
    """1/2 q + 1/2 q_w over two levels, against scipy's Gaussians: each component is the product over levels."""
    import numpy as np
    from scipy import stats

    g = torch.Generator().manual_seed(0)
    levels = [(torch.randn(5, d, generator=g), torch.randn(5, d, generator=g), torch.randn(5, d, generator=g))
              for d in (3, 2)]

    def component(scale: float) -> np.ndarray:
        return sum(stats.norm.logpdf(z.numpy(), mu.numpy(), scale * np.exp(0.5 * lv.numpy())).sum(1)
                   for z, mu, lv in levels)

    want = np.logaddexp(component(1.0), component(2.0)) - math.log(2)
    torch.testing.assert_close(losses.mixture_log_density(levels, 2.0).double(), torch.from_numpy(want), atol=1e-5, rtol=0)
    torch.testing.assert_close(losses.mixture_log_density(levels, 1.0).double(), torch.from_numpy(component(1.0)),
                               atol=1e-5, rtol=0)


def test_proposal_shift_draws_each_component_half_the_time() -> None:
    g = torch.Generator().manual_seed(0)
    shift = losses.proposal_shift(20_000, 2.0, g, torch.device("cpu"))
    assert shift.shape == (20_000, 1)
    assert shift.unique().tolist() == pytest.approx([0.0, 2 * math.log(2.0)])
    assert abs(float((shift > 0).double().mean()) - 0.5) < 0.02  # 4 standard errors
    state = g.get_state()
    assert losses.proposal_shift(10, 1.0, g, torch.device("cpu")) == 0.0  # q alone: nothing drawn
    assert torch.equal(g.get_state(), state)


def test_kl_penalty_free_bits_floor_per_dimension() -> None:
    kl_dims = torch.tensor([[0.1, 2.0, 0.0], [0.3, 4.0, 0.0]])  # batch means: 0.2, 3.0, 0.0
    assert losses.kl_penalty(kl_dims).item() == pytest.approx(3.2)
    assert losses.kl_penalty(kl_dims, free_bits=0.5).item() == pytest.approx(0.5 + 3.0 + 0.5)


def test_active_units_counts_varying_dimensions() -> None:
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(500, 5, generator=g) * torch.tensor(
        [1.0, 0.5, 0.05, 0.0, 0.3]
    )  # variances 1, .25, .0025, 0, .09
    assert losses.active_units(mu).item() == 3
    assert losses.active_units_of(lambda x: x, mu, batch_size=64) == 3


def test_nearest_code_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(50, 4, generator=g), torch.randn(16, 4, generator=g)
    expected = torch.cdist(z, codebook).argmin(1)
    assert torch.equal(losses.nearest_code(z, codebook), expected)


def test_straight_through_value_and_gradient() -> None:
    z_e = torch.randn(3, 2, requires_grad=True)
    z_q = torch.randn(3, 2)
    out = losses.straight_through(z_e, z_q)
    torch.testing.assert_close(out, z_q)
    upstream = torch.randn(3, 2)
    out.backward(upstream)
    torch.testing.assert_close(z_e.grad, upstream)


def test_code_counts_and_perplexity() -> None:
    idx = torch.tensor([0, 2, 2, 5, 2])
    assert torch.equal(losses.code_counts(idx, 6), torch.bincount(idx, minlength=6).float())
    k = 8
    uniform = losses.code_counts(torch.arange(k).repeat(5), k)
    assert losses.perplexity(uniform).item() == pytest.approx(k)
    assert losses.perplexity(losses.code_counts(torch.full((10,), 3), k)).item() == pytest.approx(1.0)
    p = torch.tensor([1 / 5, 3 / 5, 1 / 5])
    assert losses.perplexity(losses.code_counts(idx, 6)).item() == pytest.approx(
        math.exp(-(p * p.log()).sum().item())
    )


def test_vae_terms_weight_zero_leaves_kl_out() -> None:
    recon = torch.tensor(3.0, requires_grad=True)
    kl_dims = torch.full((4, 2), 0.25, requires_grad=True)
    terms = losses.vae_terms(recon, kl_dims, torch.zeros(4, 2), weight=0.0, free_bits=0.0)
    assert terms["loss"] is recon and terms["kl"].item() == pytest.approx(0.5)
    assert terms["elbo"].item() == pytest.approx(-(3.0 + 0.5))
    terms = losses.vae_terms(recon, kl_dims, torch.zeros(4, 2), weight=2.0, free_bits=0.0)
    assert terms["loss"].item() == pytest.approx(3.0 + 2 * 0.5)
