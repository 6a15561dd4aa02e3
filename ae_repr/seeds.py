"""Pretraining-seed grids: which seeds a config trains each variant with, and the names of the grid's members.

With `train.seeds` holding more than one seed, every variant trains once per seed, and each of those models
(its folder, feature file, result rows and tracking run) is named `<variant>@seed=<s>`. With one seed (the
default: the config's `seed` alone) the plain variant name stays, as in a run without a grid. Only the
pretraining changes with the seed (the model's initialization, the validation rows, the batch order and noise);
the data split keeps `data.split_seed`, and the evaluation keeps the config's `seed`, so every member is scored
on the same episodes and resamples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import ExperimentConfig

SEED_MARK = "@seed="
_SEED_NAME = re.compile(r"(?P<variant>.+)@seed=(?P<seed>\d+)")


def seed_name(variant: str, seed: int) -> str:
    """The name of one grid member: `<variant>@seed=<s>`."""
    return f"{variant}{SEED_MARK}{seed}"


def split_seed_name(name: str) -> tuple[str, int | None]:
    """(variant, seed) of a grid member's name; (name, None) for any other name."""
    m = _SEED_NAME.fullmatch(name)
    return (m["variant"], int(m["seed"])) if m else (name, None)


def pretraining_seeds(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The seeds every variant is pretrained with: `train.seeds`, else the config's `seed` alone."""
    return tuple(cfg.train.seeds) if cfg.train.seeds else (cfg.seed,)


def with_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The config one member trains with: `seed` as its seed, and no grid of its own (the seed list would
    otherwise enter what the model depends on)."""
    return cfg.model_copy(update={"seed": seed, "train": cfg.train.model_copy(update={"seeds": None})})


@dataclass(frozen=True)
class Member:
    """One model of a run: a variant pretrained with one seed, and what it is called."""

    variant: str
    seed: int
    name: str  # the variant's name without a grid, else `<variant>@seed=<s>`
    cfg: ExperimentConfig  # the config it trains with (its `seed` is the member's seed)

    @property
    def in_grid(self) -> bool:
        """One of several seeds of its variant."""
        return self.name != self.variant

    @property
    def grid_seed(self) -> int | None:
        """The seed, for a member of a grid; None otherwise (nothing records a seed then)."""
        return self.seed if self.in_grid else None


def grid_members(cfg: ExperimentConfig) -> list[Member]:
    """Every (variant, seed) model a run over `cfg` trains, variant by variant, seeds in ascending order."""
    seeds = pretraining_seeds(cfg)
    grid = len(seeds) > 1
    out = []
    for v in cfg.models.variants:
        for s in seeds:
            # an explicit single seed still trains with it; without `train.seeds` the config is used as it is
            member_cfg = with_seed(cfg, s) if cfg.train.seeds else cfg
            out.append(Member(v, s, seed_name(v, s) if grid else v, member_cfg))
    return out
