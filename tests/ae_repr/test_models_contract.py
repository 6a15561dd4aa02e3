"""The contract every registered variant keeps (DESIGN section 2): shapes, loss terms, gradients,
save/load, strict config. New variants are covered by adding them to the registry."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from ae_repr.checkpoint import load_model, save_model
from ae_repr.config import ALL_VARIANTS, ModelsConfig
from ae_repr.data.dataset import Normalizer
from ae_repr.errors import ConfigError
from ae_repr.models import (
    REGISTRY,
    AnomalyScorer,
    Autoencoder,
    GaussianPosterior,
    Prior,
    Quantized,
    build_model,
    inference_copy,
    model_config,
)
from ae_repr.models.backbones import (
    DenseConv,
    SubpixelConvTranspose,
    inplace_activations,
    make_decoder,
    make_encoder,
)
from ae_repr.variants import BUILTIN, registry, variant_names

SHAPES = [(64,), (1, 8, 8)]
CASES = [(v, s) for v in REGISTRY for s in SHAPES] + [("vae", (1, 28, 28)), ("vq_vae", (1, 28, 28))]
B = 6


def _model(variant: str, shape: tuple[int, ...]) -> Autoencoder:
    torch.manual_seed(0)
    cfg = model_config(variant, latent_dim=8, hidden=(32, 16), channels=(8, 16))
    return build_model(variant, cfg, shape, "bernoulli")


def _x(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.rand(B, *shape, generator=torch.Generator().manual_seed(seed))


def test_registry_keys() -> None:
    assert list(REGISTRY)[: len(BUILTIN)] == list(BUILTIN)  # built-ins first; a new one needs no edit here
    assert REGISTRY is registry() and tuple(REGISTRY) == variant_names()
    # the default run is the registry's: no second list of names
    assert ALL_VARIANTS == ModelsConfig().variants == tuple(n for n, v in BUILTIN.items() if v.default_run)
    assert ALL_VARIANTS == ("ae", "dae", "vae", "beta_vae", "vq_vae", "hier_vae")
    assert model_config("dae").corruption is not None and model_config("ae").corruption is None


@pytest.mark.parametrize(("variant", "shape"), CASES)
def test_encode_decode_shapes(variant: str, shape: tuple[int, ...]) -> None:
    model = _model(variant, shape).eval()
    z = model.encode(_x(shape))
    assert z.shape == (B, 8) and z.dtype == torch.float32
    rec = model.decode(z)
    assert rec.shape == (B, *shape) and 0 <= rec.min() and rec.max() <= 1  # Bernoulli mean
    assert model.reconstruct(_x(shape)).shape == (B, *shape)


@pytest.mark.parametrize(("variant", "shape"), CASES)
def test_capabilities_keep_their_shapes(variant: str, shape: tuple[int, ...]) -> None:
    """Whatever capabilities a variant declares, their methods give what the protocols promise."""
    model, x = _model(variant, shape).eval(), _x(shape)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if isinstance(model, Prior):
            assert model.sample(3, gen).shape == (3, *shape)
            assert model.latent_geometry in ("spherical", "linear")
        if isinstance(model, GaussianPosterior):
            kl = model.kl_per_dim(x, gen)
            assert kl.shape == (B, 8) and bool((kl >= -1e-6).all())
            assert model.log_weight(x, gen, draws=2).shape == (2 * B,)
        if isinstance(model, Quantized):
            idx = model.code_indices(x)
            assert idx.shape == (B, model.positions) and int(idx.max()) < model.codebook_size
            z = model.encode(x)
            torch.testing.assert_close(model.project(z), z)  # codes are their own projection
            torch.testing.assert_close(model.decode_codes(idx), model.decode(z))
        if isinstance(model, AnomalyScorer):
            for name, score in model.anomaly_scores(x, gen).items():
                assert score.shape == (B,) and bool(torch.isfinite(score).all()), name


@pytest.mark.parametrize(("variant", "shape"), CASES)
def test_loss_terms_and_gradients_reach_every_parameter(variant: str, shape: tuple[int, ...]) -> None:
    model = _model(variant, shape).train()
    with torch.no_grad():  # one earlier step on another batch: state such as VQ's data-initialized codebook
        model.loss(_x(shape, seed=1))
    out = model.loss(_x(shape), target=_x(shape), kl_weight=0.5, free_bits=0.1, unused_schedule=3)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0 and out["loss"].requires_grad
    assert "recon" in out
    for key, value in out.items():
        if key != "loss":
            assert isinstance(value, torch.Tensor) and value.dim() == 0, key
            assert not value.requires_grad and torch.isfinite(value), key
    out["loss"].backward()
    # every parameter (an EMA codebook is a buffer, not a parameter) gets a nonzero gradient
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_loss_under_bf16_autocast(variant: str) -> None:
    # the trainer runs the loss under bf16 autocast on GPUs; CPU autocast exercises the same casts
    model = _model(variant, (1, 8, 8)).train()
    x = _x((1, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.loss(x, target=x)
    assert all(torch.isfinite(v) for v in out.values())
    assert all(v.dtype == torch.float32 for k, v in out.items() if k != "loss")
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_eval_loss_leaves_state_alone(variant: str) -> None:
    model = _model(variant, (1, 8, 8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.loss(_x((1, 8, 8)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_save_load_round_trip(variant: str, tmp_path: Path) -> None:
    shape = (1, 8, 8)
    model = _model(variant, shape).train()
    with torch.no_grad():
        model.loss(_x(shape, seed=2))  # moves training state (VQ counters/codebook) off its initial value
    model.eval()
    save_model(
        tmp_path, model, variant=variant, normalizer=Normalizer(np.array(0.0), np.array(1.0), "minmax")
    )
    loaded = load_model(tmp_path)
    assert type(loaded.model) is type(model) and loaded.model.cfg == model.cfg and not loaded.model.training
    x = _x(shape)
    with torch.no_grad():
        assert torch.equal(loaded.model.encode(x), model.encode(x))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_unknown_config_keys_rejected(variant: str) -> None:
    with pytest.raises(ValidationError):
        model_config(variant, bogus=1)
    with pytest.raises(ValidationError):
        model_config(variant, latent_dim=0)


@pytest.mark.parametrize("shape", [(3, 7, 9), (1, 64, 64), (2, 5, 5)])
def test_conv_backbone_handles_odd_sizes(shape: tuple[int, ...]) -> None:
    cfg = model_config("ae", channels=(4, 8, 8))
    z = make_encoder(shape, 5, cfg)(torch.zeros(2, *shape))
    assert z.shape == (2, 5)
    assert make_decoder(5, shape, cfg)(z).shape == (2, 1, *shape)  # one raw value per element
    assert make_decoder(5, shape, cfg, params=2)(z).shape == (2, 2, *shape)  # a location and a log scale


def test_backbone_choice() -> None:
    assert isinstance(make_encoder((1, 8, 8), 4, model_config("ae"))[0], torch.nn.Conv2d)
    assert isinstance(make_encoder((1, 8, 8), 4, model_config("ae", backbone="mlp"))[0], torch.nn.Flatten)
    with pytest.raises(ConfigError, match="needs image inputs"):
        make_encoder((64,), 4, model_config("ae", backbone="conv"))


def _convs(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.modules())


@pytest.mark.parametrize("variant", list(REGISTRY))
def test_inference_copy_computes_the_same_map(variant: str) -> None:
    shape = (1, 9, 7)  # odd sizes: the decoder crops, the encoder rounds up
    model = _model(variant, shape).eval()
    with torch.no_grad():  # VQ's codebook is initialized from the first training batch
        model.train().loss(_x(shape, seed=1))
    model.eval()
    fast = inference_copy(model)
    assert _convs(model) == 4 and _convs(fast) == 0  # every conv became a matrix; the original is untouched
    assert sum(isinstance(m, DenseConv) for m in fast.modules()) == 4
    x = _x(shape)
    with torch.inference_mode():
        torch.testing.assert_close(fast.encode(x), model.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.reconstruct(x), model.reconstruct(x), rtol=1e-5, atol=1e-6)
        if isinstance(model, GaussianPosterior):
            lw = [m.log_weight(x, torch.Generator().manual_seed(3), draws=4) for m in (model, fast)]
            torch.testing.assert_close(lw[1], lw[0], rtol=1e-5, atol=1e-4)


def test_dense_conv_matches_either_layer_in_channels_last() -> None:
    torch.manual_seed(0)
    for layer, shape in ((torch.nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 6, 5)),
                         (torch.nn.ConvTranspose2d(4, 2, 4, stride=2, padding=1), (4, 3, 3))):
        layer = layer.to(memory_format=torch.channels_last)  # as the trainer stores conv weights
        x = torch.randn(7, *shape).to(memory_format=torch.channels_last)
        dense = DenseConv(layer, shape)
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
        assert dense.weight.shape == (math.prod(shape), layer(x[:1]).numel())


@pytest.mark.parametrize(("c_in", "c_out", "h", "w"), [(32, 1, 32, 32), (8, 2, 5, 7), (12, 3, 1, 1)])
def test_subpixel_conv_computes_the_transposed_conv(c_in: int, c_out: int, h: int, w: int) -> None:
    torch.manual_seed(c_in)
    layer = torch.nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    assert SubpixelConvTranspose.fits(layer)
    assert not SubpixelConvTranspose.fits(torch.nn.ConvTranspose2d(c_in, c_in, 4, stride=2, padding=1))
    assert not SubpixelConvTranspose.fits(torch.nn.ConvTranspose2d(c_in, c_out, 3, stride=2, padding=1))
    x = torch.randn(5, c_in, h, w)
    with torch.no_grad():
        torch.testing.assert_close(SubpixelConvTranspose(layer)(x), layer(x), rtol=1e-5, atol=1e-5)


def test_inference_copy_keeps_large_convs() -> None:
    model = _model("vae", (1, 64, 64)).eval()
    kept = inference_copy(model)  # 4096 x 8192 entries for the first conv alone: above the bound
    # a copy: its convs go channels-last, the last transposed conv (8 -> 1 channel) becomes a sub-pixel conv
    assert kept is not model and _convs(kept) == _convs(model) - 1
    assert isinstance(kept.decoder[5], SubpixelConvTranspose) and isinstance(model.decoder[5], torch.nn.ConvTranspose2d)
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in kept.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d | SubpixelConvTranspose))
    z = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(kept.decode(z), model.decode(z), atol=1e-5, rtol=1e-5)
    cfg = model_config("vae", latent_dim=8, channels=(2, 32))
    model = build_model("vae", cfg, (1, 16, 16), "bernoulli", seed=0).eval()
    # 256 -> 2x8x8 and back: 32,768 entries each; 2x8x8 -> 32x4x4 and back: 65,536 each
    partly = inference_copy(model, max_entries=40_000)
    assert _convs(partly) == 1 and isinstance(partly.encoder[0], DenseConv) and isinstance(partly.decoder[5], DenseConv)
    assert isinstance(partly.decoder[3], SubpixelConvTranspose)  # 32 -> 2 channels: few outputs


def test_activations_go_in_place_only_after_a_fresh_output() -> None:
    """In place after a Linear or conv (nothing else holds that output), not first in a Sequential (its input is
    the caller's); the inference copy's activations go in place, the model's stay as trained, the map is the same."""
    seq = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(4, 4), torch.nn.SiLU(),
                              torch.nn.Unflatten(1, (1, 2, 2)), torch.nn.SiLU())
    inplace_activations(seq)
    assert [m.inplace for m in seq if isinstance(m, torch.nn.SiLU)] == [False, True, False]
    x = torch.randn(3, 4)
    before = x.clone()
    with torch.inference_mode():
        seq(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)  # the caller's tensor is untouched

    model = _model("vae", (1, 64, 64)).eval()
    fast = inference_copy(model)
    acts = [m for m in fast.modules() if isinstance(m, torch.nn.SiLU)]
    assert acts and all(m.inplace for m in acts)
    assert not any(m.inplace for m in model.modules() if isinstance(m, torch.nn.SiLU))
    x = _x((1, 64, 64))
    before = x.clone()
    with torch.inference_mode():
        torch.testing.assert_close(fast.reconstruct(x), model.reconstruct(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
