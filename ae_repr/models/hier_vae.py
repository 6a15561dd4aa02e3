"""A hierarchical VAE with a top-down inference path, after the ladder VAE (Sønderby et al. 2016,
"Ladder Variational Autoencoders") and NVAE (Vahdat & Kautz 2020, "NVAE: A Deep Hierarchical
Variational Autoencoder"): a deterministic bottom-up path gives features for every level; the top
level's posterior q(z_L|x) is scored against N(0, I); walking down, each lower level gets a prior
p(z_l | z_>l) from the top-down state and a posterior q(z_l | x, z_>l) parameterized as a residual
on that prior (NVAE's residual normal), from the bottom-up features and the top-down state; the
state is updated residually with each sampled level and finally decoded. The representation is all
levels' posterior means concatenated, bottom level first (width latent_dim).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import model_validator
from torch import nn

from ..likelihoods import Likelihood
from ..losses import (
    gaussian_kl,
    gaussian_kl_two,
    gaussian_log_density,
    mixture_log_density,
    proposal_shift,
    reparameterize,
    repeat_rows,
    vae_terms,
)
from .backbones import Activation, make_decoder, make_encoder
from .base import Autoencoder
from .capabilities import GaussianLatentScores
from .vae import VAEConfig


class HierVAEConfig(VAEConfig):
    """Hierarchical VAE fields: the levels' widths, bottom first (None: latent_dim split in two)."""

    level_dims: tuple[int, ...] | None = None

    @model_validator(mode="after")
    def _levels_fit_latent(self) -> HierVAEConfig:
        if self.level_dims is None:
            if self.latent_dim < 2:
                raise ValueError(f"hier_vae needs latent_dim >= 2 for two levels, got {self.latent_dim}")
            return self
        if len(self.level_dims) < 2 or min(self.level_dims) < 1:
            raise ValueError(
                f"hier_vae: level_dims needs at least two positive widths, got {list(self.level_dims)}"
            )
        if sum(self.level_dims) != self.latent_dim:
            raise ValueError(
                f"hier_vae: level_dims {list(self.level_dims)} sum to {sum(self.level_dims)}, "
                f"not latent_dim {self.latent_dim}"
            )
        return self

    def resolved_level_dims(self) -> tuple[int, ...]:
        """The levels' widths, bottom first: `level_dims`, or latent_dim split in two (bottom gets the odd one)."""
        if self.level_dims is not None:
            return self.level_dims
        top = self.latent_dim // 2
        return (self.latent_dim - top, top)


@dataclass(frozen=True)
class Level:
    """One level's distributions in a pass: posterior (mu_q, logvar_q), prior (None: N(0, I)), the draw z."""

    mu_q: torch.Tensor
    logvar_q: torch.Tensor
    mu_p: torch.Tensor | None
    logvar_p: torch.Tensor | None
    z: torch.Tensor

    def kl(self) -> torch.Tensor:
        """Per-dimension KL(q || p), (B, d)."""
        if self.mu_p is None or self.logvar_p is None:
            return gaussian_kl(self.mu_q, self.logvar_q)
        return gaussian_kl_two(self.mu_q, self.logvar_q, self.mu_p, self.logvar_p)


