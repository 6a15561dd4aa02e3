"""Generation and rate-distortion: importance-sampled NLL against closed forms, fitted priors,
interpolations, traversals, sample-quality metrics and the two tasks end to end."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from eval_synth import D, Synth, write_ff
from scipy import stats
from torch import nn

from ae_repr.checkpoint import LoadedModel, load_model, save_model
from ae_repr.config import EvalConfig
from ae_repr.data import Normalizer
from ae_repr.io import read_features, write_features
from ae_repr.likelihoods import MIN_LOG_SCALE, Likelihood
from ae_repr.losses import gaussian_kl, repeat_rows
from ae_repr.models import REGISTRY, build_model, model_config
from evaluation.context import AppContext, make_context
from evaluation.generation import (
    factorized_nll,
    generation,
    generation_reference,
    interpolations,
    log_weights,
    nll_is,
    nll_mc_variance,
    prior_samples,
    probability_metrics,
    quality_metrics,
    slerp,
    traversals,
)
from evaluation.rate_distortion import rate_distortion

IMAGE = (1, 8, 8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _value(frame, metric: str) -> float:
    return float(frame.loc[frame["metric"] == metric, "value"].item())


# --- nll_is against a linear-Gaussian model -----------------------------------------------------


def _linear_gaussian(perturb: bool):
    """A VAE whose decoder is x = W z + b with unit noise, so p(x) = N(b, W W^T + I), and its exact
    (or perturbed) posterior as the encoder; W has orthogonal columns, making the posterior diagonal."""
    torch.manual_seed(0)
    model = build_model("vae", model_config("vae", latent_dim=2, hidden=()), (4,), "gaussian").eval()
    dec, enc = model.decoder[0], model.encoder[1]  # the decoder emits (mean, log std) per element: 2 x 4 outputs
    assert isinstance(dec, nn.Linear) and isinstance(enc, nn.Linear) and len(model.decoder) == 2
    f64 = torch.float64
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=f64))
    s = torch.tensor([2.0, 0.7], dtype=f64)
    w, b = q[:, :2] * s, torch.randn(4, dtype=f64)
    post_var = 1.0 / (1.0 + s**2)  # (I + W^T W)^{-1}, diagonal
    a = post_var[:, None] * w.T  # posterior mean = a (x - b)
    with torch.no_grad():
        dec.weight.copy_(torch.cat([w, torch.zeros(4, 2, dtype=f64)]))
        unit = math.log(math.expm1(-MIN_LOG_SCALE)) + MIN_LOG_SCALE  # the raw log std the soft floor maps to 0
        dec.bias.copy_(torch.cat([b, torch.full((4,), unit, dtype=f64)]))
        enc.weight.copy_(torch.cat([a, torch.zeros(2, 4, dtype=f64)]))
        enc.bias.copy_(torch.cat([-a @ b, post_var.log()]))
        if perturb:
            enc.weight[:2] += 0.1 * torch.randn(2, 4)
            enc.bias[:2] += 0.3
            enc.bias[2:] += 0.5  # a wider proposal keeps the importance weights bounded
    marginal = torch.distributions.MultivariateNormal(b, w @ w.T + torch.eye(4, dtype=f64))
    x = marginal.sample((8,)).float()
    return model, x, marginal.log_prob(x.double()).float()


def test_nll_is_exact_with_the_true_posterior():
    model, x, log_px = _linear_gaussian(perturb=False)
    lw = log_weights(model, x, 5, generator=_gen(), chunk=2)
    assert lw.shape == (5, 8)
    torch.testing.assert_close(lw, log_px.expand(5, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(nll_is(model, x, 3, generator=_gen()), -log_px, atol=1e-4, rtol=0)


def test_nll_is_converges_with_a_perturbed_posterior():
    model, x, log_px = _linear_gaussian(perturb=True)
    nll = nll_is(model, x, 5000, generator=_gen(), chunk=1000)
    assert (nll + log_px).abs().max() < 0.05
    elbo = log_weights(model, x, 2000, generator=_gen(1)).mean(0)
    assert (log_px - elbo).min() > 0.1  # the bound is clearly loose where the estimate is not


def test_nll_is_with_the_mixture_proposal_converges_where_q_is_too_narrow():
    """A posterior narrower than the true one (standard deviations times 1/e) makes q's weights heavy-tailed:
    1000 draws from q still leave the bound loose, while the defensive mixture with q_2 gets within 0.15 nats of
    the exact NLL on every row."""
    model, x, log_px = _linear_gaussian(perturb=False)
    with torch.no_grad():
        model.encoder[-1].bias[2:] -= 2.0  # log-variances
    q_only = nll_is(model, x, 1000, generator=_gen(1), chunk=1000)
    mixture = nll_is(model, x, 1000, generator=_gen(1), chunk=1000, widen=2.0)
    assert float((q_only + log_px).mean()) > 0.15
    assert float((mixture + log_px).abs().max()) < 0.15


def test_nll_is_hier_vae_mixture_proposal_settles_below_q():
    """On a hier_vae whose posterior is far from the true one, the mixture's estimate has settled by 1000 draws
    (within 0.05 nats of 5000 draws' mean) where q's is still falling, and lies below q's at 5000."""
    torch.manual_seed(0)
    model = build_model("hier_vae", model_config("hier_vae", latent_dim=4, hidden=(16,)), (6,), "gaussian").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.6)
    x = torch.randn(32, 6)
    mix = [float(nll_is(model, x, s, generator=_gen(1), chunk=1000, widen=2.0).mean()) for s in (1000, 5000)]
    q_only = [float(nll_is(model, x, s, generator=_gen(1), chunk=1000).mean()) for s in (1000, 5000)]
    assert abs(mix[0] - mix[1]) < 0.05
    assert q_only[0] - q_only[1] > 0.05
    assert mix[1] < q_only[1] - 0.03


