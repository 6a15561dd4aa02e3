"""The variant registry: every public variant name, where its model class lives, its config defaults and
whether the default run trains it. The one source of variant names: CLI choices, config validation, the
default variant list, tests and benchmarks read it.

Built-in variants name their class as a `module:Class` string, imported on first use, so that reading the
names (`ae-repr --help`, config validation) does not import torch. Other packages add variants through the
entry-point group `ae_repr.variants` (name = variant name, value = `module:Class`, a subclass of
`ae_repr.models.Autoencoder`); a plug-in is never in the default run, and cannot replace a built-in name.
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .models import Autoencoder

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "ae_repr.variants"


@dataclass(frozen=True)
class Variant:
    """One registry entry: the class as `module:Class`, config defaults, membership of the default run."""

    target: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    default_run: bool = True
    source: str = "built-in"  # or the distribution that declared the entry point

    def load(self) -> type[Autoencoder]:
        """The model class, imported and checked against the plug-in contract."""
        return _load(self.target, self.source)


# name -> entry; order is the default run's and the report's. beta_vae and dae are config, not classes.
BUILTIN: dict[str, Variant] = {
    "ae": Variant("ae_repr.models.ae:AE"),
    # additive Gaussian noise (std 0.3 on [0, 1] data) rather than masking: an 8x8 digit pixel is a
    # large piece of a stroke, so masking 30% deletes strokes the code then has to guess. Measured
    # (conv AE, latent 16, 60 epochs, linear probe, mean of 5 seeds): gaussian 0.3 0.964, masking 0.1
    # 0.963, masking 0.3 0.956, plain AE 0.960.
    "dae": Variant("ae_repr.models.ae:AE", {"corruption": {"kind": "gaussian", "level": 0.3}}),
    "vae": Variant("ae_repr.models.vae:VAE"),
    "beta_vae": Variant("ae_repr.models.vae:VAE", {"beta": 4.0}),
    "vq_vae": Variant("ae_repr.models.vq_vae:VQVAE"),
    "hier_vae": Variant("ae_repr.models.hier_vae:HierVAE"),
    "wae": Variant("ae_repr.models.wae:WAE", default_run=False),  # not in the default run: its time budget
}


@functools.cache
def registry() -> dict[str, Variant]:
    """Built-in variants, then those of installed plug-ins (entry-point group `ae_repr.variants`)."""
    out = dict(BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        if ep.name in out:  # a plug-in must not silently change what a built-in name means
            log.warning("variant %r from %s ignored: the name is taken by %s", ep.name, dist, out[ep.name].source)
            continue
        out[ep.name] = Variant(ep.value, default_run=False, source=dist)
    return out


def lookup(name: str) -> Variant:
    """The registry entry of `name`; KeyError naming the known ones when there is none."""
    entries = registry()
    if name not in entries:
        raise KeyError(f"unknown variant {name!r}; choose from {', '.join(entries)}")
    return entries[name]


def variant_names() -> tuple[str, ...]:
    """Every registered variant name, built-ins first."""
    return tuple(registry())


def default_variants() -> tuple[str, ...]:
    """The variants the default run trains (built-ins only: reading them scans no installed packages)."""
    return tuple(name for name, v in BUILTIN.items() if v.default_run)


@functools.cache
def _load(target: str, source: str) -> type[Autoencoder]:
    from .models.base import Autoencoder, ModelConfig

    module, _, attr = target.partition(":")
    try:
        cls = functools.reduce(getattr, attr.split("."), importlib.import_module(module))
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"variant class {target!r} ({source}) cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
        raise ValueError(f"variant class {target!r} ({source}) is not a subclass of ae_repr.models.Autoencoder")
    if not (isinstance(cls.Config, type) and issubclass(cls.Config, ModelConfig)):
        raise ValueError(f"variant class {target!r} ({source}): its Config is not a subclass of ModelConfig")
    return cls
