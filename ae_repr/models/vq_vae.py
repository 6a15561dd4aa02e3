"""The vector-quantized VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning"):
the encoder's `latent_dim` outputs are cut into `latent_dim // code_dim` vectors, each replaced by
its nearest codebook entry; gradients pass the quantizer straight through, the codebook learns by
its own loss (or, with `ema`, by exponential moving averages of its assigned encoder outputs, as in
the paper's appendix), and a commitment term keeps the encoder close to its codes. Codes unused for
`dead_code_steps` training steps are reset to random encoder outputs of the current batch; the
counters start at that limit, so the first training step initializes the codebook from data.
The representation is the flattened quantized latent.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from ..likelihoods import Likelihood
from ..losses import code_counts, nearest_code, perplexity, straight_through
from .backbones import make_decoder, make_encoder
from .base import Autoencoder, ModelConfig


class VQVAEConfig(ModelConfig):
    """VQ-VAE fields: codebook size and code width, commitment weight, EMA updates, dead-code resets."""

    codebook_size: int = Field(128, ge=2)
    code_dim: int = Field(4, gt=0)  # positions = latent_dim // code_dim
    commitment: float = Field(0.25, ge=0)
    ema: bool = False  # codebook by moving averages instead of its gradient loss
    ema_decay: float = Field(0.99, gt=0, lt=1)
    # codes unused for this many training steps are reset to recent encoder outputs (0 disables); short,
    # because a code left dead for long stays dead: 200 steps let digits collapse to ~10 codes (probe 0.23),
    # 10 keeps ~110 of 128 in use (probe 0.86)
    dead_code_steps: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _code_dim_divides_latent(self) -> VQVAEConfig:
        if self.latent_dim % self.code_dim:
            raise ValueError(
                f"vq_vae: latent_dim {self.latent_dim} is not divisible by code_dim {self.code_dim} "
                "(the latent is cut into latent_dim // code_dim code vectors)"
            )
        return self


class VQVAE(Autoencoder):
    """Vector-quantized autoencoder; `encode` returns the quantized latent, (B, latent_dim). Capabilities:
    Quantized, AnomalyScorer (no prior of its own: evaluation fits one to the codes)."""

    Config = VQVAEConfig
    EMA_EPS = 1e-5  # Laplace smoothing of EMA cluster sizes

    def __init__(self, cfg: VQVAEConfig, input_shape: tuple[int, ...], likelihood: str | Likelihood = "gaussian") -> None:
        super().__init__(cfg, input_shape, likelihood)
        assert isinstance(cfg, VQVAEConfig), f"VQVAE needs a VQVAEConfig, got {type(cfg).__name__}"
        self.positions = cfg.latent_dim // cfg.code_dim
        self.encoder = make_encoder(self.input_shape, cfg.latent_dim, cfg)
        self.decoder = make_decoder(cfg.latent_dim, self.input_shape, cfg, self.likelihood.params)
        k, d = cfg.codebook_size, cfg.code_dim
        init = torch.empty(k, d).uniform_(-1.0 / k, 1.0 / k)
        if cfg.ema:  # moving averages own the codebook: a buffer, untouched by the optimizer
            self.register_buffer("codebook", init)
            self.register_buffer("ema_cluster_size", torch.ones(k))
            self.register_buffer("ema_embed_sum", init.clone())
        else:
            self.codebook = torch.nn.Parameter(init)
        self.register_buffer("steps_unused", torch.full((k,), cfg.dead_code_steps, dtype=torch.long))

    def _codes(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder outputs as code-sized rows, (B * P, code_dim)."""
        # float32 even under bf16 autocast: codebook statistics (counts, EMA sums) need the precision
        return self.encoder(x).float().reshape(-1, self.cfg.code_dim)  # (B, L) -> (B * P, D)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest codes for rows `z` (N, code_dim): (indices (N,), quantized (N, code_dim))."""
        idx = nearest_code(z.detach(), self.codebook)
        return idx, F.embedding(idx, self.codebook)

    @property
    def codebook_size(self) -> int:
        return self.cfg.codebook_size

    def project(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_dim) replaced by their nearest codes at every position, (B, latent_dim)."""
        return self.quantize(z.reshape(-1, self.cfg.code_dim))[1].reshape(-1, self.latent_dim)  # (B * P, D) -> (B, L)

    def anomaly_scores(self, x: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """`code_distance`: the quantization error per row (see `quantization_error`), (B,)."""
        return {"code_distance": self.quantization_error(x)}

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The quantized latent, flattened, (B, latent_dim)."""
        z = self._codes(x)
        z_q = self.quantize(z)[1]
        # under autograd (fine-tuning through encode) pass gradients straight through to the encoder;
        # otherwise return the code vectors exactly
        z_q = straight_through(z, z_q) if torch.is_grad_enabled() else z_q
        return z_q.reshape(x.shape[0], self.latent_dim)  # (B, P * D)

    @torch.no_grad()
    def code_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The nearest code's index at every position, (B, positions)."""
        return self.quantize(self._codes(x))[0].reshape(x.shape[0], self.positions)

    @torch.no_grad()
    def quantization_error(self, x: torch.Tensor) -> torch.Tensor:
        """Squared distance from the encoder outputs to their nearest codes, summed over positions, (B,)."""
        z = self._codes(x)  # (B * P, D)
        return (z - self.quantize(z)[1]).pow(2).sum(1).reshape(x.shape[0], self.positions).sum(1)

    def decode_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """The likelihood mean of code indices (B, positions), (B, *input_shape)."""
        z_q = F.embedding(indices, self.codebook)  # (B, P, D)
        return self.decode(z_q.reshape(indices.shape[0], self.latent_dim))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood mean of (quantized) latents `z` (B, latent_dim), (B, *input_shape)."""
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def _revive_dead_codes(self, z: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Reset codes unused for `dead_code_steps` steps to random rows of `z` (no host sync)."""
        dead = self.steps_unused >= self.cfg.dead_code_steps  # (K,)
        pick = z[torch.randint(0, z.shape[0], (self.cfg.codebook_size,), generator=generator, device=z.device)]  # (K, D)
        self.codebook.copy_(torch.where(dead[:, None], pick, self.codebook))
        self.steps_unused.masked_fill_(dead, 0)
        if self.cfg.ema:
            self.ema_embed_sum.copy_(torch.where(dead[:, None], pick, self.ema_embed_sum))
            self.ema_cluster_size.masked_fill_(dead, 1.0)

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """Move each code toward the mean of the encoder outputs assigned to it."""
        decay = self.cfg.ema_decay
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, z)  # (K, D)
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.EMA_EPS) / (n + self.cfg.codebook_size * self.EMA_EPS) * n
        self.codebook.copy_(self.ema_embed_sum / size[:, None])

    def loss(
        self,
        x: torch.Tensor,
        *,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        **schedule: Any,
    ) -> dict[str, torch.Tensor]:
        """recon + codebook (unless ema) + commitment * commit; updates codebook state in training mode."""
        batch = x.shape[0]
        z = self._codes(x)  # (B * P, D)
        if self.training and self.cfg.dead_code_steps > 0:
            self._revive_dead_codes(z.detach(), generator)
        idx, z_q = self.quantize(z)
        counts = code_counts(idx, self.cfg.codebook_size, z.dtype)  # (K,)
        if self.training:
            self.steps_unused.add_(1).masked_fill_(counts > 0, 0)
            if self.cfg.ema:
                self._ema_update(z.detach(), idx, counts)
        # per-sample sums over all positions, like the recon term
        commit = (z - z_q.detach()).pow(2).sum() / batch
        z_st = straight_through(z, z_q).reshape(batch, self.latent_dim)  # (B, P * D)
        recon = self.likelihood.nll(self.decoder(z_st), x if target is None else target)
        total = recon + self.cfg.commitment * commit if self.cfg.commitment > 0 else recon
        if not self.cfg.ema:
            codebook = (z.detach() - z_q).pow(2).sum() / batch
            total = total + codebook
        return {
            "loss": total,
            "recon": recon.detach(),
            # the codebook and commitment terms share one value (the quantization error); they differ
            # in which side gets the gradient, so with ema the reported codebook term is that value
            "vq_codebook": commit.detach(),
            "vq_commit": commit.detach(),
            "perplexity": perplexity(counts),
            "used_codes": (counts > 0).sum().to(z.dtype),
        }