def test_nll_is_hier_vae_below_elbo_and_decreasing():
    torch.manual_seed(0)
    model = build_model("hier_vae", model_config("hier_vae", latent_dim=4, hidden=(16,)), (6,), "gaussian").eval()
    with torch.no_grad():  # larger weights: a posterior far from the true one, so more draws clearly pay
        for p in model.parameters():
            p.mul_(1.6)
    x = torch.randn(32, 6)
    lw = log_weights(model, x, 50, generator=_gen())
    nll = nll_is(model, x, 50, generator=_gen())  # the same draws
    assert torch.isfinite(nll).all()
    assert (nll <= -lw.mean(0) + 1e-9).all()  # Jensen, draw by draw
    means = [float(nll_is(model, x, s, generator=_gen(s)).mean()) for s in (1, 10, 100)]
    assert means[0] > means[1] > means[2]
    assert math.isclose(means[0], float(-log_weights(model, x, 1, generator=_gen(1)).mean()), rel_tol=1e-6)


@pytest.mark.parametrize("variant", ["vae", "hier_vae"])
def test_log_weight_draws_share_one_encoder_pass(variant):
    """S draws per row from one encoder pass are the draws of S stacked copies of the rows, in the same order."""
    torch.manual_seed(0)
    model = build_model(variant, model_config(variant, latent_dim=4), IMAGE, "bernoulli").eval()
    x = torch.rand(5, *IMAGE)
    with torch.inference_mode():
        shared = model.log_weight(x, _gen(3), draws=4)
        stacked = model.log_weight(repeat_rows(x, 4), _gen(3))
    assert shared.shape == (20,)
    torch.testing.assert_close(shared, stacked, atol=1e-4, rtol=1e-5)
    assert shared.reshape(4, 5).std(0).min() > 0  # the draws differ


# --- priors on tiny image models ----------------------------------------------------------------


