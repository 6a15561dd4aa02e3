"""Input corruptions: rates and magnitudes against their definitions."""

from __future__ import annotations

import pytest
import torch

from ae_repr.corruption import corrupt
from ae_repr.models import Corruption

N = 200_000


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_none_returns_input() -> None:
    x = torch.rand(4, 3)
    assert corrupt(x, None) is x


def test_masking_rate_and_kept_values() -> None:
    x = torch.rand(N) + 0.5  # no zeros to begin with
    out = corrupt(x, Corruption(kind="masking", level=0.3), _gen())
    zeroed = out == 0
    assert zeroed.float().mean().item() == pytest.approx(0.3, abs=0.005)
    assert torch.equal(out[~zeroed], x[~zeroed])


def test_gaussian_noise_std() -> None:
    x = torch.rand(N)
    noise = corrupt(x, Corruption(kind="gaussian", level=0.4), _gen()) - x
    assert noise.std().item() == pytest.approx(0.4, rel=0.01)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.005)


def test_salt_and_pepper_with_bounds() -> None:
    x = torch.full((N,), 0.5)
    out = corrupt(x, Corruption(kind="salt_and_pepper", level=0.2), _gen(), bounds=(0.0, 1.0))
    changed = out != x
    assert changed.float().mean().item() == pytest.approx(0.2, abs=0.005)
    assert set(out[changed].unique().tolist()) == {0.0, 1.0}
    assert (out[changed] == 1.0).float().mean().item() == pytest.approx(0.5, abs=0.01)


def test_salt_and_pepper_uses_batch_min_max_by_default() -> None:
    x = torch.rand(N) * 4 - 1  # values in (-1, 3)
    lo, hi = x.min().item(), x.max().item()
    out = corrupt(x, Corruption(kind="salt_and_pepper", level=0.1), _gen())
    changed = out != x
    assert changed.float().mean().item() == pytest.approx(0.1, abs=0.005)
    assert set(out[changed].unique().tolist()) == {lo, hi}


@pytest.mark.parametrize("kind", ["gaussian", "masking", "salt_and_pepper"])
def test_generator_makes_it_reproducible(kind: str) -> None:
    x, c = torch.rand(8, 1, 4, 4), Corruption(kind=kind, level=0.3)
    a, b = corrupt(x, c, _gen(7)), corrupt(x, c, _gen(7))
    assert torch.equal(a, b) and not torch.equal(a, x) and a.shape == x.shape
