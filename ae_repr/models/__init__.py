"""The models' public interface: the registry (see `ae_repr.variants`), building a variant, its capabilities."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..likelihoods import Likelihood
from ..variants import Variant, lookup, registry
from .backbones import inference_copy
from .base import Autoencoder, Corruption, ModelConfig
from .capabilities import AnomalyScorer, GaussianPosterior, Prior, Quantized

# the registry itself lives in ae_repr.variants (names readable without importing torch); this is the same dict
REGISTRY: dict[str, Variant] = registry()


def model_config(variant: str, **fields: Any) -> ModelConfig:
    """The variant's typed config: its registry defaults, then `fields` (validated; unknown keys rejected)."""
    entry = lookup(variant)
    return entry.load().Config.model_validate({**entry.defaults, **fields})


# module initializers draw from torch's global generator: every module construction takes this lock,
# so a seeded build in one thread (a variant of a flow run) gets the same weights as when built alone
_INIT_LOCK = threading.Lock()


@contextmanager
def module_init(seed: int | None = None) -> Iterator[None]:
    """Construct torch modules here: one thread at a time; with `seed`, initial weights depend on the seed
    alone and the global random state is restored afterwards."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def build_model(
    variant: str,
    cfg: ModelConfig,
    input_shape: tuple[int, ...],
    likelihood: str | Likelihood,
    *,
    seed: int | None = None,
) -> Autoencoder:
    """Instantiate a registered variant for inputs of `input_shape`; with `seed`, its initial weights
    depend on the seed alone (see `module_init`)."""
    cls = lookup(variant).load()
    with module_init(seed):
        return cls(cfg, input_shape, likelihood)


__all__ = [
    "REGISTRY",
    "AnomalyScorer",
    "GaussianPosterior",
    "Prior",
    "Quantized",
    "Autoencoder",
    "Corruption",
    "ModelConfig",
    "build_model",
    "inference_copy",
    "model_config",
    "module_init",
]