def _image_ctx(tmp_path, variant: str, *, n: int = 60) -> AppContext:
    """A tiny untrained model over (1, 8, 8) images in an application context (two labels)."""
    torch.manual_seed(0)
    extra = {"code_dim": 2, "codebook_size": 8} if variant == "vq_vae" else {}
    cfg = model_config(variant, latent_dim=4, hidden=(16,), channels=(4,), **extra)
    model = build_model(variant, cfg, IMAGE, "bernoulli").eval()
    rng = np.random.default_rng(0)
    y = np.arange(n) % 2
    x = (rng.random((n, *IMAGE)) * 0.3 + 0.6 * y[:, None, None, None]).astype(np.float32)
    if variant == "vq_vae":  # codes taken from encoder outputs, so several are in use
        with torch.no_grad():
            model.codebook.copy_(model.encoder(torch.from_numpy(x)).reshape(-1, 2)[::13][:8])
    split = np.where(np.arange(n) % 3 == 0, "test", "train")
    with torch.no_grad():
        z = model.encode(torch.from_numpy(x)).numpy()
    path = write_features(
        tmp_path / f"{variant}.parquet", sample_id=np.arange(n), split=split, label=y, z=z,
        metadata={"variant": variant},
    )
    normalizer = Normalizer(np.array(0.0), np.array(1.0), "minmax")
    loaded = LoadedModel(model, normalizer, {"variant": variant})
    return AppContext(ff=read_features(path), x_raw=x, normalizer=normalizer, cfg=EvalConfig(), loaded=loaded,
                      name=variant)


@pytest.mark.parametrize("variant", sorted(REGISTRY))
def test_prior_samples_every_variant(tmp_path, variant):
    ctx = _image_ctx(tmp_path, variant)
    state = torch.get_rng_state()
    a = prior_samples(ctx, 5, _gen())
    assert a.shape == (5, *IMAGE) and torch.isfinite(a).all()
    torch.testing.assert_close(prior_samples(ctx, 5, _gen()), a, rtol=0, atol=0)  # seeded by the generator
    assert torch.equal(torch.get_rng_state(), state)


def test_vq_prior_matches_train_code_frequencies(tmp_path):
    ctx = _image_ctx(tmp_path, "vq_vae")
    model = ctx.model
    with torch.no_grad():
        train_idx = model.code_indices(torch.from_numpy(ctx.x_raw[ctx.rows("train")])).numpy()  # (N, P)
    seen = []
    decode_codes = model.decode_codes
    model.decode_codes = lambda idx: seen.append(idx.clone()) or decode_codes(idx)
    prior_samples(ctx, 20000, _gen())
    drawn = seen[0].numpy()  # (n, P)
    assert drawn.shape == (20000, model.positions)
    for p in range(model.positions):
        want = np.bincount(train_idx[:, p], minlength=8) / len(train_idx)
        got = np.bincount(drawn[:, p], minlength=8) / len(drawn)
        assert (want > 0).sum() >= 2
        np.testing.assert_allclose(got, want, atol=0.015)
        assert not got[want == 0].any()


def test_deterministic_prior_matches_train_code_moments(tmp_path):
    ctx = _image_ctx(tmp_path, "ae")
    model = ctx.model
    seen = []
    decode = model.decode
    model.decode = lambda z: seen.append(z.clone()) or decode(z)
    prior_samples(ctx, 40000, _gen())
    z = seen[0].double().numpy()
    train = ctx.ff.z[ctx.rows("train")].astype(np.float64)
    scale = train.std(0).max()
    np.testing.assert_allclose(z.mean(0), train.mean(0), atol=0.02 * scale)
    np.testing.assert_allclose(np.cov(z, rowvar=False), np.cov(train, rowvar=False), atol=0.03 * scale**2)


# --- interpolations and traversals ---------------------------------------------------------------


