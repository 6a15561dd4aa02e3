"""What a model can do beyond encode/decode/loss, as small checkable protocols: evaluation asks a model for a
capability (`isinstance(model, Prior)`), never for its class, and skips the tasks a model cannot serve with a
reason. A variant gets a capability by having its methods; a plug-in needs no registration for it.

- `GaussianPosterior`: a Gaussian q(z|x) scored against its prior: per-dimension KL and importance weights
  (rate-distortion, the importance-sampled likelihood, KL-ranked traversals).
- `Prior`: a prior to `sample` from, and the geometry interpolation should follow in its latent space.
- `Quantized`: a codebook: code indices per position, decoding of indices, re-projection onto the codes.
- `AnomalyScorer`: anomaly scores of its own, besides the reconstruction error every model gets.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch

Geometry = Literal["spherical", "linear"]


@runtime_checkable
class GaussianPosterior(Protocol):
    """Gaussian posterior with per-dimension KL and importance weights (kl_per_dim, log_weight)"""

    def kl_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-row, per-dimension KL(q(z|x) || p(z)), (B, latent_dim)."""
        ...

    def log_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1, widen: float = 1.0
    ) -> torch.Tensor:
        """log p(x, z) - log r(z|x) at `draws` draws z ~ r per row, (draws * B,) draw-major: r = q(z|x), or with
        `widen` > 1 the mixture 1/2 q + 1/2 q_widen, q with every standard deviation times `widen`
        (`ae_repr.losses.proposal_shift`, `mixture_log_density`)."""
        ...


@runtime_checkable
class Prior(Protocol):
    """prior to sample from (sample, latent_geometry)"""

    @property
    def latent_geometry(self) -> Geometry:
        """How to interpolate between codes: `spherical` for a Gaussian prior (White 2016), else `linear`."""
        ...

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`n` decoded draws from the prior, (n, *input_shape)."""
        ...


@runtime_checkable
class Quantized(Protocol):
    """codebook (code_indices, decode_codes, project, codebook_size, positions)"""

    @property
    def codebook_size(self) -> int: ...

    @property
    def positions(self) -> int: ...

    def code_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest code's index at every position, (B, positions)."""
        ...

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The likelihood mean of code indices (B, positions), (B, *input_shape)."""
        ...

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_dim) moved onto their nearest codes at every position, (B, latent_dim)."""
        ...


@runtime_checkable
class AnomalyScorer(Protocol):
    """anomaly scores of its own (anomaly_scores)"""

    def anomaly_scores(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Scores per row (higher = more anomalous) by name, each (B,)."""
        ...


def describe(capability: type) -> str:
    """The capability in words, for a note on why a task was skipped."""
    return (capability.__doc__ or capability.__name__).strip()


class GaussianLatentScores:
    """Mixin of the Gaussian-latent models (they have `log_weight`): the negative ELBO as an anomaly score."""

    ELBO_DRAWS = 10  # posterior draws averaged into the negative-ELBO score
    latent_geometry: Geometry = "spherical"

    def anomaly_scores(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`neg_elbo`: the mean of -log w over `ELBO_DRAWS` posterior draws per row, (B,)."""
        draws = self.ELBO_DRAWS
        return {"neg_elbo": -self.log_weight(x, generator, draws=draws).reshape(draws, len(x)).mean(0)}  # type: ignore[attr-defined]
