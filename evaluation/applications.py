"""The application tasks as one table: which task runs on which representation, and their shared plumbing.

A learned representation (a feature file with its model) runs every task in `cfg.applications` that
its capabilities allow (a task a model cannot serve leaves a note saying why); a baseline feature file runs the model-free ones (disentanglement). Once per
run, `application_baselines` scores the model-free references of the model tasks (PCA and
IsolationForest for anomaly, mean-image and PCA fill for inpainting, real data for generation)
under the same protocols. Pictures go to `<name>.pictures.npz` beside the result table; the run-level
plots are drawn from them by `summarize`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from ae_repr.checkpoint import LoadedModel
from ae_repr.config import EvalConfig, TrainConfig
from ae_repr.io import FeatureFile, atomic_path

from .anomaly import anomaly, anomaly_baselines
from .augmentation import augmentation
from .context import AppContext, TaskOutput, make_context
from .disentanglement import disentanglement
from .generation import generation, generation_reference
from .inpainting import inpainting, inpainting_baselines
from .inputs import subsample
from .rate_distortion import rate_distortion

Task = Callable[[AppContext], TaskOutput]
BaselineTask = Callable[[AppContext, int], TaskOutput]

# task -> (needs a trained model, function); order is the report's
APPLICATIONS: dict[str, tuple[bool, Task]] = {
    "anomaly": (True, anomaly),
    "inpainting": (True, inpainting),
    "generation": (True, generation),
    "augmentation": (True, augmentation),
    "rate_distortion": (True, rate_distortion),
    "disentanglement": (False, disentanglement),
}
BASELINE_APPLICATIONS: dict[str, BaselineTask] = {
    "anomaly": anomaly_baselines,
    "inpainting": inpainting_baselines,
    "generation": lambda ctx, k: generation_reference(ctx),
}
BASELINES_NAME = "application_baselines"  # the result file of `application_baselines`
PICTURES_SUFFIX = ".pictures.npz"
_SHOWN = 8  # test rows in the reconstruction grid


def applications_for(
    ff: FeatureFile,
    cfg: EvalConfig,
    *,
    loaded: LoadedModel | None,
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
    work_dir: Path | None = None,
) -> list[tuple[str, Callable[[], TaskOutput]]]:
    """The (task, thunk) pairs to run for one representation; model tasks only when `loaded` is given."""
    tasks = [t for t in cfg.applications if loaded is not None or not APPLICATIONS[t][0]]
    if not tasks:
        return []
    ctx = make_context(ff, cfg, loaded=loaded, train_cfg=train_cfg, seed=seed, work_dir=work_dir)
    return [("pictures", partial(input_pictures, ctx)), *((t, partial(APPLICATIONS[t][1], ctx)) for t in tasks)]


@torch.inference_mode()
def input_pictures(ctx: AppContext) -> TaskOutput:
    """Pictures only: a fixed set of test inputs, the model's reconstructions of them, the factor names."""
    rows = subsample(ctx.ff, "test", _SHOWN, ctx.seed)
    x = ctx.inputs(rows)
    pictures = {"inputs/originals": x.numpy()}
    if ctx.loaded is not None:
        pictures[f"{ctx.name}/reconstructions"] = ctx.model.reconstruct(x).float().numpy()
    if ctx.factor_names:
        pictures["inputs/factor_names"] = np.array(ctx.factor_names)
    return TaskOutput(pictures=pictures)


def application_baselines(
    ff: FeatureFile, cfg: EvalConfig, *, k: int, seed: int = 0
) -> list[tuple[str, Callable[[], TaskOutput]]]:
    """The model-free references of the configured model tasks, at latent width `k`, as (task, thunk) pairs."""
    tasks = [t for t in cfg.applications if t in BASELINE_APPLICATIONS]
    if not tasks:
        return []
    ctx = make_context(ff, cfg, seed=seed)
    return [(t, partial(BASELINE_APPLICATIONS[t], ctx, k)) for t in tasks]


def write_pictures(path: Path, pictures: dict[str, np.ndarray]) -> Path | None:
    """Save named picture arrays atomically (npz); remove a stale file when there are none."""
    if not pictures:
        path.unlink(missing_ok=True)
        return None
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **{k: np.asarray(v) for k, v in pictures.items()})
    return path


def read_pictures(paths: list[Path]) -> dict[str, np.ndarray]:
    """All picture arrays of several npz files, merged (keys are `<representation>/<name>`)."""
    out: dict[str, np.ndarray] = {}
    for p in paths:
        with np.load(p) as data:
            out.update({k: data[k] for k in data.files})
    return out