def test_slerp_endpoints_and_arc():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [2.0, 2.0, 0.0]])  # the last pair is parallel
    out = slerp(a, b, torch.tensor([0.0, 0.5, 1.0]))
    assert out.shape == (3, 3, 3)
    torch.testing.assert_close(out[:, 0], a)
    torch.testing.assert_close(out[:, -1], b)
    torch.testing.assert_close(out[0, 1], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))  # on the unit circle
    torch.testing.assert_close(out[1, 1], torch.tensor([0.0, 2.0, 2.0]) / math.sqrt(2))
    torch.testing.assert_close(out[2, 1], torch.tensor([1.5, 1.5, 0.0]))  # parallel: linear


@pytest.mark.parametrize("variant", ["vae", "vq_vae", "ae"])
def test_interpolation_ends_are_reconstructions_of_different_labels(tmp_path, variant):
    ctx = _image_ctx(tmp_path, variant)
    grid = interpolations(ctx, pairs=3, steps=5)
    assert grid.shape == (3, 5, *IMAGE) and grid.dtype == np.float32
    test = ctx.rows("test")
    with torch.no_grad():
        recon = ctx.model.reconstruct(ctx.inputs(test)).numpy().reshape(len(test), -1)
    for pair in grid:
        ends = []
        for img in (pair[0], pair[-1]):
            dist = np.abs(recon - img.reshape(1, -1)).max(1)
            assert dist.min() < 1e-5
            ends.append(test[dist.argmin()])
        assert ctx.labels[ends[0]] != ctx.labels[ends[1]]
        if variant != "vq_vae":  # few codes: a middle frame may quantize onto an end
            assert not np.allclose(pair[2], pair[0], atol=1e-4)  # the middle moves


@pytest.mark.parametrize("variant", ["ae", "vae", "hier_vae"])
def test_traversals_move_the_chosen_dims(tmp_path, variant):
    ctx = _image_ctx(tmp_path, variant)
    model = ctx.model
    seen = []
    decode = model.decode
    model.decode = lambda z: seen.append(z.clone()) or decode(z)
    grid, dims = traversals(ctx, dims=3, steps=5, span=2.0)
    assert grid.shape == (3, 5, *IMAGE) and dims.dtype == np.int64
    z = seen[0].double().numpy().reshape(3, 5, -1)
    test = ctx.inputs(ctx.rows("test"))
    with torch.no_grad():
        if variant == "ae":
            train = ctx.ff.z[ctx.rows("train")].astype(np.float64)
            want_dims = np.argsort(-train.var(0))[:3]
            center, scale = train.mean(0), train.std(0)
        else:
            if variant == "vae":
                kl = gaussian_kl(*model.posterior(test))
            else:
                kl = torch.cat([lv.kl() for lv in model.infer(test, sample=False)[1]], dim=1)
            want_dims = np.argsort(-kl.mean(0).numpy())[:3]
            center, scale = np.zeros(4), np.ones(4)
        codes = model.encode(test).double().numpy()
    np.testing.assert_array_equal(dims, want_dims)
    start = z[0, 0].copy()
    start[dims[0]] = z[1, 0, dims[0]]
    assert np.abs(codes - start).max(1).min() < 1e-6  # the unmoved coordinates are a test code
    for i, d in enumerate(dims):
        np.testing.assert_allclose(z[i, :, d], center[d] + np.linspace(-2, 2, 5) * scale[d], atol=1e-5)
        others = np.delete(z[i], d, axis=1)
        np.testing.assert_allclose(others, np.broadcast_to(np.delete(start, d), others.shape), atol=1e-6)


def test_traversals_skip_vq(tmp_path):
    grid, dims = traversals(_image_ctx(tmp_path, "vq_vae"), steps=7)
    assert grid.shape == (0, 7, *IMAGE) and dims.shape == (0,)


# --- sample quality ------------------------------------------------------------------------------


