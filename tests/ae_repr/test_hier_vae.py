"""Hierarchical VAE math: level layout, per-level KLs, top-down prior sampling, decode of features."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch.distributions import Normal, kl_divergence

from ae_repr.models import build_model, model_config
from ae_repr.models.hier_vae import HierVAE

SHAPE = (12,)


def _hvae(**fields: object) -> HierVAE:
    torch.manual_seed(0)
    cfg = model_config("hier_vae", **{"latent_dim": 9, "level_dims": (2, 3, 4), "hidden": (32,), **fields})
    model = build_model("hier_vae", cfg, SHAPE, "bernoulli")
    assert isinstance(model, HierVAE)
    return model


def _x(n: int = 16) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(1))


def test_level_dims_default_and_validation() -> None:
    assert model_config("hier_vae", latent_dim=16).resolved_level_dims() == (8, 8)
    assert model_config("hier_vae", latent_dim=15).resolved_level_dims() == (8, 7)
    with pytest.raises(ValidationError, match="sum to 7, not latent_dim 8"):
        model_config("hier_vae", latent_dim=8, level_dims=(3, 4))
    with pytest.raises(ValidationError, match="at least two"):
        model_config("hier_vae", latent_dim=8, level_dims=(8,))
    with pytest.raises(ValidationError, match="latent_dim >= 2"):
        model_config("hier_vae", latent_dim=1)


def test_level_kls_match_their_distributions_and_sum_to_kl() -> None:
    model = _hvae()
    x = _x()
    torch.manual_seed(5)
    out = model.loss(x)
    torch.manual_seed(5)  # the same draws again, to read each level's prior and posterior
    _, levels = model.infer(x)
    assert [lv.mu_q.shape[1] for lv in levels] == [2, 3, 4]
    for i, lv in enumerate(levels):
        q = Normal(lv.mu_q, (0.5 * lv.logvar_q).exp())
        if lv.mu_p is None:
            assert i == len(levels) - 1  # only the top level has the fixed N(0, I) prior
            p = Normal(torch.zeros_like(lv.mu_q), torch.ones_like(lv.mu_q))
        else:
            p = Normal(lv.mu_p, (0.5 * lv.logvar_p).exp())
        expected = kl_divergence(q, p).sum(1).mean()
        assert out[f"kl_{i}"].item() == pytest.approx(expected.item(), rel=1e-5)
    total = sum(out[f"kl_{i}"] for i in range(3))
    assert out["kl"].item() == pytest.approx(total.item(), rel=1e-6)
    assert "kl_3" not in out


def test_posterior_equal_to_prior_gives_zero_lower_kl() -> None:
    model = _hvae()
    with torch.no_grad():  # residual posterior with a zero residual is the prior itself
        for head in model.posteriors:
            head.weight.zero_()
            head.bias.zero_()
    out = model.loss(_x())
    assert out["kl_0"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kl_1"].item() == pytest.approx(0.0, abs=1e-6)
    assert out["kl_2"].item() > 1e-3


def test_schedules_weight_and_floor_the_summed_kl() -> None:
    model = _hvae(beta=2.0)
    x = _x()
    out = model.loss(x, kl_weight=0.0)
    assert torch.equal(out["loss"].detach(), out["recon"]) and out["kl"].item() > 0
    torch.manual_seed(1)
    out = model.loss(x, kl_weight=0.5)
    assert out["loss"].item() == pytest.approx((out["recon"] + out["kl"]).item(), rel=1e-6)
    torch.manual_seed(1)
    floored = model.loss(x, kl_weight=0.5, free_bits=100.0)  # every dimension below the floor
    assert floored["loss"].item() == pytest.approx(floored["recon"].item() + 9 * 100.0, rel=1e-6)


def test_encode_concatenates_posterior_means_bottom_first_and_decode_reads_them() -> None:
    model = _hvae()
    x = _x()
    state, levels = model.infer(x, sample=False)
    z = model.encode(x)
    assert z.shape == (16, 9)
    torch.testing.assert_close(z, torch.cat([lv.mu_q for lv in levels], dim=1))
    torch.testing.assert_close(z[:, :2], levels[0].mu_q)  # bottom level first
    # decoding the feature vector walks the same top-down path as inference did
    torch.testing.assert_close(model.decode(z), model.likelihood.mean(model.decoder(state)))


def test_prior_sample_shape_and_reproducibility() -> None:
    model = _hvae()
    s = model.sample(7, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, *SHAPE) and 0 <= s.min() and s.max() <= 1
    assert torch.equal(s, model.sample(7, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(s, model.sample(7, generator=torch.Generator().manual_seed(1)))
