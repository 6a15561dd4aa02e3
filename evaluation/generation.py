"""Generation from a trained model: an importance-sampled likelihood, prior samples, interpolations,
latent traversals and a classifier-based proxy of sample quality (task `generation`).

`nll_is` estimates -log p(x) with S draws from a proposal r, -log (1/S sum_s p(x, z_s) / r(z_s|x))
(Burda et al. 2016, "Importance Weighted Autoencoders"), in nats per example in the data's own units:
a probability of the observed levels for discrete likelihoods (Bernoulli, discretized logistic), a
density for a Gaussian one, where the normalizer's log-Jacobian turns the normalized data's density
into the raw data's. The proposal is the defensive mixture r = 1/2 q + 1/2 q_w, q_w the posterior with every
standard deviation times w = `nll_proposal_widen` (2; 1 gives q alone, as in Burda et al.): any proposal gives a
bound, and q is typically narrower than the true posterior, so its weights are heavy-tailed; with r they stay
within 2 p(x, z) / q(z|x), and where q is too narrow the wide half covers what it misses. On 100 dSprites test
rows, 50 draws from r gave a bound 5.3 nats (1 epoch on 20,000 images) and 12.6 nats (2 epochs on 2,000) tighter
than 50 draws from q, and tighter than 400 draws from q too; on a converged digits VAE 0.2 nats tighter. q_2 alone
lost 1.3 nats to q on digits at 50 draws: the mixture keeps q's draws where q is good. `elbo` is the mean log weight of
`ELBO_DRAWS` (8) draws per row from q itself, on the same rows, so the gap to the bound shows;
`nll_is_bpd` is nll_is in bits per dimension; `nll_is_mc_se` the Monte Carlo standard error of the
mean nll_is from the importance sampling alone (delta method on each row's weights); the interval is
a bootstrap over the scored test rows. Representation `factorized` is the likelihood with no latent:
independent per-dimension histograms (discrete data) or Gaussians fitted to the train rows, scored
exactly on the same rows; a model above it is worse than no model.
Models with the `GaussianPosterior` capability only (the others get a note saying why), on at most `nll_max_rows` test rows chosen by sample_id with the evaluation
seed. Samples go where they pay (`adaptive_nll`): every row gets `nll_samples_min` draws; while the
importance-sampling standard error of the mean, or the bound's estimated bias (half the mean per-row
variance), exceeds `nll_mc_ratio` of the standard error over rows (the bootstrap interval's source), the
rows whose own Monte Carlo variance is above their share double their draws, up to `nll_samples`. `nll_is_samples` is the mean number of draws per row.
The delta method's bias is too small where the weights are heavy-tailed: with q alone, on dSprites after 2 epochs it said
0.42 nats at 50 draws, while 150 and 400 draws moved the estimate by 3.8 and 7.0 nats. The note therefore also
gives the halving gap, how much the mean fell from the first half of each row's draws to all of them, an
empirical measure of how loose the bound still is.

Prior samples: a model with the `Prior` capability (vae, beta_vae, hier_vae) draws from its own prior. A
`Quantized` model without one (vq_vae) gets the simplest fitted one, an independent categorical per position with the train rows' code
frequencies (van den Oord et al. 2017 fit a PixelCNN over the code grid instead). Any other model (ae, dae) gets a
full-covariance Gaussian fitted to the train rows' codes (ex-post density estimation, Ghosh et al.
2020, "From Variational to Deterministic Autoencoders").

Sample quality, when the data has labels: a logistic regression on the real train rows' pixels scores
`generation_samples` prior samples by the mean max-class probability (`sample_confidence`), the mean
predictive entropy (`sample_entropy`), the entropy of the mean predicted class distribution
(`class_entropy`, diversity) and exp E KL(p(y|x) || p(y)) (`classifier_score`, the inception score of
Salimans et al. 2016 with this classifier in place of Inception). `generation_reference` scores the real
test rows the same way as representation `real_data`.

Pictures: 16 prior samples; decoded interpolations between fixed test pairs of different labels,
in the geometry of the model's prior (`Prior.latent_geometry`: spherical for Gaussian latents, White 2016,
"Sampling Generative Networks"), linear otherwise, re-projected onto the codebook for `Quantized` models;
traversals of single latent dimensions from one test example's code (none for `Quantized` models).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.pipeline import Pipeline

from ae_repr.config import EvalConfig
from ae_repr.likelihoods import Likelihood, likelihood_for
from ae_repr.models import Autoencoder, GaussianPosterior, Prior, Quantized

from .context import AppContext, TaskOutput
from .inputs import SharedResults, digest, label_problem, pass_rows, single_thread, subsample
from .intervals import interval_fields, mean_interval
from .probe import fit_frozen_head
from .rate_distortion import kl_per_dim
from .results import result_frame, result_row

log = logging.getLogger(__name__)

TASK = "generation"
SHOWN = 16  # prior samples kept as a picture
ROW_BATCH = 64  # rows per importance-sampling pass: with `chunk` draws each, memory stays bounded
ENCODE_BATCH = 1024
# posterior draws per row for `elbo`, its own (nll_is draws from a wider proposal); the mean over 500 rows moved
# from 50 draws' by 0.08-0.19 nats on dSprites (of 460-495) and by 0.04 on digits (of 85-87)
ELBO_DRAWS = 8


def _device(model: Autoencoder) -> torch.device:
    return next(model.parameters()).device


def _generator(ctx: AppContext) -> torch.Generator:
    """A fresh generator on the model's device, seeded with the evaluation seed."""
    return torch.Generator(_device(ctx.model)).manual_seed(ctx.seed)