def test_probability_metrics_by_hand():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])
    m = p.mean(0)
    got = probability_metrics(p)
    assert got["sample_confidence"] == pytest.approx((0.7 + 0.8 + 1 / 3) / 3)
    assert got["sample_entropy"] == pytest.approx(np.mean([-(r * np.log(r)).sum() for r in p]))
    assert got["class_entropy"] == pytest.approx(-(m * np.log(m)).sum())
    assert got["classifier_score"] == pytest.approx(np.exp(np.mean([(r * np.log(r / m)).sum() for r in p])))
    # one confident class for everything: no diversity, score 1; confident and balanced: score = classes
    assert probability_metrics(np.eye(3)[[0, 0]])["classifier_score"] == pytest.approx(1.0)
    assert probability_metrics(np.eye(3))["classifier_score"] == pytest.approx(3.0)


# --- the tasks end to end on the synthetic blobs -------------------------------------------------


def _saved_vae(model_dir, variant: str = "vae"):
    torch.manual_seed(0)
    model = build_model(variant, model_config(variant, latent_dim=4, hidden=(32,)), (D,), "gaussian").eval()
    last = [m for m in model.decoder.modules() if isinstance(m, nn.Linear)][-1]  # (mean, log std) per element
    with torch.no_grad():  # unit noise, as a trained model of this data would roughly have: no heavy-tailed draws
        last.weight[D:] = 0.0
        last.bias[D:] = math.log(math.expm1(-MIN_LOG_SCALE)) + MIN_LOG_SCALE
    return save_model(model_dir, model, variant=variant, normalizer=Normalizer(np.zeros(D), np.ones(D), "standard"))


def _vae_ctx(tmp_path, synth: Synth, cfg: EvalConfig, variant: str = "vae") -> AppContext:
    loaded = load_model(_saved_vae(tmp_path / "model", variant))
    with torch.no_grad():
        z = loaded.model.encode(torch.from_numpy(synth.x)).numpy()
    ff = read_features(write_ff(tmp_path / f"{variant}.parquet", synth, z, variant=variant))
    return make_context(ff, cfg, loaded=loaded, seed=3)


