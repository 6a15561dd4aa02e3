"""What the application tasks (anomaly, inpainting, generation, augmentation, rate-distortion,
disentanglement) see of one representation: its feature file, the raw samples behind its rows, the
trained model when there is one, and the protocol settings; and what they return: result rows plus
named picture arrays that the run-level plots are drawn from.

A context without a model (`loaded is None`) is the baselines' context: the same rows and splits,
normalized by a normalizer fitted on the train rows, as the model's own normalizer was.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ae_repr.checkpoint import LoadedModel
from ae_repr.config import EvalConfig, TrainConfig
from ae_repr.data import Normalizer
from ae_repr.io import FeatureFile
from ae_repr.models import Autoencoder, inference_copy
from ae_repr.models.capabilities import describe

from .inputs import dataset_of, labels, split_mask
from .results import result_frame


@dataclass(frozen=True)
class AppContext:
    """One representation's rows, raw samples, model (None for baselines) and settings."""

    ff: FeatureFile
    x_raw: np.ndarray  # (N, *shape) raw samples, aligned with ff's rows
    normalizer: Normalizer  # the model's own, or fitted on the train rows for baselines
    cfg: EvalConfig
    train_cfg: TrainConfig = field(default_factory=TrainConfig)  # how the model was trained (retraining uses it)
    loaded: LoadedModel | None = None
    seed: int = 0
    factors: np.ndarray | None = None  # (N, F) ground-truth factor indices aligned with ff's rows (dsprites)
    factor_names: tuple[str, ...] = ()
    work_dir: Path | None = None  # where a task may keep reusable intermediate files (e.g. retrained models)
    name: str = ""  # the representation's name in result rows; make_context sets the feature file's


    @property
    def model(self) -> Autoencoder:
        assert self.loaded is not None, f"{self.name}: no model in this context"
        return self.loaded.model

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_raw.shape[1:])

    def has(self, capability: type) -> bool:
        """Whether the model offers a capability (a protocol of `ae_repr.models.capabilities`)."""
        return self.loaded is not None and isinstance(self.model, capability)

    def skipped(self, task: str, capability: type, what: str = "") -> str:
        """The report note of a task (or a part of one, `what`) not run for want of a capability."""
        return f"{self.name}: {task}{' ' + what if what else ''} not run: the model has no {describe(capability)}."

    @property
    def labels(self) -> np.ndarray | None:
        """Labels as int64, or None when the data has none."""
        return labels(self.ff) if self.ff.has_labels else None

    def rows(self, split: str) -> np.ndarray:
        """Row positions of a split, in file order."""
        return np.flatnonzero(split_mask(self.ff, split))

    def flat(self, rows: np.ndarray) -> np.ndarray:
        """Normalized samples of `rows` as float32, (n, D)."""
        return self.normalizer.numpy(self.x_raw[rows]).reshape(len(rows), -1)

    def inputs(self, rows: np.ndarray) -> torch.Tensor:
        """Normalized samples of `rows` as the model takes them, (n, *input_shape) float32."""
        x = self.normalizer.torch(torch.from_numpy(np.ascontiguousarray(self.x_raw[rows])))
        return x.reshape(len(rows), *self.input_shape).float()


@dataclass(frozen=True)
class TaskOutput:
    """Result rows (the tidy schema), named arrays for the run-level pictures, and notes for the report.

    Picture keys are `<representation>/<name>` (a baseline output may hold several representations).
    Notes are one line each, e.g. the estimator settings behind a score or why a task did not apply.
    """

    frame: pd.DataFrame = field(default_factory=result_frame)
    pictures: dict[str, np.ndarray] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def make_context(
    ff: FeatureFile,
    cfg: EvalConfig,
    *,
    loaded: LoadedModel | None = None,
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
    work_dir: Path | None = None,
) -> AppContext:
    """The context of one feature file: raw samples and factors from its data set, aligned by sample_id."""
    if loaded is not None:  # the tasks only run the model forward: small convs as matrix products
        loaded = replace(loaded, model=inference_copy(loaded.model))
    ds, pos = dataset_of(ff)
    x = ds.x[pos]
    normalizer = loaded.normalizer if loaded is not None else Normalizer.fit(x[split_mask(ff, "train")])
    factors = None if ds.factors is None else ds.factors[pos]
    return AppContext(
        ff=ff,
        x_raw=x,
        normalizer=normalizer,
        cfg=cfg,
        train_cfg=train_cfg or TrainConfig(),
        loaded=loaded,
        seed=seed,
        factors=factors,
        factor_names=tuple(ds.factor_names),
        work_dir=work_dir,
        name=ff.name,
    )
