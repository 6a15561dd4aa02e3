"""Inpainting (task `inpainting`): fill hidden parts of test inputs by iterating the autoencoder's reconstruction.

Protocol: at most `EvalConfig.inpaint_max_rows` test rows, chosen by sample_id (`subsample`), so every
representation fills the same rows. Per mask kind in `EvalConfig.inpaint_masks` (1 = observed):
"block" hides a square of side round(inpaint_block * H) x round(inpaint_block * W) at a uniformly
random position, over all channels (for flat (D,) inputs a contiguous run of round(inpaint_block * D)
features); "random" hides each pixel, all its channels together (each feature, for flat inputs),
with probability `inpaint_random_p`. The masks come from `numpy.random.default_rng([seed, i])`, i the
kind's index in `MASK_KINDS`. The hidden entries start at the train mean (normalized space) and
`inpaint_iters` times x <- m * x_obs + (1 - m) * reconstruct(x), the clamped-observation iteration of
Rezende et al. 2014, "Stochastic Backpropagation and Approximate Inference in Deep Generative Models"
(data imputation), with the deterministic reconstruction in place of a posterior draw; a row whose step
moved none of its entries by more than `FIXED_POINT_TOL` (1e-6) sits at its fixed point and stops there
(further steps would leave it as it is). Metrics, in normalized space over hidden entries only:
`mse_masked_<kind>` per kind, and `mse_masked` over the hidden entries of all kinds together.
Baselines: "mean_image" (the train mean, no iteration) and "pca" (reconstruct = PCA(k)'s projection,
fitted on the train rows, iterated the same way).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from sklearn.decomposition import PCA

from ae_repr.config import EvalConfig
from ae_repr.models import Autoencoder

from .context import AppContext, TaskOutput
from .inputs import single_thread, subsample
from .results import result_frame, result_row

log = logging.getLogger(__name__)

MASK_KINDS = ("block", "random")
Reconstruct = Callable[[np.ndarray], np.ndarray]
_SHOWN = 8  # rows kept as pictures
_BATCH = 512  # rows per forward pass
# a row's fill has converged once a step moves none of its entries by more than this (normalized units): on
# dSprites every row of a 2-epoch VAE got there within 7 of the 10 steps (its MSEs moved by under 1e-7 of themselves)
FIXED_POINT_TOL = 1e-6


def make_masks(
    shape: tuple[int, ...], n: int, kind: str, cfg: EvalConfig, rng: np.random.Generator
) -> np.ndarray:
    """n masks over inputs of `shape` (1 = observed, 0 = hidden), float32 (n, *shape)."""
    spatial = shape[1:] if len(shape) == 3 else shape  # a pixel's channels are hidden together
    if kind == "block":
        hidden = np.ones((n, *spatial), dtype=bool)
        for axis, size in enumerate(spatial):
            side = max(1, int(round(cfg.inpaint_block * size)))
            start = rng.integers(0, size - side + 1, n)[:, None]
            pos = np.arange(size)
            inside = (pos >= start) & (pos < start + side)  # (n, size)
            hidden &= inside.reshape(n, *(size if i == axis else 1 for i in range(len(spatial))))
    elif kind == "random":
        hidden = rng.random((n, *spatial)) < cfg.inpaint_random_p
    else:
        raise ValueError(f"unknown inpainting mask {kind!r}; choose from {', '.join(MASK_KINDS)}")
    if len(shape) == 3:
        hidden = hidden[:, None]  # (n, H, W) -> (n, 1, H, W), broadcast over channels
    return np.broadcast_to(~hidden, (n, *shape)).astype(np.float32)


def iterative_fill(
    x_obs: np.ndarray, mask: np.ndarray, reconstruct: Reconstruct, init: np.ndarray, iters: int
) -> np.ndarray:
    """Hidden entries (mask 0) start at `init` and are replaced by `reconstruct(x)` `iters` times.

    `reconstruct` must map each row on its own (as a model in eval mode and a projection do): a row whose
    step moved no entry by more than `FIXED_POINT_TOL` has reached its fixed point and leaves the iteration,
    so later steps run on the rows still moving only."""
    observed = mask > 0
    x = np.where(observed, x_obs, init).astype(np.float32)
    moving = np.arange(len(x))
    for _ in range(iters):
        if not len(moving):
            break
        # np.where rather than m * x_obs + (1 - m) * r: observed entries stay bit-exact even if r is inf
        step = np.where(observed[moving], x_obs[moving], reconstruct(x[moving])).astype(np.float32)
        change = np.abs(step - x[moving]).reshape(len(moving), -1).max(axis=1, initial=0.0)
        x[moving] = step
        moving = moving[~(change <= FIXED_POINT_TOL)]  # a NaN change keeps its row moving, as before
    return x


def inpainting(ctx: AppContext) -> TaskOutput:
    """Masked-entry MSE of iterated model reconstructions, per mask kind and pooled."""
    fill = _iterated(ctx.cfg.inpaint_iters, model_reconstruct(ctx.model))
    return _inpaint(ctx, {ctx.name: fill}, notes=(_protocol_note(ctx, ctx.name),))


def inpainting_baselines(ctx: AppContext, k: int) -> TaskOutput:
    """Masked-entry MSE of the train mean ("mean_image") and of iterated PCA(k) projections ("pca")."""
    x_train = ctx.flat(ctx.rows("train"))
    n_components = min(k, *x_train.shape)
    with single_thread():
        pca = PCA(n_components=n_components, random_state=ctx.seed).fit(x_train)

    def project(x: np.ndarray) -> np.ndarray:
        flat = x.reshape(len(x), -1)  # (n, *shape) -> (n, D)
        with single_thread():
            return pca.inverse_transform(pca.transform(flat)).reshape(x.shape)

    fills = {"mean_image": _iterated(0, project), "pca": _iterated(ctx.cfg.inpaint_iters, project)}
    note = f"{_protocol_note(ctx, 'inpainting baselines')} pca: {n_components} components fitted on the train rows."
    return _inpaint(ctx, fills, with_inputs=True, notes=(note,))


def model_reconstruct(model: Autoencoder) -> Reconstruct:
    """model.reconstruct over numpy batches of normalized inputs, without gradients."""

    @torch.inference_mode()
    def reconstruct(x: np.ndarray) -> np.ndarray:
        batches = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).split(_BATCH)
        return torch.cat([model.reconstruct(b).float() for b in batches]).numpy()

    return reconstruct


def _iterated(iters: int, reconstruct: Reconstruct) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
    return lambda x_obs, mask, init: iterative_fill(x_obs, mask, reconstruct, init, iters)


def _protocol_note(ctx: AppContext, who: str) -> str:
    cfg = ctx.cfg
    n = len(subsample(ctx.ff, "test", cfg.inpaint_max_rows, ctx.seed))
    return (
        f"{who}: inpainting of {n} test rows, masks {', '.join(cfg.inpaint_masks)} (block side "
        f"{cfg.inpaint_block:g}, random p {cfg.inpaint_random_p:g}), at most {cfg.inpaint_iters} iterations from the "
        f"train mean (a row stops at its fixed point: no entry moved over {FIXED_POINT_TOL:g}); MSE over hidden "
        "entries in normalized space."
    )


def _inpaint(
    ctx: AppContext,
    fills: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]],
    *,
    with_inputs: bool = False,
    notes: tuple[str, ...] = (),
) -> TaskOutput:
    """Fill the protocol's rows under every configured mask with each named fill; rows and pictures."""
    cfg = ctx.cfg
    rows = subsample(ctx.ff, "test", cfg.inpaint_max_rows, ctx.seed)
    x_true = ctx.inputs(rows).numpy()  # (n, *shape)
    # the normalizer is affine, so the mean of normalized rows is the normalized mean (no float copy of the split)
    raw_mean = ctx.x_raw[ctx.rows("train")].mean(axis=0, dtype=np.float64)
    init = ctx.normalizer.numpy(raw_mean[None])[0]  # (*shape)
    pictures = {"inputs/inpaint_original": x_true[:_SHOWN]} if with_inputs else {}
    sums = {name: 0.0 for name in fills}
    counts = 0
    results = []
    for kind in cfg.inpaint_masks:
        mask = make_masks(ctx.input_shape, len(rows), kind, cfg, np.random.default_rng([ctx.seed, MASK_KINDS.index(kind)]))
        hidden = mask == 0
        x_obs = np.where(hidden, 0.0, x_true).astype(np.float32)  # the fills never see the hidden truth
        counts += int(hidden.sum())
        if with_inputs:
            pictures[f"inputs/inpaint_mask_{kind}"] = mask[:_SHOWN]
        for name, fill in fills.items():
            filled = fill(x_obs, mask, init)
            sq = float(((filled[hidden] - x_true[hidden]).astype(np.float64) ** 2).sum())
            sums[name] += sq
            results.append(result_row(name, "inpainting", f"mse_masked_{kind}", sq / max(int(hidden.sum()), 1)))
            pictures[f"{name}/inpaint_fill_{kind}"] = filled[:_SHOWN]
            log.debug("%s: inpainting %s mse %.4g", name, kind, results[-1]["value"])
    results += [result_row(name, "inpainting", "mse_masked", s / max(counts, 1)) for name, s in sums.items()]
    return TaskOutput(frame=result_frame(results), pictures=pictures, notes=notes)