def test_generation_task(tmp_path, synth):
    cfg = EvalConfig(nll_samples=20, nll_max_rows=30, generation_samples=50)
    ctx = _vae_ctx(tmp_path, synth, cfg)
    state = torch.get_rng_state()
    out = generation(ctx)
    assert torch.equal(torch.get_rng_state(), state)
    frame = out.frame
    assert set(frame["task"]) == {"generation"} and set(frame["representation"]) == {"vae"}
    assert set(frame["metric"]) == {"nll_is", "elbo", "nll_is_bpd", "nll_is_mc_se", "nll_is_samples", "sample_confidence",
                                    "sample_entropy", "class_entropy", "classifier_score"}
    assert _value(frame, "nll_is_bpd") == pytest.approx(_value(frame, "nll_is") / (ctx.model.input_dim * math.log(2)))
    assert 0 < _value(frame, "nll_is_mc_se") < 1.0
    assert -_value(frame, "elbo") >= _value(frame, "nll_is") > 0
    assert 1.0 <= _value(frame, "classifier_score") <= 4.0
    assert 0.25 <= _value(frame, "sample_confidence") <= 1.0
    assert out.pictures["vae/samples"].shape == (16, D)
    assert out.pictures["vae/interpolations"].shape == (4, 8, D)
    assert out.pictures["vae/traversals"].shape == (4, 7, D)  # latent_dim 4 < 6 dims
    assert sorted(out.pictures["vae/traversal_dims"]) == [0, 1, 2, 3]
    assert "nll_is on 30 test rows with " in out.notes[0] and "at most 20)" in out.notes[0]
    # the samples picture is the model's own prior under the evaluation seed
    with torch.no_grad():
        want = ctx.model.sample(16, torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_allclose(out.pictures["vae/samples"], want, atol=1e-6)
    # deterministic: a second run gives the same numbers
    again = generation(ctx).frame
    np.testing.assert_array_equal(again["value"].to_numpy(), frame["value"].to_numpy())


@pytest.mark.parametrize("variant", ["ae", "vq_vae", "hier_vae"])
def test_generation_per_family(tmp_path, variant):
    ctx = replace(_image_ctx(tmp_path, variant), cfg=EvalConfig(nll_samples=4, nll_max_rows=8, generation_samples=40))
    out = generation(ctx)
    quality = {"sample_confidence", "sample_entropy", "class_entropy", "classifier_score"}
    likelihood = {"nll_is", "elbo", "nll_is_bpd", "nll_is_mc_se", "nll_is_samples"} if variant == "hier_vae" else set()
    codes = {"dead_code_fraction"} if variant == "vq_vae" else set()
    assert set(out.frame["metric"]) == quality | likelihood | codes
    if variant == "vq_vae":  # by hand: codes chosen by no train row at any position
        used = torch.unique(ctx.model.code_indices(ctx.inputs(ctx.rows("train"))))
        expected = 1 - len(used) / ctx.model.cfg.codebook_size
        assert _value(out.frame, "dead_code_fraction") == pytest.approx(expected)
    assert 1.0 <= _value(out.frame, "classifier_score") <= 2.0  # two classes
    keys = {f"{variant}/{k}" for k in ("samples", "interpolations", "traversals", "traversal_dims")}
    if variant == "vq_vae":
        keys -= {"vq_vae/traversals", "vq_vae/traversal_dims"}
    assert set(out.pictures) == keys
    assert out.pictures[f"{variant}/samples"].shape == (16, *IMAGE)
    prior = {"ae": "full-covariance Gaussian", "vq_vae": "independent categorical", "hier_vae": "model's prior"}
    assert prior[variant] in out.notes[0]


def test_generation_reference_real_rows_confident(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "raw.parquet", synth, synth.x))
    out = generation_reference(make_context(ff, EvalConfig()))
    assert set(out.frame["representation"]) == {"real_data", "factorized"}
    assert _value(out.frame, "sample_confidence") > 0.95  # well-separated blobs
    assert _value(out.frame, "class_entropy") == pytest.approx(math.log(4), abs=0.05)  # balanced classes
    assert _value(out.frame, "classifier_score") > 3.5
    unlabelled = read_features(write_ff(tmp_path / "nolabel.parquet", synth, synth.x, labels=None))
    assert set(generation_reference(make_context(unlabelled, EvalConfig())).frame["representation"]) == {"factorized"}


def test_quality_metrics_uses_classifier_probabilities(tmp_path, synth):
    from evaluation.generation import fit_quality_classifier

    ff = read_features(write_ff(tmp_path / "raw.parquet", synth, synth.x))
    ctx = make_context(ff, EvalConfig())
    clf = fit_quality_classifier(ctx)
    x = ctx.flat(ctx.rows("test"))
    p = clf.predict_proba(x)
    assert quality_metrics(clf, x)["sample_entropy"] == pytest.approx(stats.entropy(p, axis=1).mean())


# --- rate-distortion -----------------------------------------------------------------------------


def test_rate_distortion_matches_independent_computation(tmp_path, synth):
    ctx = _vae_ctx(tmp_path, synth, EvalConfig())
    model = ctx.model
    state = torch.get_rng_state()
    out = rate_distortion(ctx)
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.from_numpy(synth.x[synth.test])  # identity normalizer; feature rows are in synth order
    with torch.no_grad():
        mu, logvar = model.posterior(x)
        kl = gaussian_kl(mu, logvar)
        # distortion by Monte Carlo: -log N(x; mean, std) of the decoded Gaussian over many posterior draws
        z = mu + (0.5 * logvar).exp() * torch.randn((400, *mu.shape), generator=_gen(7))
        raw = model.decoder(z.reshape(-1, 4))  # (S * N, 2, D): mean, raw log std
        std = (MIN_LOG_SCALE + torch.nn.functional.softplus(raw[:, 1] - MIN_LOG_SCALE)).exp()
        x_rep = x.repeat(400, 1)
        recon = -torch.distributions.Normal(raw[:, 0], std).log_prob(x_rep).sum(-1).mean()
    frame = out.frame
    assert set(frame["metric"]) == {"rate", "distortion", "active_units"}
    assert _value(frame, "rate") == pytest.approx(float(kl.sum(1).mean()), rel=1e-5)
    assert _value(frame, "distortion") == pytest.approx(float(recon), rel=0.05)
    assert _value(frame, "active_units") == int((kl.mean(0) > 0.01).sum())
    np.testing.assert_allclose(out.pictures["vae/kl_per_dim"], kl.mean(0).numpy(), rtol=1e-5)
    assert "beta=1" in out.notes[0]


