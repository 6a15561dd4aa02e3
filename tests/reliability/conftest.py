"""Fixtures of the reliability suite (helpers live in reliability_helpers.py)."""

from __future__ import annotations

import pytest
from reliability_helpers import Trained, write_config


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """`ae` trained for one epoch on digits (in-process: the CLI's own training is tested elsewhere)."""
    from ae_repr.config import load_config
    from ae_repr.data import load_dataset
    from ae_repr.train import train_variant

    base = tmp_path_factory.mktemp("trained")
    config = write_config(base / "tiny.yaml")
    cfg = load_config(config).with_overrides(variants=["ae"])
    out = base / "run"
    res = train_variant("ae", load_dataset("digits"), cfg, out / "models" / "ae", progress=False)
    return Trained(out, res.model_dir, config)


