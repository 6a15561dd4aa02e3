"""Synthetic data sets, feature files and a tiny trained-looking model for the evaluation tests."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ae_repr.checkpoint import save_model
from ae_repr.data import Normalizer
from ae_repr.io import write_features
from ae_repr.models import build_model, model_config

D = 16  # input features of the synthetic data
K = 4  # latent width of the synthetic learned representation


@dataclass(frozen=True)
class Synth:
    """A synthetic tabular data file and its arrays (rows in sample_id order 0..N-1)."""

    path: Path
    x: np.ndarray  # (N, D) float32
    y: np.ndarray  # (N,) int64
    split: np.ndarray  # (N,) "train" | "test"

    @property
    def train(self) -> np.ndarray:
        return self.split == "train"

    @property
    def test(self) -> np.ndarray:
        return self.split == "test"


def make_synth(directory: Path, *, class_sizes: tuple[int, ...] = (60, 60, 60, 60), seed: int = 0) -> Synth:
    """Gaussian blobs in D dimensions, a fixed 25% test split per class, written as a .parquet data file."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 3.0, size=(len(class_sizes), D))
    y = np.concatenate([np.full(n, c) for c, n in enumerate(class_sizes)]).astype(np.int64)
    x = (centers[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    split = np.full(len(y), "train", dtype=object)
    for c in range(len(class_sizes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        split[idx[: len(idx) // 4]] = "test"
    split = split.astype(str)
    frame = pd.DataFrame({f"f{i:02d}": x[:, i] for i in range(D)})
    frame["label"], frame["split"] = y, split
    path = directory / "synth.parquet"
    frame.to_parquet(path, index=False)
    return Synth(path, x, y, split)


def write_ff(
    path: Path, synth: Synth, z: np.ndarray, *, labels: np.ndarray | None | str = "same", **meta: object
) -> Path:
    """A feature file over the synthetic data's rows with latent `z`."""
    return write_features(
        path,
        sample_id=np.arange(len(synth.y)),
        split=synth.split,
        label=synth.y if isinstance(labels, str) else labels,
        z=z,
        metadata={"variant": path.stem, "dataset": str(synth.path), **meta},
    )


def save_tiny_ae(model_dir: Path, *, seed: int = 0) -> Path:
    """A small `ae` model over (D,) inputs with an identity normalizer, saved like a trained one."""
    torch.manual_seed(seed)
    model = build_model("ae", model_config("ae", latent_dim=K, hidden=(32,)), (D,), "gaussian")
    model.eval()
    normalizer = Normalizer(np.zeros(D), np.ones(D), "standard")
    return save_model(model_dir, model, variant="ae", normalizer=normalizer, extra={"train_time_s": 1.25})


def learned_feature_file(features_dir: Path, synth: Synth, model_dir: Path, name: str = "ae") -> Path:
    """The tiny model's features of every row, with `model_dir` relative to the feature file."""
    from ae_repr.checkpoint import load_model

    loaded = load_model(model_dir)
    with torch.inference_mode():
        z = loaded.model.encode(loaded.normalizer.torch(torch.from_numpy(synth.x))).numpy()
    rel = os.path.relpath(model_dir, features_dir)
    return write_ff(features_dir / f"{name}.parquet", synth, z, variant="ae", model_dir=rel)