def test_rate_distortion_hier_vae_and_deterministic(tmp_path, synth):
    ctx = _vae_ctx(tmp_path, synth, EvalConfig(), variant="hier_vae")
    out = rate_distortion(ctx)
    kl = out.pictures["hier_vae/kl_per_dim"]
    assert kl.shape == (4,) and (kl >= 0).all()
    assert _value(out.frame, "rate") == pytest.approx(float(kl.astype(np.float64).sum()), rel=1e-6)
    assert rate_distortion(ctx).frame.equals(out.frame)  # seeded
    assert rate_distortion(_image_ctx(tmp_path, "ae")).frame.empty


def test_nll_mc_standard_error_matches_the_spread_of_repeated_estimates():
    model, x, _ = _linear_gaussian(perturb=True)
    s, repeats = 50, 300
    predicted = nll_mc_variance(log_weights(model, x, s, generator=_gen(0)))  # (B,), from one estimate's weights
    estimates = torch.stack([nll_is(model, x, s, generator=_gen(r + 1)) for r in range(repeats)])  # (R, B)
    observed = estimates.double().var(0)
    ratio = (predicted / observed).numpy()
    assert np.all((ratio > 0.4) & (ratio < 2.5)), ratio  # one estimate's weights predict the spread of many


def test_factorized_nll_is_the_histogram_and_gaussian_nll_by_hand():
    rng = np.random.default_rng(0)
    train, test = rng.integers(0, 5, size=(40, 3)), rng.integers(0, 5, size=(7, 3))
    nll = factorized_nll(train, test, Likelihood("discretized_logistic", 5))
    by_hand = np.zeros(len(test))
    for j in range(3):  # add-one smoothed frequency of each test value among that dimension's train values
        for i, v in enumerate(test[:, j]):
            by_hand[i] -= math.log(((train[:, j] == v).sum() + 1) / (len(train) + 5))
    np.testing.assert_allclose(nll, by_hand)
    x_tr, x_te = rng.normal(2.0, 3.0, size=(500, 2)), rng.normal(2.0, 3.0, size=(9, 2))
    expected = -stats.norm(x_tr.mean(0), x_tr.std(0)).logpdf(x_te).sum(1)
    np.testing.assert_allclose(factorized_nll(x_tr, x_te, Likelihood("gaussian")), expected)


def test_row_stats_of_padded_weights_match_each_row_by_hand():
    """Rows with different draw counts (padded with -inf): NLL and delta-method variance per row."""
    from evaluation.generation import _row_stats

    rng = np.random.default_rng(0)
    counts = [30, 7, 12, 2, 30]
    log_w = torch.full((30, 5), -math.inf, dtype=torch.float64)
    for j, n in enumerate(counts):
        log_w[:n, j] = torch.from_numpy(rng.normal(-50.0, 2.0, size=n))
    nll, var = _row_stats(log_w, torch.tensor(counts))
    for j, n in enumerate(counts):
        lw = log_w[:n, j].numpy()
        w = np.exp(lw - lw.max())  # scaled: the ratio var / mean^2 does not change
        assert nll[j].item() == pytest.approx(-(np.log(np.mean(w)) + lw.max()), rel=1e-12)
        assert var[j].item() == pytest.approx(np.var(w, ddof=1) / (n * np.mean(w) ** 2), rel=1e-9)


