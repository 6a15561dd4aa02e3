"""A trained model's encoder as one servable module: raw inputs in, the representation out.

The module folds the train-fitted normalization into the graph, so a user (or a model server) can call
it on raw rows of new data, exactly as feature extraction sees them.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model
from .data.dataset import Normalizer
from .models import Autoencoder


class Encoder(nn.Module):
    """Normalization + `model.encode` on raw float32 inputs of the data's sample shape, (B, *shape) -> (B, K)."""

    def __init__(self, model: Autoencoder, normalizer: Normalizer) -> None:
        super().__init__()
        self.model = model.eval()
        self.input_shape = tuple(model.input_shape)
        self.latent_dim = model.latent_dim
        self.register_buffer("shift", torch.as_tensor(np.asarray(normalizer.shift), dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(np.asarray(normalizer.scale), dtype=torch.float32))

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> Encoder:
        """The encoder of a saved model folder (`model.pt` + `config.json`), in eval mode."""
        loaded = load_model(model_dir)
        return cls(loaded.model, loaded.normalizer).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode raw rows; flat rows (B, D) are reshaped to the sample shape first."""
        x = x.float().reshape(-1, *self.input_shape)  # (B, *input_shape)
        return self.model.encode((x - self.shift) * self.scale)
