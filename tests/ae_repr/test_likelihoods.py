"""The observation likelihoods are proper distributions of the data, checked against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Bernoulli, Normal

from ae_repr.data import Normalizer
from ae_repr.likelihoods import MIN_LOG_SCALE, Likelihood, likelihood_for
from ae_repr.models import build_model, model_config


def _raw(b: int, d: int, seed: int = 0, spread: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, d, generator=g, dtype=torch.float64) * spread


@pytest.mark.parametrize("levels", [2, 17, 256])
def test_discretized_logistic_sums_to_one_over_a_pixels_levels(levels: int) -> None:
    lik = Likelihood("discretized_logistic", levels)
    raw = _raw(6, 5, spread=3.0)
    raw[:, 1] -= 3.0  # narrow and wide scales, locations inside and far outside [0, 1]
    grid = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    total = torch.zeros(6, 5, dtype=torch.float64)
    for v in grid:  # one element at a time: log_prob sums over elements
        for j in range(5):
            lp = lik.log_prob(raw[:, :, j : j + 1], torch.full((6, 1), float(v), dtype=torch.float64))
            total[:, j] += lp.exp()
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-5, rtol=0)


def test_discretized_logistic_matches_the_logistic_cdf_by_hand() -> None:
    levels, loc, log_s = 17, 0.4, -2.0
    lik = Likelihood("discretized_logistic", levels)
    raw = torch.tensor([[[loc], [log_s]]], dtype=torch.float64)
    s = math.exp(MIN_LOG_SCALE + math.log1p(math.exp(log_s - MIN_LOG_SCALE)))  # the soft floor, by hand
    cdf = lambda v: 1 / (1 + math.exp(-(v - loc) / s))  # noqa: E731
    h = 0.5 / (levels - 1)
    for k, expected in ((0, cdf(h)), (5, cdf(5 / 16 + h) - cdf(5 / 16 - h)), (16, 1 - cdf(1 - h))):
        got = lik.log_prob(raw, torch.tensor([[k / 16]], dtype=torch.float64)).exp().item()
        assert got == pytest.approx(expected, rel=1e-9)


def test_gaussian_is_a_normal_with_the_decoded_scale_and_integrates_to_one() -> None:
    lik = Likelihood("gaussian")
    raw = _raw(4, 3, seed=1)
    x = torch.randn(4, 3, dtype=torch.float64)
    scale = (MIN_LOG_SCALE + torch.nn.functional.softplus(raw[:, 1] - MIN_LOG_SCALE)).exp()
    expected = Normal(raw[:, 0], scale).log_prob(x).sum(1)
    torch.testing.assert_close(lik.log_prob(raw, x).double(), expected)
    one = torch.tensor([[[0.3], [-0.5]]], dtype=torch.float64)
    grid = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    density = lik.log_prob(one.expand(len(grid), 2, 1), grid[:, None]).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-6)


def test_bernoulli_is_the_bernoulli_of_its_logits() -> None:
    lik = Likelihood("bernoulli")
    logits = torch.randn(5, 1, 1, 3, 3)
    x = (torch.rand(5, 1, 3, 3) > 0.5).float()
    torch.testing.assert_close(lik.log_prob(logits, x), Bernoulli(logits=logits[:, 0]).log_prob(x).flatten(1).sum(1))
    torch.testing.assert_close(lik.mean(logits), torch.sigmoid(logits[:, 0]))
    assert lik.params == 1 and Likelihood("gaussian").params == 2


def test_auto_choice_follows_the_data() -> None:
    grey = np.random.default_rng(0).integers(0, 17, size=(50, 1, 4, 4)).astype(np.uint8)
    assert likelihood_for(grey, images=True) == Likelihood("discretized_logistic", 17)
    binary = (grey > 8).astype(np.uint8) * 255
    assert likelihood_for(binary, images=True) == Likelihood("bernoulli")
    assert likelihood_for(grey.astype(np.float32) / 16, images=True) == Likelihood("gaussian")  # off an integer grid
    assert likelihood_for(grey.reshape(50, -1), images=False) == Likelihood("gaussian")  # tables are continuous
    with pytest.raises(ValueError, match="bernoulli needs binary data"):
        likelihood_for(grey, images=True, requested="bernoulli")
    with pytest.raises(ValueError, match="integer values"):
        likelihood_for(grey.astype(np.float32) / 16, images=True, requested="discretized_logistic")


def test_spec_round_trips_and_models_emit_one_raw_value_per_parameter() -> None:
    lik = Likelihood("discretized_logistic", 17)
    assert Likelihood.parse(str(lik)) == lik and Likelihood.parse("bernoulli") == Likelihood("bernoulli")
    for backbone, shape in (("conv", (1, 8, 8)), ("mlp", (10,))):
        model = build_model("vae", model_config("vae", latent_dim=4, backbone=backbone), shape, str(lik))
        assert model.likelihood == lik
        assert model.decoder(torch.zeros(3, 4)).shape == (3, 2, *shape)
        assert model.decode(torch.zeros(3, 4)).shape == (3, *shape)


def test_normalizer_jacobian_turns_a_normalized_density_into_the_raw_one() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, [0.5, 2.0, 10.0], size=(200, 3))
    norm = Normalizer.fit(x)
    lik = Likelihood("gaussian")
    raw = torch.zeros(200, 2, 3, dtype=torch.float64)  # N(0, 1) on the standardized data
    lp_norm = lik.log_prob(raw, torch.from_numpy(norm.numpy(x)).double()).numpy()
    log_scale = MIN_LOG_SCALE + np.log1p(np.exp(-MIN_LOG_SCALE))  # a raw log scale of 0 after the soft floor
    std = np.exp(log_scale) / norm.scale  # that normal's standard deviation in raw units
    direct = Normal(torch.from_numpy(norm.shift), torch.from_numpy(std)).log_prob(torch.from_numpy(x)).sum(1).numpy()
    np.testing.assert_allclose(lp_norm + norm.log_abs_det(3), direct, rtol=1e-5)
