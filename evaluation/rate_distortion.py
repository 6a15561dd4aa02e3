"""Rate and distortion of a Gaussian-latent model on the test split (Alemi et al. 2018, "Fixing a Broken
ELBO"): the ELBO splits into a rate R = E KL(q(z|x) || p(z)) and a distortion D = E -log p(x|z), and
models trained at different betas trade one for the other along a curve.

Protocol: over all test rows, in batches, with posterior draws from a generator seeded with the
evaluation seed: `rate` is the mean total KL in nats (hier_vae: every level's
KL, lower levels scored at a posterior draw of the levels above, as in its loss), `distortion` the
mean `recon` term of the model's own loss (-log p(x|z) of its likelihood, in nats of the normalized
data, constants included), and `active_units` the number of latent dimensions that carry
information: whose mean KL(q(z_d|x) || p(z_d)) over the test rows exceeds 0.01 nats. (Burda et al.
2016 count posterior means that vary; a hier_vae level whose posterior follows its conditional prior
has varying means and no KL, so the KL is what is counted here.) Models with levels (`level_dims`,
hier_vae) also give `active_units_0`, `active_units_1`, ... per level, bottom first. Picture
`<name>/kl_per_dim` holds the mean KL of every latent dimension (hier_vae: levels concatenated bottom
first). Models without the `GaussianPosterior` capability (ae, dae, vq_vae) give no rows, only a note saying why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from ae_repr.models import Autoencoder, GaussianPosterior

from .context import AppContext, TaskOutput
from .results import result_frame, result_row

log = logging.getLogger(__name__)

BATCH = 512  # test rows per forward pass
THRESHOLD = 0.01  # mean KL (nats) above which a latent dimension counts as active


def kl_per_dim(model: Autoencoder, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row, per-dimension KL(q || p), (B, latent_dim): the model's own `kl_per_dim` (see its docstring)."""
    if not isinstance(model, GaussianPosterior):
        raise TypeError(f"{type(model).__name__} has no Gaussian posterior and prior")
    return model.kl_per_dim(x, generator)


def active_unit_counts(
    per_dim: np.ndarray, level_dims: Sequence[int] | None = None, threshold: float = THRESHOLD
) -> dict[str, int]:
    """`active_units`: dims whose mean KL exceeds `threshold` nats; with `level_dims`, `active_units_<l>` per level too."""
    active = np.asarray(per_dim) > threshold
    counts = {"active_units": int(active.sum())}
    if level_dims is not None:
        assert sum(level_dims) == len(active), f"level_dims {list(level_dims)} do not cover {len(active)} dims"
        for lvl, part in enumerate(np.split(active, np.cumsum(level_dims)[:-1])):  # bottom first
            counts[f"active_units_{lvl}"] = int(part.sum())
    return counts


def rate_distortion(ctx: AppContext) -> TaskOutput:
    """Test-split rate (mean KL), distortion (mean recon term) and active units of a Gaussian-latent model."""
    if not ctx.has(GaussianPosterior):
        return TaskOutput(notes=(ctx.skipped("rate_distortion", GaussianPosterior),))
    model = ctx.model
    device = next(model.parameters()).device
    rows = ctx.rows("test")
    kl_sum, recon_sum = None, 0.0
    with torch.inference_mode():
        generator = torch.Generator(device).manual_seed(ctx.seed)
        for start in range(0, len(rows), BATCH):
            x = ctx.inputs(rows[start : start + BATCH]).to(device)
            kl = kl_per_dim(model, x, generator).sum(0)  # (K,)
            kl_sum = kl if kl_sum is None else kl_sum + kl
            recon_sum += float(model.loss(x, generator=generator)["recon"]) * len(x)  # the loss reports a batch mean
    per_dim = (kl_sum / len(rows)).double().cpu().numpy()
    units = active_unit_counts(per_dim, getattr(model, "level_dims", None))
    frame = result_frame(
        [
            result_row(ctx.name, "rate_distortion", "rate", per_dim.sum()),
            result_row(ctx.name, "rate_distortion", "distortion", recon_sum / len(rows)),
            *(result_row(ctx.name, "rate_distortion", metric, n) for metric, n in units.items()),
        ]
    )
    log.info("%s: rate %.2f, distortion %.2f nats, active units %s", ctx.name, per_dim.sum(),
             recon_sum / len(rows), units)
    per_level = [n for metric, n in units.items() if metric != "active_units"]
    levels = f" ({'/'.join(map(str, per_level))} per level, bottom first)" if per_level else ""
    note = (
        f"rate_distortion ({ctx.name}): rate = mean KL(q(z|x) || p(z)), distortion = mean -log p(x|z) "
        f"({model.likelihood}), on {len(rows)} test rows, seed {ctx.seed}; "
        f"active units: dimensions with mean KL > {THRESHOLD} nats{levels}"
        + (f"; beta={model.cfg.beta:g}" if hasattr(model.cfg, "beta") else "")
    )
    return TaskOutput(frame=frame, pictures={f"{ctx.name}/kl_per_dim": per_dim.astype(np.float32)}, notes=(note,))