def _rows(n: int):
    model, x, _ = _linear_gaussian(perturb=True)
    return model, (x.repeat(n // len(x), 1) + 0.7 * torch.randn(n, x.shape[1], generator=_gen(5)))


def test_adaptive_nll_takes_the_minimum_when_the_error_is_small_and_the_cap_when_it_is_not():
    from evaluation.generation import adaptive_nll

    model, x = _rows(40)
    inputs = x.__getitem__
    cheap = adaptive_nll(model, inputs, 40, EvalConfig(nll_samples_min=16, nll_samples=200, nll_mc_ratio=1e9),
                         generator=_gen(1))
    assert (cheap.samples == 16).all()
    widen = EvalConfig().nll_proposal_widen  # the default proposal, the mixture
    np.testing.assert_allclose(cheap.nll, nll_is(model, x, 16, generator=_gen(1), widen=widen).double().numpy(),
                               rtol=1e-6)
    # the halving gap: the same draws' first half scored alone, by hand
    lw = log_weights(model, x, 16, generator=_gen(1), widen=widen).double()
    half = (math.log(8) - torch.logsumexp(lw[:8], 0)).numpy()
    np.testing.assert_allclose(cheap.half_nll, half, rtol=1e-6)
    assert cheap.halving_gap == pytest.approx(half.mean() - cheap.nll.mean(), rel=1e-6)
    full = adaptive_nll(model, inputs, 40, EvalConfig(nll_samples_min=16, nll_samples=200, nll_mc_ratio=1e-9),
                        generator=_gen(1))
    assert (full.samples == 200).all()  # 16, 32, 64, 128, then the last 72
    assert full.mc_se < cheap.mc_se
    assert 0 < full.halving_gap < cheap.halving_gap  # a perturbed posterior: more draws, a tighter bound


def test_adaptive_nll_spends_samples_on_the_rows_whose_error_pays():
    """More draws go to the rows with the largest Monte Carlo variance, until the sampling error of the mean is
    below nll_mc_ratio of its error over rows; far fewer draws than all rows at the cap."""
    from evaluation.generation import _row_stats, adaptive_nll

    model, x = _rows(200)
    # q alone, whose weights' variance differs most between rows (the mixture's is flatter: every row gets more)
    cfg = EvalConfig(nll_samples_min=8, nll_samples=512, nll_mc_ratio=0.1, nll_proposal_widen=1.0)
    est = adaptive_nll(model, x.__getitem__, 200, cfg, generator=_gen(2))
    target = cfg.nll_mc_ratio * est.nll.std(ddof=1) / math.sqrt(200)
    assert est.mc_se <= target and est.bias <= target
    assert 8 * 200 < est.samples.sum() < 0.5 * 512 * 200  # it spent, but far below the cap everywhere
    assert len(np.unique(est.samples)) > 1  # some rows got more than others
    # the first round's draws (the same generator, the same batches): its high-variance rows got the extra draws
    from evaluation.generation import ROW_BATCH

    gen = _gen(2)
    first = torch.cat([log_weights(model, x[i : i + ROW_BATCH], 8, generator=gen, widen=cfg.nll_proposal_widen)
                       for i in range(0, 200, ROW_BATCH)], 1)
    var0 = _row_stats(first, torch.full((200,), 8))[1].numpy()
    more = est.samples > 8
    assert more[np.argsort(var0)[-20:]].all()  # the 20 noisiest rows all got more
    assert var0[more].mean() > 2 * var0[~more].mean()


def test_quality_classifier_is_fitted_once_per_inputs_labels_and_seed(tmp_path, synth):
    from evaluation.generation import fit_quality_classifier

    ctx = _vae_ctx(tmp_path, synth, EvalConfig())
    first = fit_quality_classifier(ctx)
    assert fit_quality_classifier(replace(ctx, name="beta_vae")) is first  # another variant, the same pixels
    assert fit_quality_classifier(replace(ctx, seed=ctx.seed + 1)) is not first
