"""Observation likelihoods p(x | z): what a decoder's raw output means, and the exact log-probability
of the data under it, so that an ELBO or an NLL is a likelihood of the data at hand.

- `bernoulli`: binary data (two values); one logit per input element.
- `discretized_logistic`: data on a grid of `levels` equally spaced values (digits' 17 grey levels,
  uint8 images' 256), normalized to [0, 1]; a logistic with a location and a log scale per element,
  integrated over each level's bin, the end bins open to -inf and +inf (Salimans et al. 2017,
  "PixelCNN++"). The probabilities of one element's levels sum to exactly 1.
- `gaussian`: continuous data; a mean and a log standard deviation per element (learned variance).
  A density of the normalized data: a report in the data's own units adds the normalizer's log-Jacobian
  (`Normalizer.log_abs_det`).

Decoders emit `params` raw values per input element, shaped (B, params, *input_shape). Scales have a
soft floor (MIN_LOG_SCALE) so a degenerate element cannot drive the likelihood to infinity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Kind = Literal["bernoulli", "discretized_logistic", "gaussian"]
KINDS: tuple[str, ...] = ("bernoulli", "discretized_logistic", "gaussian")
MIN_LOG_SCALE = -7.0  # floor of a log scale, in normalized units (PixelCNN++ clamps at the same value)
MAX_LEVELS = 1 << 16  # integer data with more levels than this is treated as continuous


@dataclass(frozen=True)
class Likelihood:
    """One observation model: its kind and, for `discretized_logistic`, the number of grid levels."""

    kind: Kind
    levels: int | None = None

    def __post_init__(self) -> None:
        assert self.kind in KINDS, f"unknown likelihood {self.kind!r}; choose from {', '.join(KINDS)}"
        if self.kind == "discretized_logistic":
            assert self.levels is not None and self.levels >= 2, "discretized_logistic needs levels >= 2"
        else:
            assert self.levels is None, f"{self.kind} takes no levels"

    @classmethod
    def parse(cls, spec: str | Likelihood) -> Likelihood:
        """From a spec: `bernoulli`, `gaussian` or `discretized_logistic:L` (what `str` gives back)."""
        if isinstance(spec, Likelihood):
            return spec
        kind, _, levels = str(spec).partition(":")
        return cls(kind, int(levels) if levels else None)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.kind}:{self.levels}" if self.levels is not None else self.kind

    @property
    def params(self) -> int:
        """Raw decoder outputs per input element: a logit, or a location and a log scale."""
        return 1 if self.kind == "bernoulli" else 2

    @property
    def continuous(self) -> bool:
        """True for a density (its value depends on the data's units); False for probabilities of values."""
        return self.kind == "gaussian"

    def log_prob(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | raw) summed over each sample's elements, (B,), in float32 even under autocast."""
        dtype = torch.promote_types(raw.dtype, torch.float32)  # bf16 under autocast -> float32; float64 stays
        raw, x = raw.to(dtype), target.to(dtype)
        if self.kind == "bernoulli":
            lp = -F.binary_cross_entropy_with_logits(raw[:, 0], x, reduction="none")
        elif self.kind == "gaussian":
            loc, log_scale = raw[:, 0], _floored(raw[:, 1])
            lp = -0.5 * ((x - loc) * torch.exp(-log_scale)).pow(2) - log_scale - 0.5 * math.log(2 * math.pi)
        else:
            lp = _discretized_logistic_log_prob(raw[:, 0], _floored(raw[:, 1]), x, self.levels or 2)
        return lp.flatten(1).sum(1)

    def nll(self, raw: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """-log p(target | raw) summed over elements, mean over the batch: the reconstruction loss."""
        return -self.log_prob(raw, target).mean()

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """The reconstruction shown and compared in data space, (B, *input_shape): the Bernoulli mean, the
        Gaussian mean, or the logistic's location clamped to the grid's range."""
        if self.kind == "bernoulli":
            return torch.sigmoid(raw[:, 0])
        return raw[:, 0] if self.kind == "gaussian" else raw[:, 0].clamp(0.0, 1.0)


def _floored(raw_log_scale: torch.Tensor) -> torch.Tensor:
    """A log scale with a smooth floor at MIN_LOG_SCALE (the identity well above it)."""
    return MIN_LOG_SCALE + F.softplus(raw_log_scale - MIN_LOG_SCALE)


def _discretized_logistic_log_prob(
    loc: torch.Tensor, log_scale: torch.Tensor, x: torch.Tensor, levels: int
) -> torch.Tensor:
    """log P(x) per element for x on the grid {0, 1/(L-1), ..., 1}: the logistic's mass over x's bin.

    With a = (x + h - loc) / s and b = (x - h - loc) / s (h: half a bin), P = sigmoid(a) - sigmoid(b)
    = sigmoid(a) * (1 - sigmoid(b)) * (1 - exp(b - a)), whose log is stable everywhere; the bottom
    bin has b = -inf and the top bin a = +inf. Values off the grid are snapped to the nearest level.
    """
    step = 1.0 / (levels - 1)
    x = torch.round(x.clamp(0.0, 1.0) / step) * step
    inv_s = torch.exp(-log_scale)
    a = (x - loc + 0.5 * step) * inv_s
    b = (x - loc - 0.5 * step) * inv_s
    inf = torch.full_like(a, math.inf)
    a = torch.where(x > 1.0 - 0.5 * step, inf, a)  # top level: everything above
    b = torch.where(x < 0.5 * step, -inf, b)  # bottom level: everything below
    return -F.softplus(-a) - F.softplus(b) + torch.log(-torch.expm1(b - a))


def likelihood_for(x_train: np.ndarray, *, images: bool, requested: str = "auto") -> Likelihood:
    """The likelihood of raw training data: Bernoulli for two values, a discretized logistic for integer
    images on a grid (from the train minimum to the train maximum in steps of 1), else a Gaussian.

    Tables are continuous (their features are standardized one by one). `requested` names a kind to use
    instead of `auto`; ValueError when the data cannot carry it (Bernoulli on more than two values, a
    discretized likelihood on data off an integer grid).
    """
    levels, binary = _grid(x_train) if images else (None, False)
    if requested == "auto":
        if binary:
            return Likelihood("bernoulli")
        return Likelihood("discretized_logistic", levels) if levels is not None else Likelihood("gaussian")
    if requested == "bernoulli" and not binary:
        raise ValueError(
            "likelihood bernoulli needs binary data (two values); use auto "
            f"({'discretized_logistic' if levels else 'gaussian'} for this data)"
        )
    if requested == "discretized_logistic":
        if levels is None:
            raise ValueError("likelihood discretized_logistic needs images with integer values on a grid; use auto")
        return Likelihood("discretized_logistic", levels)
    return Likelihood(requested)  # type: ignore[arg-type]


def _grid(x: np.ndarray) -> tuple[int | None, bool]:
    """(levels of the integer grid from min to max, or None when off such a grid; whether x takes two values)."""
    lo, hi = float(x.min()), float(x.max())
    binary = hi > lo and bool(np.all((x == lo) | (x == hi)))
    integral = x.dtype.kind in "iub" or bool(np.all(np.mod(x, 1) == 0))
    fits = integral and hi > lo and hi - lo + 1 <= MAX_LEVELS
    return (int(hi - lo) + 1 if fits else None), binary
