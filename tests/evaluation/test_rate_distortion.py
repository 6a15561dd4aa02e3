"""Active units count latent dimensions by their KL, not by how much their posterior mean moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ae_repr.checkpoint import LoadedModel
from ae_repr.config import EvalConfig
from ae_repr.data import Normalizer
from ae_repr.io import read_features, write_features
from ae_repr.models import Autoencoder, build_model, model_config
from evaluation.context import AppContext
from evaluation.rate_distortion import THRESHOLD, active_unit_counts, rate_distortion

D, N = 4, 4000  # input width; rows (every other one in the test split)


def _ctx(tmp_path, model: Autoencoder, variant: str) -> tuple[AppContext, torch.Tensor]:
    """A context over standard-normal inputs with an identity normalizer, and the test rows' inputs."""
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    split = np.where(np.arange(N) % 2 == 0, "test", "train")
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x)).numpy()
    path = write_features(tmp_path / f"{variant}.parquet", sample_id=np.arange(N), split=split,
                          label=np.arange(N) % 2, z=z, metadata={"variant": variant})
    normalizer = Normalizer(np.zeros(D), np.ones(D), "standard")
    ctx = AppContext(ff=read_features(path), x_raw=x, normalizer=normalizer, cfg=EvalConfig(),
                     loaded=LoadedModel(model, normalizer, {"variant": variant}), name=variant)
    return ctx, torch.from_numpy(x[split == "test"])


def _values(frame) -> dict[str, float]:
    return dict(zip(frame["metric"], frame["value"], strict=True))


def test_active_unit_counts_by_level():
    kl = np.array([0.5, 0.0, 0.011, 0.009, 2.0, 0.0, 0.02])
    assert active_unit_counts(kl) == {"active_units": 4}
    assert active_unit_counts(kl, (3, 4)) == {"active_units": 4, "active_units_0": 2, "active_units_1": 2}


def test_vae_counts_dims_by_kl_not_by_mean_variance(tmp_path):
    torch.manual_seed(0)
    model = build_model("vae", model_config("vae", latent_dim=4, hidden=()), (D,), "gaussian").eval()
    (enc,) = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]  # x -> (mu, logvar)
    # dim 0: mu = x0, unit variance: informative. dims 1, 3: mu = 0.12 x, so its variance (0.0144) passes
    # the old 0.01 test, but KL = mu^2 / 2 is ~0.007 nats: almost nothing. dim 2: mu = 0.02 x2 hardly
    # moves (variance 0.0004), but logvar = -1 puts ~0.18 nats in it.
    weight = torch.zeros(8, D)
    weight[0, 0], weight[1, 1], weight[2, 2], weight[3, 3] = 1.0, 0.12, 0.02, 0.12
    bias = torch.zeros(8)
    bias[4 + 2] = -1.0
    with torch.no_grad():
        enc.weight.copy_(weight)
        enc.bias.copy_(bias)
    ctx, x = _ctx(tmp_path, model, "vae")
    with torch.no_grad():
        mu, logvar = model.posterior(x)
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).mean(0)  # closed form per dim, (4,)
    variance = mu.var(0, correction=0)
    assert (kl > THRESHOLD).tolist() == [True, False, True, False]
    assert (variance > 0.01).tolist() == [True, True, False, True]  # what the old count used: 3 units
    out = rate_distortion(ctx)
    values = _values(out.frame)
    assert set(values) == {"rate", "distortion", "active_units"}  # one level: no per-level rows
    assert values["active_units"] == 2
    assert values["rate"] == pytest.approx(float(kl.sum()), rel=1e-5)
    assert "mean KL > 0.01 nats" in out.notes[0]


def test_hier_vae_level_that_follows_its_prior_is_inactive(tmp_path):
    torch.manual_seed(0)
    cfg = model_config("hier_vae", latent_dim=5, level_dims=(3, 2), hidden=(16,))
    model = build_model("hier_vae", cfg, (D,), "gaussian").eval()
    with torch.no_grad():
        model.posteriors[0].weight.zero_()  # bottom posterior = its conditional prior: KL exactly 0
        model.posteriors[0].bias.zero_()
        model.priors[0].weight.mul_(10.0)  # ... whose mean follows the top level, so it varies a lot
    ctx, x = _ctx(tmp_path, model, "hier_vae")
    with torch.no_grad():
        mu = model.encode(x)  # (n, 5), bottom level first
        feat = model.encoder(x)  # the bottom-up path up to the top level
        for block in model.bottom_up:
            feat = block(feat)
        top_mu, top_logvar = model.top_posterior(feat).chunk(2, dim=1)
    top_kl = 0.5 * (top_mu.pow(2) + top_logvar.exp() - 1 - top_logvar).mean(0)  # (2,)
    assert (mu[:, :3].var(0, correction=0) > 0.01).all()  # the old count took all 3 bottom dims as active
    out = rate_distortion(ctx)
    values = _values(out.frame)
    np.testing.assert_allclose(out.pictures["hier_vae/kl_per_dim"][:3], 0.0, atol=1e-6)
    np.testing.assert_allclose(out.pictures["hier_vae/kl_per_dim"][3:], top_kl.numpy(), rtol=1e-4)
    expected_top = int((top_kl > THRESHOLD).sum())
    assert expected_top == 2  # the untrained top level does carry KL
    assert values["active_units_0"] == 0
    assert values["active_units_1"] == expected_top
    assert values["active_units"] == expected_top
    assert "0/2 per level, bottom first" in out.notes[0]
