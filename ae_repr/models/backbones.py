"""Encoder and decoder networks shared by every variant: an MLP for flat inputs and a small
stride-2 conv stack for images. Decoders return the likelihood's RAW output (logits for Bernoulli,
values for Gaussian) shaped like the input; the models turn it into a mean (`likelihood_mean`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import ConfigError
from .base import ModelConfig

Activation = nn.SiLU  # smooth: kinder than ReLU to small VAEs (no dead units), same cost here


def resolve_backbone(input_shape: tuple[int, ...], cfg: ModelConfig) -> str:
    """The backbone for these inputs, "mlp" or "conv": auto picks conv for (C, H, W), mlp for (D,)."""
    if cfg.backbone == "auto":
        return "conv" if len(input_shape) == 3 else "mlp"
    if cfg.backbone == "conv" and len(input_shape) != 3:
        raise ConfigError(f"backbone 'conv' needs image inputs (C, H, W), got shape {tuple(input_shape)}")
    return cfg.backbone


def _mlp(widths: list[int]) -> list[nn.Module]:
    """Linear layers through `widths`, an activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(Activation())
    return layers


def _conv_sizes(h: int, w: int, n: int) -> tuple[int, int]:
    """Spatial size after `n` stride-2 convs (kernel 3, padding 1): each rounds H/2 and W/2 up."""
    for _ in range(n):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


class _Crop(nn.Module):
    """Crops (B, C, H', W') to the top-left (H, W): transposed convs overshoot odd sizes."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., : self.h, : self.w]


def make_encoder(input_shape: tuple[int, ...], out_dim: int, cfg: ModelConfig) -> nn.Module:
    """Inputs (B, *input_shape) -> features (B, out_dim)."""
    kind = resolve_backbone(input_shape, cfg)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), *_mlp([math.prod(input_shape), *cfg.hidden, out_dim]))
    assert cfg.channels, "the conv backbone needs at least one entry in `channels`"
    c, h, w = input_shape
    layers: list[nn.Module] = []
    for ch in cfg.channels:
        layers += [nn.Conv2d(c, ch, kernel_size=3, stride=2, padding=1), Activation()]
        c = ch
    h, w = _conv_sizes(h, w, len(cfg.channels))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * h * w, out_dim))  # (B, C*h*w) -> (B, out)


def make_decoder(in_dim: int, input_shape: tuple[int, ...], cfg: ModelConfig) -> nn.Module:
    """Latents (B, in_dim) -> raw outputs (B, *input_shape), mirroring `make_encoder`."""
    kind = resolve_backbone(input_shape, cfg)
    if kind == "mlp":
        layers = _mlp([in_dim, *reversed(cfg.hidden), math.prod(input_shape)])
        return nn.Sequential(*layers, nn.Unflatten(1, tuple(input_shape)))  # (B, D) -> (B, *input_shape)
    assert cfg.channels, "the conv backbone needs at least one entry in `channels`"
    c_out, h, w = input_shape
    chans = list(reversed(cfg.channels))  # deepest first
    h0, w0 = _conv_sizes(h, w, len(chans))
    layers = [nn.Linear(in_dim, chans[0] * h0 * w0), Activation(), nn.Unflatten(1, (chans[0], h0, w0))]
    for a, b in zip(chans, [*chans[1:], c_out], strict=True):
        # kernel 4, stride 2, padding 1 doubles H and W exactly
        layers += [nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1), Activation()]
    layers.pop()  # no activation on the raw output
    if (h0 << len(chans), w0 << len(chans)) != (h, w):
        layers.append(_Crop(h, w))
    return nn.Sequential(*layers)