class _Residual(nn.Module):
    """h + f([h, extra]): the residual block of both deterministic paths."""

    def __init__(self, width: int, extra: int = 0) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width + extra, width), Activation(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        return h + self.f(h if extra is None else torch.cat([h, extra], dim=1))


class HierVAE(GaussianLatentScores, Autoencoder):
    """Top-down hierarchical VAE; `encode` is all levels' posterior means, bottom first. Capabilities:
    GaussianPosterior, Prior, AnomalyScorer."""

    Config = HierVAEConfig
    LOSS_ONLY_FIELDS = Autoencoder.LOSS_ONLY_FIELDS | {"beta"}  # beta weighs the KL in `loss` and nothing else

    def __init__(
        self, cfg: HierVAEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian"
    ) -> None:
        super().__init__(cfg, input_shape, likelihood)
        assert isinstance(cfg, HierVAEConfig), f"HierVAE needs a HierVAEConfig, got {type(cfg).__name__}"
        self.level_dims = cfg.resolved_level_dims()  # bottom first
        width = cfg.hidden[-1] if cfg.hidden else 256  # the deterministic paths' width
        lower = self.level_dims[:-1]
        self.encoder = make_encoder(self.input_shape, width, cfg)  # bottom-up features of level 0
        self.bottom_up = nn.ModuleList(_Residual(width) for _ in lower)  # features of level l -> l + 1
        self.top_posterior = nn.Linear(width, 2 * self.level_dims[-1])
        self.top_in = nn.Linear(self.level_dims[-1], width)  # z_L -> top-down state
        self.priors = nn.ModuleList(nn.Linear(width, 2 * d) for d in lower)  # state -> (mu_p, logvar_p)
        self.posteriors = nn.ModuleList(
            nn.Linear(2 * width, 2 * d) for d in lower
        )  # [feat, state] -> residual
        self.top_down = nn.ModuleList(_Residual(width, d) for d in lower)  # state, z_l -> state
        self.decoder = make_decoder(width, self.input_shape, cfg, self.likelihood.params)

    def _walk(self, z_top: torch.Tensor, draw: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Top-down state after every level; `draw(l, state)` gives lower level l's z, top first."""
        state = self.top_in(z_top)
        for lvl in reversed(range(len(self.level_dims) - 1)):
            state = self.top_down[lvl](state, draw(lvl, state))
        return state

    def infer(
        self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None, draws: int = 1,
        shift: torch.Tensor | float = 0.0,
    ) -> tuple[torch.Tensor, list[Level]]:
        """Posterior pass: final top-down state and each level's distributions, bottom first.

        With `draws` > 1 the bottom-up pass runs once and the top-down pass `draws` times per row, as
        (draws * B) rows, draw-major. `shift` is added to every level's log-variance when drawing
        (`proposal_shift`); the levels keep q's own.
        """
        feats = [self.encoder(x)]
        for block in self.bottom_up:
            feats.append(block(feats[-1]))
        feats = [repeat_rows(f, draws) for f in feats]
        mu, logvar = self.top_posterior(feats[-1]).float().chunk(2, dim=1)
        top = Level(mu, logvar, None, None, reparameterize(mu, logvar + shift, generator) if sample else mu)
        levels: list[Level] = []

        def draw(lvl: int, state: torch.Tensor) -> torch.Tensor:
            mu_p, logvar_p = self.priors[lvl](state).float().chunk(2, dim=1)
            d_mu, d_logvar = self.posteriors[lvl](torch.cat([feats[lvl], state], dim=1)).float().chunk(2, dim=1)
            mu_q, logvar_q = mu_p + d_mu, logvar_p + d_logvar  # residual normal: posterior relative to prior
            z = reparameterize(mu_q, logvar_q + shift, generator) if sample else mu_q
            levels.append(Level(mu_q, logvar_q, mu_p, logvar_p, z))
            return z

        state = self._walk(top.z, draw)
        return state, [*reversed(levels), top]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """All levels' posterior means (lower ones given the means above), (B, latent_dim)."""
        return torch.cat([lv.mu_q for lv in self.infer(x, sample=False)[1]], dim=1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean given every level's z concatenated bottom first, (B, *input_shape)."""
        zs = z.split(self.level_dims, dim=1)  # bottom first
        return self.likelihood.mean(self.decoder(self._walk(zs[-1], lambda lvl, _: zs[lvl])))

    def kl_per_dim(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-row, per-dimension KL(q || p), (B, latent_dim), levels bottom first; lower levels are scored at a
        posterior draw of the levels above, or at their means when `generator` is None (their priors depend on
        those draws)."""
        levels = self.infer(x, sample=generator is not None, generator=generator)[1]
        return torch.cat([lv.kl() for lv in levels], dim=1)  # (B, latent_dim), bottom first

    def log_weight(
        self, x: torch.Tensor, generator: torch.Generator | None = None, draws: int = 1, widen: float = 1.0
    ) -> torch.Tensor:
        """log p(x, z) - log r(z|x) at `draws` draws of every level, constants included, (draws * B,) draw-major;
        r is the posterior q, or with `widen` > 1 the defensive mixture 1/2 q + 1/2 q_widen of the joint (each
        draw's every level from one component, `proposal_shift`). The bottom-up pass runs once per row."""
        shift = proposal_shift(len(x) * draws, widen, generator, x.device)
        state, levels = self.infer(x, generator=generator, draws=draws, shift=shift)
        log_w = self.likelihood.log_prob(self.decoder(state), repeat_rows(x, draws))
        for lv in levels:  # the top level's prior is N(0, I) (mu_p None); lower levels' come from the state
            log_w = log_w + gaussian_log_density(lv.z, lv.mu_p, lv.logvar_p)
        return log_w - mixture_log_density([(lv.z, lv.mu_q, lv.logvar_q) for lv in levels], widen)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral draws from the prior, top level first, decoded, (n, *input_shape)."""
        device = self.top_in.weight.device
        z_top = torch.randn(n, self.level_dims[-1], generator=generator, device=device)

        def draw(lvl: int, state: torch.Tensor) -> torch.Tensor:
            mu_p, logvar_p = self.priors[lvl](state).float().chunk(2, dim=1)
            return reparameterize(mu_p, logvar_p, generator)

        return self.likelihood.mean(self.decoder(self._walk(z_top, draw)))

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        kl_weight: float = 1.0,
        free_bits: float = 0.0,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """recon + beta * kl_weight * sum of level KLs (free bits per dimension); kl_0 is the bottom level."""
        state, levels = self.infer(x, generator=generator)
        recon = self.likelihood.nll(self.decoder(state), x if target is None else target)
        kls = [lv.kl() for lv in levels]  # (B, d_l) each
        terms = vae_terms(
            recon,
            torch.cat(kls, dim=1),  # (B, latent_dim)
            torch.cat([lv.mu_q for lv in levels], dim=1),
            weight=self.cfg.beta * kl_weight,
            free_bits=free_bits,
        )
        for i, kl in enumerate(kls):
            terms[f"kl_{i}"] = kl.detach().sum(1).mean()
        return terms
