"""VQ-VAE math: straight-through gradients, codebook loss, EMA updates, dead-code resets, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from ae_repr.models import build_model, model_config
from ae_repr.models.vq_vae import VQVAE

SHAPE = (16,)


def _vq(**fields: object) -> VQVAE:
    torch.manual_seed(0)
    cfg = model_config(
        "vq_vae", **{"latent_dim": 8, "code_dim": 2, "codebook_size": 8, "hidden": (32,), **fields}
    )
    model = build_model("vq_vae", cfg, SHAPE, "gaussian")
    assert isinstance(model, VQVAE)
    return model


def _x(n: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_latent_dim_must_divide_into_codes() -> None:
    with pytest.raises(ValidationError, match="not divisible by code_dim"):
        model_config("vq_vae", latent_dim=10, code_dim=4)
    assert model_config("vq_vae", latent_dim=12, code_dim=4).code_dim == 4


def test_straight_through_gradient_reaches_encoder() -> None:
    model = _vq(commitment=0.0, dead_code_steps=0)  # only the reconstruction reaches the encoder
    model.loss(_x())["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_codebook_loss_pulls_codes_toward_assigned_outputs() -> None:
    model = _vq(dead_code_steps=0)
    x = _x()
    with torch.no_grad():
        z = model._codes(x)  # (N, D)
        idx, _ = model.quantize(z)
    used = idx.unique()
    before = model.codebook.detach().clone()
    opt = torch.optim.SGD([model.codebook], lr=0.05)
    model.loss(x)["loss"].backward()
    # independent gradient of sum ||sg(z) - e||^2 / B w.r.t. e: 2 * (n_k e_k - sum_{i->k} z_i) / B
    counts = torch.bincount(idx, minlength=8).float()
    sums = torch.zeros(8, 2).index_add_(0, idx, z)
    expected = 2 * (counts[:, None] * before - sums) / x.shape[0]
    torch.testing.assert_close(model.codebook.grad, expected)
    opt.step()
    means = sums[used] / counts[used, None]
    assert ((model.codebook[used] - means).norm(dim=1) < (before[used] - means).norm(dim=1)).all()


def test_ema_updates_codebook_in_training_only() -> None:
    model = _vq(ema=True, ema_decay=0.9, dead_code_steps=0)
    assert "codebook" not in dict(model.named_parameters())  # a buffer: the optimizer leaves it alone
    x = _x()
    before = model.codebook.clone()
    model.eval()
    model.loss(x)
    assert torch.equal(model.codebook, before)
    model.train()
    with torch.no_grad():
        z = model._codes(x)
        idx = torch.cdist(z, before).argmin(1)
    out = model.loss(x)
    # independent EMA step from the initial state (cluster sizes 1, sums = codes)
    counts = torch.bincount(idx, minlength=8).float()
    sums = torch.zeros(8, 2).index_add_(0, idx, z)
    size = 0.9 + 0.1 * counts
    embed = 0.9 * before + 0.1 * sums
    n = size.sum()
    smoothed = (size + 1e-5) / (n + 8 * 1e-5) * n
    torch.testing.assert_close(model.codebook, embed / smoothed[:, None])
    assert not torch.equal(model.codebook, before)
    assert "vq_codebook" in out and out["vq_codebook"].item() == pytest.approx(out["vq_commit"].item())
    assert out["loss"].item() == pytest.approx((out["recon"] + 0.25 * out["vq_commit"]).item(), rel=1e-6)


def test_total_without_ema_adds_codebook_and_commitment() -> None:
    model = _vq(dead_code_steps=0, commitment=0.5)
    out = model.loss(_x())
    assert out["loss"].item() == pytest.approx(
        (out["recon"] + out["vq_codebook"] + 0.5 * out["vq_commit"]).item()
    )


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_is_revived_after_dead_code_steps(ema: bool) -> None:
    # a slow EMA barely moves the codes after a reset, so they stay at the encoder outputs they were given
    model = _vq(dead_code_steps=3, ema=ema, ema_decay=0.99999)
    x = _x()
    model.loss(x)  # first training step: every code starts "dead", so the codebook is initialized from data
    with torch.no_grad():
        z = model._codes(x)
    assert torch.cdist(model.codebook, z).min(1).values.max().item() < 1e-3
    with torch.no_grad():
        model.codebook[0] = 1e3  # far from every encoder output: never chosen again
        if ema:
            model.ema_embed_sum[0] = 1e3  # the EMA state the codebook is recomputed from
    for _ in range(3):
        model.loss(x)
        assert model.codebook[0, 0].item() > 100  # unused for fewer than 3 steps before this one
    assert model.steps_unused[0].item() == 3
    model.loss(x)
    assert torch.cdist(model.codebook[:1], z).min().item() < 1e-3  # reset to an encoder output
    assert "steps_unused" in model.state_dict()


def test_loss_reports_perplexity_and_used_codes_of_assignments() -> None:
    model = _vq(dead_code_steps=0)
    x = _x(64)
    model.eval()
    with torch.no_grad():
        idx = torch.cdist(model._codes(x), model.codebook).argmin(1)
    p = torch.bincount(idx, minlength=8).float() / idx.numel()
    nz = p[p > 0]
    out = model.loss(x)
    assert out["perplexity"].item() == pytest.approx(math.exp(-(nz * nz.log()).sum().item()), rel=1e-5)
    assert out["used_codes"].item() == len(nz)


def test_encode_returns_codebook_vectors() -> None:
    model = _vq(dead_code_steps=0).eval()
    with torch.no_grad():
        z = model.encode(_x())
    rows = z.reshape(-1, 2)  # (B * P, D)
    assert z.shape == (32, 8)
    # exact differences: the matrix-product form of cdist leaves up to 3e-5 of rounding between equal rows
    distance = torch.cdist(rows, model.codebook, compute_mode="donot_use_mm_for_euclid_dist")
    assert distance.min(1).values.max().item() == pytest.approx(0.0, abs=1e-6)


def test_encode_under_autograd_reaches_the_encoder() -> None:
    model = _vq(dead_code_steps=0).eval()
    z = model.encode(_x())
    with torch.no_grad():
        exact = model.encode(_x())
    assert torch.allclose(z, exact, atol=1e-4)  # the same code vectors, up to float rounding
    z.pow(2).sum().backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
