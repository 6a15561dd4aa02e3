"""Fixtures for the evaluation tests: a synthetic data file and small but complete settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_synth import Synth, make_synth

from ae_repr.config import EvalConfig


@pytest.fixture
def synth(tmp_path: Path) -> Synth:
    return make_synth(tmp_path)


@pytest.fixture
def fast_cfg() -> EvalConfig:
    """Small but complete settings: 5 seeds, few epochs, small maps."""
    return EvalConfig(
        fewshot_k=(1, 5),
        fewshot_seeds=5,
        finetune_epochs=15,
        map_max_rows=80,
        trustworthiness_max_rows=200,
    )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The tiny test models run faster on one thread, and far faster when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
