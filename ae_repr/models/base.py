"""The one abstract base every autoencoder variant subclasses, and the config fields all variants share.

A variant maps inputs of a fixed shape (flat `(D,)` or image `(C, H, W)`, already normalized) to a
`latent_dim`-wide representation (`encode`), back to data space (`decode`), and reports its training
objective as a dict of named terms (`loss`). Training schedules (KL warm-up, free bits) are passed to
`loss` as keyword arguments by the trainer, with the trainer's random generator; input corruption is applied by the trainer, which then
calls `loss(corrupted, target=clean)`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from ..likelihoods import Likelihood


class Corruption(BaseModel):
    """An input corruption for denoising training: `gaussian` (level = noise std), `masking` and
    `salt_and_pepper` (level = probability per input element)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["gaussian", "masking", "salt_and_pepper"]
    level: float = Field(gt=0)

    @model_validator(mode="after")
    def _probability_in_range(self) -> Corruption:
        if self.kind != "gaussian" and not 0 < self.level <= 1:
            raise ValueError(f"corruption {self.kind} needs a probability level in (0, 1], got {self.level}")
        return self


class ModelConfig(BaseModel):
    """Fields shared by every variant; each variant's own config subclasses this."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    latent_dim: int = Field(16, gt=0)
    backbone: Literal["auto", "mlp", "conv"] = "auto"  # auto: conv for (C, H, W) inputs, mlp for flat
    hidden: tuple[int, ...] = (512, 256)  # MLP widths, input side first
    channels: tuple[int, ...] = (32, 64)  # conv channels, input side first (each layer halves H and W)
    # auto: bernoulli for binary data, discretized_logistic for integer images, gaussian otherwise (the trainer
    # resolves it from the training data; see ae_repr.likelihoods)
    likelihood: Literal["auto", "bernoulli", "discretized_logistic", "gaussian"] = "auto"
    corruption: Corruption | None = None


class Autoencoder(nn.Module, ABC):
    """Abstract autoencoder: `encode`, `decode`, `loss`; built from a config and the input shape.

    What a variant can do beyond these (a prior to sample from, a Gaussian posterior, a codebook, anomaly
    scores of its own) it declares by having the methods of `ae_repr.models.capabilities`' protocols.
    """

    Config: ClassVar[type[ModelConfig]] = ModelConfig
    # config fields that change only the training objective, never the network or what a forward pass computes
    # (the trainer applies the corruption): two configs differing only here build identical models
    LOSS_ONLY_FIELDS: ClassVar[frozenset[str]] = frozenset({"corruption"})

    def __init__(
        self, cfg: ModelConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian"
    ) -> None:
        super().__init__()
        # derived defaults: the trainer resolves likelihood "auto" from the data (levels included) and passes it
        # in, as a Likelihood or its spec string ("bernoulli", "gaussian", "discretized_logistic:17")
        self.cfg = cfg
        self.input_shape = tuple(int(s) for s in input_shape)
        self.likelihood = Likelihood.parse(likelihood)
        if cfg.likelihood not in ("auto", self.likelihood.kind):
            self.likelihood = Likelihood.parse(cfg.likelihood)  # a level count comes only from the data
        assert len(self.input_shape) in (1, 3), f"input shape must be (D,) or (C, H, W), got {self.input_shape}"

    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic representation, (B, latent_dim)."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Data-space reconstruction (mean of the likelihood), (B, *input_shape)."""

    @abstractmethod
    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """`"loss"`: weighted total for backprop; other keys: detached unweighted scalar terms.

        Random draws (posterior samples, code resets) come from `generator` when given, so a run does
        not depend on other threads drawing from torch's global generator.
        """

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """decode(encode(x))."""
        return self.decode(self.encode(x))
