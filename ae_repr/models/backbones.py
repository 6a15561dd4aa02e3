"""Encoder and decoder networks shared by every variant: an MLP for flat inputs and a small
stride-2 conv stack for images. Decoders return the likelihood's RAW output, `params` values per
input element shaped (B, params, *input_shape) (a logit, or a location and a log scale); the models'
likelihood turns it into probabilities and a mean (`ae_repr.likelihoods`).
`inference_copy` freezes a trained model's small convs into matrix products for evaluation.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import TypeVar

import torch
from torch import nn

from ..errors import ConfigError
from .base import Autoencoder, ModelConfig

M = TypeVar("M", bound=Autoencoder)

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


def make_decoder(in_dim: int, input_shape: tuple[int, ...], cfg: ModelConfig, params: int = 1) -> nn.Module:
    """Latents (B, in_dim) -> raw outputs (B, params, *input_shape), mirroring `make_encoder`."""
    kind = resolve_backbone(input_shape, cfg)
    if kind == "mlp":
        layers = _mlp([in_dim, *reversed(cfg.hidden), params * math.prod(input_shape)])
        return nn.Sequential(*layers, nn.Unflatten(1, (params, *input_shape)))  # (B, P*D) -> (B, P, *input_shape)
    assert cfg.channels, "the conv backbone needs at least one entry in `channels`"
    c, h, w = input_shape
    c_out = params * c
    chans = list(reversed(cfg.channels))  # deepest first
    h0, w0 = _conv_sizes(h, w, len(chans))
    layers = [nn.Linear(in_dim, chans[0] * h0 * w0), Activation(), nn.Unflatten(1, (chans[0], h0, w0))]
    for a, b in zip(chans, [*chans[1:], c_out], strict=True):
        # kernel 4, stride 2, padding 1 doubles H and W exactly
        layers += [nn.ConvTranspose2d(a, b, kernel_size=4, stride=2, padding=1), Activation()]
    layers.pop()  # no activation on the raw output
    if (h0 << len(chans), w0 << len(chans)) != (h, w):
        layers.append(_Crop(h, w))
    return nn.Sequential(*layers, nn.Unflatten(1, (params, c)))  # (B, P*C, H, W) -> (B, P, C, H, W)


class DenseConv(nn.Module):
    """A trained conv layer frozen into one matrix product on flattened inputs: the same affine map, read
    off the layer by pushing the standard basis of its input shape through it. On small images this beats
    oneDNN's conv kernels (the 8x8 conv decoder decodes about 3x faster); the matrix has in x out
    elements, so `inference_copy` keeps the convs of large images."""

    def __init__(self, layer: nn.Module, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        n, device = math.prod(in_shape), layer.weight.device
        with torch.no_grad():
            bias = layer(torch.zeros(1, *in_shape, device=device))  # (1, *out_shape)
            weight = layer(torch.eye(n, device=device).reshape(n, *in_shape)) - bias  # row i: basis vector i's image
        self.out_shape = tuple(bias.shape[1:])
        self.register_buffer("weight", weight.reshape(n, -1).contiguous())  # (in, out)
        self.register_buffer("bias", bias.reshape(-1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(len(x), -1), self.weight).reshape(len(x), *self.out_shape)


class SubpixelConvTranspose(nn.Module):
    """A trained ConvTranspose2d(kernel 4, stride 2, padding 1) frozen as a 3x3 conv to four times its channels and
    a pixel shuffle, the same affine map: output pixel (2i+r, 2j+s) reads inputs (i+dy, j+dx), dy, dx in -1..1,
    through the transposed kernel's tap (r+1-2dy, s+1-2dx) where that lies in the kernel. oneDNN's transposed conv
    is slow with few output channels: decoding 64x64 dSprites' last layer (32 -> 1 channel) takes about half the
    time this way. `inference_copy` uses it where 4 x out_channels <= in_channels."""

    def __init__(self, layer: nn.ConvTranspose2d) -> None:
        super().__init__()
        w = layer.weight.detach()  # (in, out, 4, 4)
        taps = w.new_zeros(layer.out_channels, 2, 2, layer.in_channels, 3, 3)  # (out, r, s, in, dy+1, dx+1)
        for r in range(2):
            for dy in range(-1, 2):
                ky = r + 1 - 2 * dy
                for s in range(2):
                    for dx in range(-1, 2):
                        kx = s + 1 - 2 * dx
                        if 0 <= ky < 4 and 0 <= kx < 4:
                            taps[:, r, s, :, dy + 1, dx + 1] = w[:, :, ky, kx].T
        # pixel_shuffle reads channel c * 4 + r * 2 + s as output channel c at offset (r, s)
        weight = taps.reshape(4 * layer.out_channels, layer.in_channels, 3, 3)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        bias = layer.bias.detach() if layer.bias is not None else w.new_zeros(layer.out_channels)
        self.register_buffer("bias", bias.repeat_interleave(4))

    @staticmethod
    def fits(layer: nn.Module) -> bool:
        """A transposed conv this form computes, and faster: kernel 4, stride 2, padding 1, few output channels."""
        return (isinstance(layer, nn.ConvTranspose2d) and layer.kernel_size == (4, 4) and layer.stride == (2, 2)
                and layer.padding == (1, 1) and layer.output_padding == (0, 0) and layer.dilation == (1, 1)
                and layer.groups == 1 and 4 * layer.out_channels <= layer.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.pixel_shuffle(nn.functional.conv2d(x, self.weight, self.bias, padding=1), 2)


def inference_copy(model: M, max_entries: int = 1 << 20) -> M:
    """A copy of a trained model for inference only (its weights frozen as they are now) in which every
    conv layer whose dense matrix has at most `max_entries` elements is a `DenseConv`, the other transposed convs
    with few output channels are `SubpixelConvTranspose`s, and the rest are channels-last, its activations in
    place where nothing else reads their input (`inplace_activations`); the model itself when it has no conv.
    Outputs equal the model's up to float rounding. Layers and their shapes are found by one `reconstruct` of a
    zero input; a layer seen with several input shapes stays a conv."""
    convs = {m: name for name, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.ConvTranspose2d)}
    if not convs:
        return model
    seen: dict[str, set[tuple[tuple[int, ...], int]]] = {}  # layer name -> {(input shape, output size)}

    def record(layer: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen.setdefault(convs[layer], set()).add((tuple(args[0].shape[1:]), out[0].numel()))

    hooks = [m.register_forward_hook(record) for m in convs]
    device = next(iter(convs)).weight.device
    try:
        with torch.no_grad():
            model.reconstruct(torch.zeros(1, *model.input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    small = {}
    for name, shapes in seen.items():
        (in_shape, out_numel), *others = shapes
        if not others and math.prod(in_shape) * out_numel <= max_entries:
            small[name] = in_shape
    model = copy.deepcopy(model)
    for name in seen:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = owner.get_submodule(child)
        if name in small:
            setattr(owner, child, DenseConv(layer, small[name]))
        elif SubpixelConvTranspose.fits(layer):
            setattr(owner, child, SubpixelConvTranspose(layer))
    inplace_activations(model)
    # the convs left (large images) in channels-last layout, as in training: decoding 64x64 dSprites 1.36x faster
    return model.to(memory_format=torch.channels_last) if len(small) < len(seen) else model


_FRESH_OUTPUT = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d, DenseConv, SubpixelConvTranspose)


def inplace_activations(model: nn.Module) -> None:
    """Activations that follow a layer with a fresh output inside a Sequential compute in place (for inference
    only: autograd may need the input). Nothing else holds that tensor, and writing into it spares allocating
    a new one: SiLU on 320 64x64 dSprites activations (32 x 32 x 32) took 10 ms instead of 36."""
    for seq in model.modules():
        if isinstance(seq, nn.Sequential):
            for before, layer in itertools.pairwise(seq):
                if isinstance(before, _FRESH_OUTPUT) and isinstance(layer, Activation):
                    layer.inplace = True
