"""Evaluation asks a model what it can do, never what class it is: a variant outside the built-in classes gets
every task its capabilities allow, and a note (not a crash, not a substitute) for the ones they do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ae_repr.checkpoint import LoadedModel
from ae_repr.config import EvalConfig
from ae_repr.data import Normalizer
from ae_repr.io import read_features, write_features
from ae_repr.models import (
    AnomalyScorer,
    Autoencoder,
    GaussianPosterior,
    Prior,
    Quantized,
    build_model,
    model_config,
)
from ae_repr.models.ae import AE
from evaluation.anomaly import model_scores
from evaluation.context import AppContext
from evaluation.generation import generation, interpolations
from evaluation.rate_distortion import rate_distortion

D, N, K = 6, 200, 3


class PriorAE(AE):
    """An autoencoder with a prior of its own (a unit Gaussian on the code) and no posterior."""

    latent_geometry = "spherical"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(torch.randn(n, self.latent_dim, generator=generator))


class ScoringAE(AE):
    """An autoencoder with an anomaly score of its own."""

    def anomaly_scores(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {"code_norm": self.encode(x).pow(2).sum(1)}


def _build(cls: type[AE]) -> AE:
    torch.manual_seed(0)
    return cls(model_config("ae", latent_dim=K, hidden=(8,)), (D,), "gaussian").eval()


def _ctx(tmp_path, model: Autoencoder, name: str) -> AppContext:
    x = np.random.default_rng(0).normal(size=(N, D)).astype(np.float32)
    split = np.where(np.arange(N) % 2 == 0, "test", "train")
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x)).numpy()
    path = write_features(tmp_path / f"{name}.parquet", sample_id=np.arange(N), split=split,
                          label=np.arange(N) % 2, z=z, metadata={"variant": name})
    normalizer = Normalizer(np.zeros(D), np.ones(D), "standard")
    cfg = EvalConfig(nll_samples=4, nll_max_rows=20, generation_samples=30)
    return AppContext(ff=read_features(path), x_raw=x, normalizer=normalizer, cfg=cfg,
                      loaded=LoadedModel(model, normalizer, {"variant": name}), name=name, seed=5)


def test_protocols_follow_methods_not_classes():
    plain, prior = _build(AE), _build(PriorAE)
    assert not isinstance(plain, Prior) and isinstance(prior, Prior)
    assert not isinstance(prior, GaussianPosterior)
    vae = build_model("vae", model_config("vae", latent_dim=K, hidden=(8,)), (D,), "gaussian")
    assert isinstance(vae, Prior) and isinstance(vae, GaussianPosterior)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("ae", set()),
        ("dae", set()),
        ("vae", {GaussianPosterior, Prior, AnomalyScorer}),
        ("beta_vae", {GaussianPosterior, Prior, AnomalyScorer}),
        ("vq_vae", {Quantized, AnomalyScorer}),
        ("hier_vae", {GaussianPosterior, Prior, AnomalyScorer}),
    ],
)
def test_builtin_variants_declare_their_capabilities(variant, expected):
    model = build_model(variant, model_config(variant, latent_dim=4, hidden=(8,)), (D,), "gaussian")
    assert {c for c in (GaussianPosterior, Prior, Quantized, AnomalyScorer) if isinstance(model, c)} == expected


def test_rate_distortion_without_a_posterior_is_a_note_not_a_crash(tmp_path):
    out = rate_distortion(_ctx(tmp_path, _build(PriorAE), "prior_ae"))
    assert out.frame.empty
    assert len(out.notes) == 1 and "rate_distortion not run" in out.notes[0] and "Gaussian posterior" in out.notes[0]


def test_generation_uses_the_models_own_prior_and_skips_the_likelihood_with_a_reason(tmp_path):
    model = _build(PriorAE)
    ctx = _ctx(tmp_path, model, "prior_ae")
    out = generation(ctx)
    assert "nll_is" not in set(out.frame["metric"])  # no posterior: no importance-sampled likelihood
    assert "nll_is not run: the model has no Gaussian posterior" in out.notes[0]
    assert "samples from the model's prior" in out.notes[0]
    with torch.no_grad():  # its own prior under the evaluation seed, not a Gaussian fitted to its codes
        want = model.sample(16, torch.Generator().manual_seed(5)).numpy()
    np.testing.assert_allclose(out.pictures["prior_ae/samples"], want, atol=1e-6)


def test_interpolation_follows_the_declared_geometry(tmp_path):
    spherical, linear = _build(PriorAE), _build(AE)  # same weights: only the declared geometry differs
    a = interpolations(_ctx(tmp_path, spherical, "s"))
    b = interpolations(_ctx(tmp_path, linear, "l"))
    np.testing.assert_allclose(a[:, [0, -1]], b[:, [0, -1]], atol=1e-5)  # same ends
    assert not np.allclose(a[:, 1:-1], b[:, 1:-1], atol=1e-4)  # different paths between them


def test_anomaly_scores_come_from_the_model_by_name():
    model = _build(ScoringAE)
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(0))
    scores = model_scores(model, x)
    assert set(scores) == {"reconstruction", "code_norm"}
    with torch.no_grad():
        np.testing.assert_allclose(scores["code_norm"], model.encode(x).pow(2).sum(1).double().numpy(), rtol=1e-6)
    assert set(model_scores(_build(AE), x)) == {"reconstruction"}
