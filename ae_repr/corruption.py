"""Input corruptions for denoising training (Vincent et al. 2008): the trainer feeds the model
`corrupt(x, cfg.corruption)` and scores the reconstruction against the clean `x`."""

from __future__ import annotations

import torch

from .models.base import Corruption


def corrupt(
    x: torch.Tensor,
    c: Corruption | None,
    generator: torch.Generator | None = None,
    *,
    bounds: tuple[float, float] | None = None,
) -> torch.Tensor:
    """A corrupted copy of `x` (or `x` itself when `c` is None); see `Corruption` for the kinds.

    gaussian: x + level * N(0, 1). masking: each element set to 0 with probability level.
    salt_and_pepper: each element set, with probability level, to lo or hi (half each), where
    (lo, hi) = `bounds` when given (pass (0, 1) for [0, 1]-scaled Bernoulli data) and otherwise the
    batch's min and max, which for [0, 1]-scaled images is 0 and 1 in practice.
    """
    if c is None:
        return x
    if c.kind == "gaussian":
        return x + c.level * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if c.kind == "masking":
        return x * (u >= c.level).to(x.dtype)
    # salt and pepper: one uniform draw decides both whether (u < p) and which value (u < p/2 -> lo)
    if bounds is not None:
        lo, hi = (torch.tensor(b, device=x.device, dtype=x.dtype) for b in bounds)
    else:
        lo, hi = x.detach().amin(), x.detach().amax()  # 0-d tensors: no host sync
    noisy = torch.where(u < 0.5 * c.level, lo, hi)
    return torch.where(u < c.level, noisy, x)