def _map_rows(ctx: AppContext, rows: np.ndarray, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """`fn` over the model inputs of `rows` in batches, concatenated along the first dimension."""
    device = _device(ctx.model)
    return torch.cat(
        [fn(ctx.inputs(rows[i : i + ENCODE_BATCH]).to(device)) for i in range(0, len(rows), ENCODE_BATCH)]
    )


# --- likelihood --------------------------------------------------------------------------------


@torch.inference_mode()
def log_weights(
    model: GaussianPosterior, x: torch.Tensor, n_samples: int, *, generator: torch.Generator, chunk: int = 32,
    widen: float = 1.0,
) -> torch.Tensor:
    """log p(x, z_s) - log r(z_s|x) for `n_samples` draws z_s ~ r per row, (S, B), `chunk` draws per pass; r is
    the posterior q, or with `widen` > 1 the defensive mixture 1/2 q + 1/2 q_widen (`GaussianPosterior.log_weight`)."""
    out = []
    for start in range(0, n_samples, chunk):
        s = min(chunk, n_samples - start)
        out.append(model.log_weight(x, generator, draws=s, widen=widen).reshape(s, len(x)))  # (s * B,) -> (s, B)
    return torch.cat(out)


def _nll(log_w: torch.Tensor) -> torch.Tensor:
    """-(logsumexp_s log_w - log S) per row of (S, B) log weights, (B,) in their dtype."""
    return (math.log(log_w.shape[0]) - torch.logsumexp(log_w.double(), dim=0)).to(log_w.dtype)


def nll_mc_variance(log_w: torch.Tensor) -> torch.Tensor:
    """Monte Carlo variance of each row's importance-sampled NLL from (S, B) log weights, (B,): by the delta
    method, Var(log mean w) = Var(w) / (S mean(w)^2), computed on weights scaled by their row maximum."""
    return _row_stats(log_w, torch.full((log_w.shape[1],), log_w.shape[0]))[1]


def nll_is(
    model: GaussianPosterior, x: torch.Tensor, n_samples: int, *, generator: torch.Generator, chunk: int = 32,
    widen: float = 1.0,
) -> torch.Tensor:
    """Importance-sampled negative log-likelihood per row, nats, (B,) (Burda et al. 2016), proposal as in
    `log_weights`."""
    return _nll(log_weights(model, x, n_samples, generator=generator, chunk=chunk, widen=widen))


@dataclass(frozen=True)
class AdaptiveNLL:
    """Per-row importance-sampled NLLs (nats, normalized space) with their Monte Carlo variances and draw counts."""

    nll: np.ndarray  # (N,)
    mc_variance: np.ndarray  # (N,) each row's delta-method variance
    samples: np.ndarray  # (N,) draws per row
    half_nll: np.ndarray  # (N,) each row's NLL from the first half of its draws

    @property
    def mc_se(self) -> float:
        """Monte Carlo standard error of the mean NLL over rows."""
        return math.sqrt(float(self.mc_variance.sum())) / len(self.nll)

    @property
    def bias(self) -> float:
        """The bound's estimated looseness, nats: E[log mean w] falls short of log p(x) by about Var/2 per row."""
        return float(self.mc_variance.mean()) / 2

    @property
    def halving_gap(self) -> float:
        """How much the mean NLL fell from half of each row's draws to all of them, nats: the bound's looseness at
        half the draws less its looseness now; as large as what is left of it when that shrinks like 1/S, smaller
        when it shrinks more slowly. An empirical check on `bias` (heavy-tailed weights make the delta method too
        small: on digits, 500 draws on every row moved the mean 0.31 nats where this said 0.04)."""
        return float(self.half_nll.mean() - self.nll.mean())


def _row_stats(log_w: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NLL and delta-method MC variance per row of (S_max, N) log weights padded with -inf."""
    lw = log_w.double()
    n = counts.double()
    nll = n.log() - torch.logsumexp(lw, 0)
    w = torch.exp(lw - lw.amax(0))  # padding -> 0
    mean = w.sum(0) / n
    var = (w.pow(2).sum(0) - n * mean.pow(2)) / (n - 1)
    return nll, var.clamp_min(0) / (n * mean.pow(2))


def adaptive_nll(
    model: GaussianPosterior,
    inputs: Callable[[np.ndarray], torch.Tensor],
    n_rows: int,
    cfg: EvalConfig,
    *,
    generator: torch.Generator,
) -> AdaptiveNLL:
    """Importance-sampled NLL of `n_rows` rows (`inputs(positions)` gives their model inputs), more draws only
    where they pay: every row gets `nll_samples_min`; while the MC standard error of the mean, or the bound's
    estimated bias (half the mean per-row variance), exceeds `nll_mc_ratio` x the standard error over rows,
    each row whose MC variance is above its share of either (N x target^2, 2 x target) doubles its draws, up
    to `nll_samples`."""
    cap = cfg.nll_samples
    log_w = torch.full((cap, n_rows), -math.inf, dtype=torch.float64)
    counts = torch.zeros(n_rows, dtype=torch.long)
    more = torch.full((n_rows,), min(cfg.nll_samples_min, cap))  # draws to add per row this round
    while True:
        for draws in sorted(set(more[more > 0].tolist())):  # rows asking for as many draws go in one pass
            todo = np.flatnonzero((more == draws).numpy())
            for i in range(0, len(todo), ROW_BATCH):
                rows = todo[i : i + ROW_BATCH]
                x = inputs(rows)
                chunk = min(32, max(1, pass_rows(x[0].numel()) // len(rows)))  # draws per pass
                lw = log_weights(model, x, draws, generator=generator, chunk=chunk,
                                 widen=cfg.nll_proposal_widen).double().cpu()  # (draws, B)
                for j, r in enumerate(rows):
                    log_w[counts[r] : counts[r] + draws, r] = lw[:, j]
        counts += more
        nll, var = _row_stats(log_w, counts)
        target = cfg.nll_mc_ratio * float(nll.std()) / math.sqrt(n_rows)
        # both the sampler's noise and the bound's looseness (its bias, about half each row's variance: Nowozin
        # 2018) must be under the target; a row above its share of either gets more draws
        open_rows = ((var > n_rows * target**2) | (var > 2 * target)) & (counts < cap)
        settled = math.sqrt(float(var.sum())) / n_rows <= target and float(var.mean()) / 2 <= target
        if settled or not bool(open_rows.any()):
            break
        more = torch.where(open_rows, torch.minimum(counts, cap - counts), 0)
    half = torch.div(counts, 2, rounding_mode="floor")  # draws are independent: the first half is an estimate too
    half_nll = _row_stats(log_w.masked_fill(torch.arange(cap)[:, None] >= half, -math.inf), half)[0]
    return AdaptiveNLL(nll.numpy(), var.numpy(), counts.numpy(), half_nll.numpy())


def _proposal(widen: float) -> str:
    return "the posterior q" if widen == 1.0 else f"1/2 q + 1/2 q with {widen:g}x its standard deviations"


@torch.inference_mode()
def elbo_per_row(ctx: AppContext, rows: np.ndarray) -> torch.Tensor:
    """Each row's ELBO, (N,): the mean log weight of `ELBO_DRAWS` draws from the posterior q itself."""
    model, generator = ctx.model, _generator(ctx)

    def elbo(x: torch.Tensor) -> torch.Tensor:
        chunk = max(1, pass_rows(x[0].numel()) // len(x))  # draws per pass
        return log_weights(model, x, ELBO_DRAWS, generator=generator, chunk=chunk).double().mean(0)

    return _map_rows(ctx, rows, elbo)


# --- priors, interpolations, traversals --------------------------------------------------------


def _code_frequencies(ctx: AppContext) -> torch.Tensor:
    """Per-position frequencies of every code over the train rows, (positions, codebook_size)."""
    model = ctx.model
    assert isinstance(model, Quantized)
    idx = _map_rows(ctx, ctx.rows("train"), model.code_indices)  # (N, P)
    onehot = F.one_hot(idx, model.codebook_size).double()  # (N, P, K)
    return onehot.mean(0)


def _code_gaussian(ctx: AppContext) -> tuple[np.ndarray, np.ndarray]:
    """Mean and a square root A (A A^T = covariance) of the train rows' codes."""
    z = ctx.ff.z[ctx.rows("train")].astype(np.float64)
    w, v = np.linalg.eigh(np.atleast_2d(np.cov(z, rowvar=False)))
    # eigh rather than Cholesky: collapsed code dimensions make the covariance singular
    return z.mean(0), v * np.sqrt(np.clip(w, 0.0, None))


@torch.inference_mode()
def prior_samples(ctx: AppContext, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` decoded draws from the model's prior or a prior fitted to its train codes, (n, *input_shape)."""
    model, device = ctx.model, _device(ctx.model)
    if isinstance(model, Prior):
        return model.sample(n, generator)
    if isinstance(model, Quantized):
        probs = _code_frequencies(ctx).to(device)  # (P, K)
        idx = torch.multinomial(probs, n, replacement=True, generator=generator).T  # (P, n) -> (n, P)
        return model.decode_codes(idx)
    mean, root = _code_gaussian(ctx)
    eps = torch.randn(n, len(mean), generator=generator, device=device, dtype=torch.float64)
    z = torch.from_numpy(mean).to(device) + eps @ torch.from_numpy(root).to(device).T  # (n, K)
    return model.decode(z.float())


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from rows `a` to rows `b` (B, K) at fractions `t` (T,), (B, T, K)."""
    omega = torch.arccos(F.cosine_similarity(a, b, dim=1).clamp(-1.0, 1.0))[:, None, None]  # (B, 1, 1)
    t = t[None, :, None]  # (1, T, 1)
    sin = torch.sin(omega)
    # (anti)parallel ends leave no plane to rotate in: fall back to the linear weights
    wa = torch.where(sin > 1e-6, torch.sin((1 - t) * omega) / sin, 1 - t)
    wb = torch.where(sin > 1e-6, torch.sin(t * omega) / sin, t)
    return wa * a[:, None] + wb * b[:, None]


def _sorted_test_rows(ctx: AppContext) -> np.ndarray:
    """Test rows ordered by sample_id, so every representation of a data set picks the same ones."""
    rows = ctx.rows("test")
    return rows[np.argsort(ctx.ff.frame["sample_id"].to_numpy()[rows], kind="stable")]


def _test_pairs(ctx: AppContext, pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """`pairs` fixed test pairs (start rows, end rows), of different labels when labels exist."""
    perm = np.random.default_rng(ctx.seed).permutation(_sorted_test_rows(ctx))
    pairs = min(pairs, len(perm) // 2)
    starts, rest = perm[:pairs], perm[pairs:]
    y = ctx.labels
    ends = []
    for i, a in enumerate(starts):
        other = rest if y is None else rest[y[rest] != y[a]]
        other = other if len(other) else rest  # a single class: any other row
        ends.append(other[i % len(other)])
    return starts, np.asarray(ends, dtype=np.int64)


@torch.inference_mode()
def interpolations(ctx: AppContext, pairs: int = 4, steps: int = 8) -> np.ndarray:
    """Decoded interpolations between fixed test pairs, (pairs, steps, *input_shape); the ends are reconstructions."""
    model, device = ctx.model, _device(ctx.model)
    starts, ends = _test_pairs(ctx, pairs)
    za, zb = model.encode(ctx.inputs(starts).to(device)), model.encode(ctx.inputs(ends).to(device))
    t = torch.linspace(0.0, 1.0, steps, device=device)
    if isinstance(model, Prior) and model.latent_geometry == "spherical":
        z = slerp(za, zb, t)
    else:  # lerp's weight-1 branch returns the end exactly
        z = torch.lerp(za[:, None], zb[:, None], t[None, :, None])  # (pairs, steps, K)
    z = z.reshape(-1, model.latent_dim)  # (pairs * steps, K)
    if isinstance(model, Quantized):  # the decoder only knows code vectors
        z = model.project(z)
    return model.decode(z).reshape(len(starts), steps, *ctx.input_shape).float().cpu().numpy()


@torch.inference_mode()
def traversals(
    ctx: AppContext, dims: int = 6, steps: int = 7, span: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """Decoded single-dimension traversals from one test example's code, (dims, steps, *input_shape), and the dims."""
    if ctx.has(Quantized):  # a code vector moved off the codebook means nothing to the decoder
        return np.empty((0, steps, *ctx.input_shape), dtype=np.float32), np.empty(0, dtype=np.int64)
    model, device = ctx.model, _device(ctx.model)
    offsets = np.linspace(-span, span, steps)
    if isinstance(model, GaussianPosterior) and isinstance(model, Prior):  # informative dims, across the N(0, 1) prior
        score = _map_rows(ctx, ctx.rows("test"), lambda x: kl_per_dim(model, x)).mean(0).double().cpu().numpy()
        center, scale = np.zeros_like(score), np.ones_like(score)
    else:  # the widest-spread dims, moved across their train spread
        z_train = ctx.ff.z[ctx.rows("train")].astype(np.float64)
        score, center, scale = z_train.var(0), z_train.mean(0), z_train.std(0)
    chosen = np.argsort(-score, kind="stable")[:dims]
    z0 = model.encode(ctx.inputs(_test_pairs(ctx, 1)[0]).to(device))  # (1, K)
    z = z0.repeat(len(chosen) * steps, 1).reshape(len(chosen), steps, -1)  # (dims, steps, K)
    for i, d in enumerate(chosen):
        z[i, :, d] = torch.as_tensor(center[d] + offsets * scale[d], dtype=z.dtype, device=device)
    images = model.decode(z.reshape(-1, z.shape[-1]))  # (dims * steps, *shape)
    return images.reshape(len(chosen), steps, *ctx.input_shape).float().cpu().numpy(), chosen.astype(np.int64)


# --- sample quality ----------------------------------------------------------------------------


_QUALITY_CLASSIFIERS: SharedResults[Pipeline] = SharedResults()  # one fit per (pixels, labels, seed) per process


def fit_quality_classifier(ctx: AppContext) -> Pipeline:
    """Standardized logistic regression (C=1) on the real train rows' normalized pixels and labels.

    Fitted once per process for the same inputs, labels and seed (every variant of a run normalizes the
    same train rows alike): on 64x64 images the fit is the generation task's largest cost after nll_is.
    """
    train = ctx.rows("train")
    labels = ctx.labels
    assert labels is not None, f"{ctx.name}: the quality classifier needs labels"
    x, y = ctx.flat(train), labels[train]

    def fit() -> Pipeline:  # separable pixel data can stop lbfgs at max_iter; the probabilities are still usable
        head = fit_frozen_head(x, y, Cs=(1.0,), folds=0, seed=ctx.seed)
        assert isinstance(head, Pipeline)
        return head

    return _QUALITY_CLASSIFIERS.get(digest(x, y, np.asarray(ctx.seed)).hex(), fit)


def probability_metrics(p: np.ndarray) -> dict[str, float]:
    """Confidence, entropies and classifier score of predicted class probabilities `p` (n, classes), nats."""
    marginal = p.mean(0)  # p(y), (classes,)
    kl = stats.entropy(p, marginal[None], axis=1)  # KL(p(y|x) || p(y)) per row
    return {
        "sample_confidence": float(p.max(1).mean()),
        "sample_entropy": float(stats.entropy(p, axis=1).mean()),
        "class_entropy": float(stats.entropy(marginal)),
        "classifier_score": float(np.exp(kl.mean())),
    }


def quality_metrics(clf: Pipeline, x_flat: np.ndarray) -> dict[str, float]:
    """`probability_metrics` of the classifier's predictions on flat samples (n, D)."""
    with single_thread():
        return probability_metrics(clf.predict_proba(x_flat))


# --- the task ----------------------------------------------------------------------------------


def generation(ctx: AppContext) -> TaskOutput:
    """Importance-sampled NLL (`GaussianPosterior` models), prior-sample quality (with labels), the generation pictures."""
    cfg, model, name = ctx.cfg, ctx.model, ctx.name
    device = _device(model)
    rows_out, notes = [], []
    if not isinstance(model, GaussianPosterior):
        notes.append(ctx.skipped("nll_is", GaussianPosterior).removeprefix(f"{name}: ").removesuffix("."))
    else:
        rows = subsample(ctx.ff, "test", cfg.nll_max_rows, ctx.seed)

        def inputs(pos: np.ndarray) -> torch.Tensor:
            return ctx.inputs(rows[pos]).to(device)

        est = adaptive_nll(model, inputs, len(rows), cfg, generator=_generator(ctx))
        lik = model.likelihood
        # discrete likelihoods give probabilities of the raw levels already; a density needs the Jacobian
        jac = ctx.normalizer.log_abs_det(model.input_dim) if lik.continuous else 0.0
        per_row = est.nll - jac  # (N,), nats in the data's own units
        elbo = float(elbo_per_row(ctx, rows).mean()) + jac
        nll, mc_se = float(per_row.mean()), est.mc_se
        rows_out += [
            result_row(name, TASK, "nll_is", nll, **_row_interval(per_row, cfg, ctx.seed)),
            result_row(name, TASK, "elbo", elbo),
            result_row(name, TASK, "nll_is_bpd", nll / (model.input_dim * math.log(2))),
            result_row(name, TASK, "nll_is_mc_se", mc_se),
            result_row(name, TASK, "nll_is_samples", float(est.samples.mean())),
        ]
        notes.append(
            f"nll_is on {len(rows)} test rows with {est.samples.min()}-{est.samples.max()} importance samples per "
            f"row from {_proposal(cfg.nll_proposal_widen)} "
            f"(mean {est.samples.mean():.0f}; {cfg.nll_samples_min} each, doubled where the sampling error "
            f"or the bound's estimated bias exceeded {cfg.nll_mc_ratio:g} of the error over rows, at most "
            f"{cfg.nll_samples}), likelihood {lik}, nats per example in the data's units"
            f"{' (Jacobian of the normalization included)' if jac else ''}; importance-sampling standard error "
            f"{mc_se:.3g} nats, estimated bias of the bound {est.bias:.3g} nats (delta method); from half the "
            "draws to all of them the estimate "
            + (f"fell by {est.halving_gap:.3g} nats: the bound is likely still at least that much above the true NLL "
               "(as much when its looseness shrinks like 1/draws, more when slower)" if est.halving_gap > 0 else
               f"did not fall ({est.halving_gap:+.3g} nats, within its sampling noise)")
        )
        log.info("%s: nll_is %.2f nats (%.3f bits/dim, MC s.e. %.3g, %.3g below half the draws' estimate), elbo %.2f",
                 name, nll, nll / (model.input_dim * math.log(2)), mc_se, est.halving_gap, elbo)
    if isinstance(model, Quantized):  # codes no train row uses: a codebook's dead weight (the prior gives them no mass)
        dead = float((_code_frequencies(ctx).sum(0) == 0).double().mean())
        rows_out.append(result_row(name, TASK, "dead_code_fraction", dead))
        notes.append(f"{dead:.1%} of the codebook's codes are used by no train row at any position")
    scored = label_problem(ctx.ff) is None
    samples = prior_samples(ctx, max(SHOWN, cfg.generation_samples) if scored else SHOWN, _generator(ctx))
    samples = samples.float().cpu().numpy()
    if scored:
        n = cfg.generation_samples
        metrics = quality_metrics(fit_quality_classifier(ctx), samples[:n].reshape(n, -1))
        rows_out += [result_row(name, TASK, k, v) for k, v in metrics.items()]
        notes.append(f"quality of {n} prior samples under a logistic regression on the real train rows")
    if isinstance(model, Prior):
        notes.append("samples from the model's prior")
    elif isinstance(model, Quantized):
        notes.append("vq prior: independent categorical per position, fitted to the train codes")
    else:
        notes.append("prior: full-covariance Gaussian fitted to the train codes")
    pictures = {f"{name}/samples": samples[:SHOWN], f"{name}/interpolations": interpolations(ctx)}
    grid, dims = traversals(ctx)
    if len(dims):
        pictures[f"{name}/traversals"] = grid
        pictures[f"{name}/traversal_dims"] = dims
    return TaskOutput(
        frame=result_frame(rows_out), pictures=pictures, notes=(f"generation ({name}): " + "; ".join(notes),)
    )


def generation_reference(ctx: AppContext) -> TaskOutput:
    """The NLL of a model with no latent (`factorized`, see `factorized_nll`) and the sample-quality metrics
    of the real test rows (representation `real_data`, with labels only)."""
    train, test = ctx.rows("train"), ctx.rows("test")
    scored = subsample(ctx.ff, "test", ctx.cfg.nll_max_rows, ctx.seed)  # the rows the models' nll_is scores
    lik = likelihood_for(ctx.x_raw[train], images=ctx.x_raw.ndim == 4)
    nll = factorized_nll(ctx.x_raw[train].reshape(len(train), -1), ctx.x_raw[scored].reshape(len(scored), -1), lik)
    dim = ctx.x_raw[0].size
    rows = [
        result_row(FACTORIZED, TASK, "nll_is", float(nll.mean()), **_row_interval(nll, ctx.cfg, ctx.seed)),
        result_row(FACTORIZED, TASK, "nll_is_bpd", float(nll.mean()) / (dim * math.log(2))),
    ]
    notes = [
        f"generation ({FACTORIZED}): exact NLL of independent per-dimension {_FACTORIZED_KIND[lik.kind]} fitted to "
        f"the {len(train)} train rows, on the same {len(scored)} test rows as nll_is ({dim} dimensions): a likelihood model worse "
        "than this one is worse than no model"
    ]
    if label_problem(ctx.ff) is None:
        metrics = quality_metrics(fit_quality_classifier(ctx), ctx.flat(test))
        rows += [result_row("real_data", TASK, k, v) for k, v in metrics.items()]
        notes.append(f"generation (real_data): quality metrics of the {len(test)} real test rows, same classifier")
    return TaskOutput(frame=result_frame(rows), notes=tuple(notes))


def _row_interval(per_row: np.ndarray, cfg: EvalConfig, seed: int) -> dict[str, Any]:
    """Result-row keywords of the test-row bootstrap interval of a per-row mean."""
    return interval_fields(mean_interval(per_row, cfg.bootstrap_samples, seed), cfg.bootstrap_samples)


FACTORIZED = "factorized"  # the no-latent likelihood baseline's representation name
_FACTORIZED_KIND = {
    "bernoulli": "histograms of the levels",
    "discretized_logistic": "histograms of the levels",
    "gaussian": "Gaussians",
}


def factorized_nll(x_train: np.ndarray, x_test: np.ndarray, likelihood: Likelihood) -> np.ndarray:
    """Per-row NLL (nats, raw units) of test rows (n, D) under independent per-dimension distributions fitted
    to the train rows: for discrete data a histogram of each dimension's levels with add-one smoothing (the
    grid from the train minimum to the maximum, test values outside it clipped), else a Gaussian."""
    if likelihood.continuous:
        mu, sd = x_train.mean(0), x_train.std(0)
        sd = np.where(sd > 0, sd, 1.0)  # a constant dimension: any scale; its density is degenerate either way
        return -stats.norm.logpdf(x_test, mu, sd).sum(1)
    lo, hi = float(x_train.min()), float(x_train.max())
    levels = likelihood.levels or 2  # bernoulli: the two values

    def codes(x: np.ndarray) -> np.ndarray:  # level index per element, (n, D)
        return np.clip(np.rint((x.astype(np.float64) - lo) / (hi - lo) * (levels - 1)), 0, levels - 1).astype(np.int64)

    tr, te = codes(x_train), codes(x_test)
    dims = np.arange(tr.shape[1])
    counts = np.zeros((tr.shape[1], levels))  # (D, L)
    np.add.at(counts, (np.broadcast_to(dims, tr.shape), tr), 1.0)
    log_p = np.log((counts + 1.0) / (len(tr) + levels))  # (D, L)
    return -log_p[dims, te].sum(1)
