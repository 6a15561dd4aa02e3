"""The WAE's math: its MMD against an independent computation, the loss it reports, its prior."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ae_repr.models import GaussianPosterior, Prior, build_model, model_config
from ae_repr.models.wae import imq_mmd

SHAPE = (10,)


def _model(**fields):
    torch.manual_seed(0)
    return build_model("wae", model_config("wae", **{"latent_dim": 3, "hidden": (16,), **fields}), SHAPE, "gaussian")


def _mmd_by_loops(a: np.ndarray, b: np.ndarray, scales: list[float]) -> float:
    """MMD^2 written out from the definition: mean kernel over distinct pairs within each sample, minus twice
    the mean over all cross pairs (Gretton et al. 2012, eq. 3), IMQ kernel summed over scales."""
    def k(x, y):
        d = float(((x - y) ** 2).sum())
        return sum(c / (c + d) for c in scales)

    n, m = len(a), len(b)
    aa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    bb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    ab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
    return aa + bb - 2 * ab


def test_mmd_matches_the_definition():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 3)), rng.normal(1.0, 2.0, size=(5, 3))
    scales = [0.6, 6.0, 60.0]
    got = float(imq_mmd(torch.from_numpy(a), torch.from_numpy(b), scales))
    assert got == pytest.approx(_mmd_by_loops(a, b, scales), rel=1e-10)


def test_mmd_separates_distributions():
    g = torch.Generator().manual_seed(0)
    same = imq_mmd(torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g), [8.0])
    shifted = imq_mmd(torch.randn(400, 4, generator=g) + 1.0, torch.randn(400, 4, generator=g), [8.0])
    assert abs(float(same)) < 0.01 < float(shifted)  # unbiased: about 0 when both sides share a distribution


def test_loss_is_recon_plus_weighted_mmd_against_the_prior():
    model = _model(mmd_weight=7.0, prior_std=2.0, kernel_scales=(0.5, 1.0))
    x = torch.randn(12, *SHAPE, generator=torch.Generator().manual_seed(1))
    terms = model.loss(x, generator=torch.Generator().manual_seed(2))
    assert set(terms) == {"loss", "recon", "mmd"}
    # the same prior draws, by hand: N(0, 2^2 I), C = s * 2 * d * std^2
    prior = 2.0 * torch.randn(12, 3, generator=torch.Generator().manual_seed(2))
    want = imq_mmd(model.encode(x).detach(), prior, [0.5 * 24.0, 1.0 * 24.0])
    torch.testing.assert_close(terms["mmd"], want)
    torch.testing.assert_close(terms["loss"], terms["recon"] + 7.0 * terms["mmd"])
    assert set(_model(mmd_weight=0.0).loss(x)) == {"loss", "recon"}  # a zero-weight term is not computed
    assert float(model.loss(x[:1])["mmd"]) == 0.0  # one row: no unbiased MMD, same keys


def test_a_prior_but_no_posterior():
    model = _model(prior_std=0.5).eval()
    assert isinstance(model, Prior) and not isinstance(model, GaussianPosterior)
    assert model.latent_geometry == "spherical"
    z = model.prior_draws(20_000, torch.Generator().manual_seed(0))
    assert float(z.std()) == pytest.approx(0.5, rel=0.02)
    s = model.sample(4, torch.Generator().manual_seed(0))
    assert s.shape == (4, *SHAPE) and torch.equal(s, model.sample(4, torch.Generator().manual_seed(0)))
