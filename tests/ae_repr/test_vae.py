"""VAE / beta-VAE math: beta scaling, warm-up, free bits, ELBO, active units, posterior mean."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ae_repr.losses import active_units_of
from ae_repr.models import build_model, model_config
from ae_repr.models.vae import VAE

SHAPE = (1, 8, 8)


def _vae(variant: str = "vae", likelihood: str = "bernoulli", **fields: object) -> VAE:
    torch.manual_seed(0)
    model = build_model(variant, model_config(variant, **{"latent_dim": 6, **fields}), SHAPE, likelihood)
    assert isinstance(model, VAE)
    return model


def _x(n: int = 16) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def _loss(model: VAE, x: torch.Tensor, seed: int = 3, **schedule: float) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return model.loss(x, **schedule)


def _zero_posterior(model: VAE) -> None:
    """Make q(z|x) = N(0, I) for every x: the encoder's last layer outputs zeros."""
    last = model.encoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()


def test_beta_one_is_exactly_the_vae() -> None:
    vae, beta = _vae("vae"), _vae("beta_vae", beta=1.0)
    beta.load_state_dict(vae.state_dict())
    x = _x()
    a, b = _loss(vae, x), _loss(beta, x)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["kl"], b["kl"])


def test_beta_vae_default_weights_kl_by_four() -> None:
    model = _vae("beta_vae")
    assert model.cfg.beta == 4.0
    out = _loss(model, _x())
    assert out["loss"].item() == pytest.approx((out["recon"] + 4.0 * out["kl"]).item(), rel=1e-6)
    half = _loss(model, _x(), kl_weight=0.5)  # warm-up halfway: beta * 0.5
    assert half["loss"].item() == pytest.approx((half["recon"] + 2.0 * half["kl"]).item(), rel=1e-6)


def test_kl_warmup_zero_drops_kl_from_total() -> None:
    model = _vae()
    out = _loss(model, _x(), kl_weight=0.0)
    assert out["kl"].item() > 0
    assert torch.equal(out["loss"].detach(), out["recon"])


def test_free_bits_raise_kl_term_to_floor() -> None:
    model = _vae(latent_dim=6)
    _zero_posterior(model)
    out = _loss(model, _x(), free_bits=0.5)
    assert out["kl"].item() == 0.0  # reported KL is the real one
    assert out["loss"].item() == pytest.approx(out["recon"].item() + 6 * 0.5, rel=1e-6)
    # a dimension above the floor counts with its own KL
    assert _loss(model, _x(), free_bits=0.0)["loss"].item() == pytest.approx(out["recon"].item(), rel=1e-6)


def test_kl_and_elbo_match_independent_computation() -> None:
    for likelihood in ("bernoulli", "gaussian"):
        model = _vae(likelihood=likelihood)
        x = _x()
        out = _loss(model, x)
        mu, logvar = model.posterior(x)
        kl = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(1).mean()
        assert out["kl"].item() == pytest.approx(kl.item(), rel=1e-5)
        # recon is the exact NLL (constants included), so the ELBO is -(recon + KL)
        assert out["elbo"].item() == pytest.approx(-(out["recon"] + out["kl"]).item(), rel=1e-6)


def test_recon_uses_target_not_input() -> None:
    model = _vae()
    x = _x()
    a = _loss(model, x, seed=4)
    torch.manual_seed(4)  # same draw of z
    c = model.loss(x, target=torch.zeros_like(x))
    assert a["kl"].item() == pytest.approx(c["kl"].item()) and a["recon"].item() != pytest.approx(
        c["recon"].item()
    )


def test_active_units_batch_and_whole_data() -> None:
    model = _vae(latent_dim=6)
    head = model.encoder[-1]  # rows 0..5: mu, 6..11: logvar
    with torch.no_grad():
        head.weight[3:6].zero_()
        head.bias[3:6].zero_()
        head.weight[:3] *= 100  # variance of the first three means well above 0.01
    x = _x(64)
    assert _loss(model, x)["active_units"].item() == 3
    assert active_units_of(model.encode, x, batch_size=10) == 3


def test_encode_is_posterior_mean_and_deterministic() -> None:
    model = _vae()
    x = _x()
    assert torch.equal(model.encode(x), model.posterior(x)[0])
    assert torch.equal(model.encode(x), model.encode(x))


def test_prior_sample_shape_and_range() -> None:
    model = _vae()
    s = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (5, *SHAPE) and s.min() >= 0 and s.max() <= 1
    assert torch.equal(s, model.sample(5, generator=torch.Generator().manual_seed(0)))
