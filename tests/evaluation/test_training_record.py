"""The training task reports what the trainer recorded, and nothing for a model saved by other means."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ae_repr.checkpoint import save_model
from ae_repr.config import ExperimentConfig
from ae_repr.data import Normalizer
from ae_repr.data.dataset import make_dataset
from ae_repr.io import read_json
from ae_repr.models import build_model, model_config
from ae_repr.train import train_variant
from evaluation.training import training_record


def test_training_record_matches_the_trainers_description(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = make_dataset("synthetic", rng.random((120, 6)).astype(np.float32), np.where(np.arange(120) % 4, "train", "test"))
    cfg = ExperimentConfig.model_validate(
        {"models": {"variants": ["vae"], "latent_dim": 2, "overrides": {"vae": {"hidden": [8]}}},
         "train": {"epochs": 3, "batch_size": 30, "device": "cpu"}}
    )
    train_variant("vae", data, cfg, tmp_path / "vae", progress=False)
    frame, note = training_record("vae", tmp_path / "vae")
    meta = read_json(tmp_path / "vae" / "config.json")
    got = dict(zip(frame["metric"], frame["value"], strict=True))
    assert got["steps"] == meta["steps"] == 3 * 3 and got["epochs"] == 3 and got["plateau"] == 0.0
    assert got["val_elbo"] == pytest.approx(meta["best_val"]["elbo"]) and "stopped on epochs" in note
    assert set(frame["task"]) == {"training"}


def test_a_model_without_a_training_record_gives_no_rows(tmp_path: Path) -> None:
    model = build_model("ae", model_config("ae", latent_dim=2, hidden=(8,)), (6,), "gaussian")
    save_model(tmp_path / "ae", model, variant="ae", normalizer=Normalizer(np.zeros(6), np.ones(6), "standard"))
    frame, note = training_record("ae", tmp_path / "ae")
    assert frame.empty and "no training record" in note
