"""Latent-space data augmentation (task `augmentation`): do decoded neighbours of a few labelled examples help?

Protocol, in the spirit of DeVries & Taylor 2017, "Dataset Augmentation in Feature Space": for each of
`EvalConfig.fewshot_seeds` episodes of `EvalConfig.augment_k` train examples per class (the few-shot
episodes of `evaluation.fewshot`), a StandardScaler + LogisticRegression(C=`fewshot_c`) classifier on
the normalized flat inputs is fitted (a) on the shots alone and (b) on the shots plus
`augment_per_shot` neighbours per shot, labelled as their shot. A neighbour is
decode(z + augment_noise * std * eps), z = encode(shot), std the per-dimension std of the train
features, eps ~ N(0, I) from a torch generator seeded by `episode_generator(seed, episode)`; a `Quantized`
model (vq_vae) re-projects the perturbed latent onto its codebook before decoding. Rows: `accuracy_delta` (mean over episodes of
test accuracy (b) - (a), with its 95% Student-t interval), `accuracy_base` and `accuracy_augmented`
(means), all with `k` and `n_seeds`.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from sklearn.metrics import accuracy_score

from ae_repr.models import Autoencoder, Quantized

from .context import AppContext, TaskOutput
from .fewshot import fewshot_episodes, t_interval, usable_k
from .inputs import label_problem
from .probe import fit_frozen_head
from .results import CI_FEWSHOT_EPISODES, result_frame, result_row

log = logging.getLogger(__name__)

_SHOWN_SHOTS, _SHOWN_NEIGHBOURS = 4, 6  # the picture grid: shots x (shot + neighbours)


def episode_generator(seed: int, episode: int) -> torch.Generator:
    """The CPU generator of one episode's latent noise."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, episode]).generate_state(1)[0]))


def neighbours(
    model: Autoencoder, x: torch.Tensor, std: torch.Tensor, noise: float, n: int, generator: torch.Generator
) -> torch.Tensor:
    """n decoded latent perturbations of each normalized input row, (B, n, *input_shape)."""
    z = model.encode(x)  # (B, L)
    eps = torch.randn((len(x), n, z.shape[1]), generator=generator, device=z.device)
    z_new = (z[:, None] + noise * std * eps).reshape(-1, z.shape[1])  # (B, n, L) -> (B * n, L)
    if isinstance(model, Quantized):  # the decoder only ever saw codebook vectors
        z_new = model.project(z_new)
    return model.decode(z_new).reshape(len(x), n, *model.input_shape)


def augmentation(ctx: AppContext) -> TaskOutput:
    """Few-shot test accuracy with and without decoded latent neighbours of the shots, over episodes."""
    cfg, k = ctx.cfg, ctx.cfg.augment_k
    problem = label_problem(ctx.ff)
    if problem is not None:
        return TaskOutput(notes=(f"{ctx.name}: augmentation not run: {problem}.",))
    smallest = usable_k(ctx.ff, ctx.cfg)[2]
    if k > smallest:
        return TaskOutput(
            notes=(f"{ctx.name}: augmentation not run: k={k} exceeds the smallest train class ({smallest}).",)
        )
    y, test = ctx.labels, ctx.rows("test")
    x_test = ctx.flat(test)
    std = torch.from_numpy(ctx.ff.z[ctx.rows("train")].std(axis=0)).float()  # (L,)
    base, augmented, pictures = [], [], {}
    for s, shots in enumerate(fewshot_episodes(ctx.ff, k, cfg.fewshot_seeds, seed=ctx.seed)):
        x_shots = ctx.inputs(shots)
        with torch.inference_mode():
            new = neighbours(ctx.model, x_shots, std, cfg.augment_noise, cfg.augment_per_shot, episode_generator(ctx.seed, s))
        x_aug = np.concatenate([ctx.flat(shots), new.reshape(-1, x_test.shape[1]).float().numpy()])  # (S * (1 + n), D)
        y_aug = np.concatenate([y[shots], np.repeat(y[shots], cfg.augment_per_shot)])
        for x_fit, y_fit, accs in ((x_aug[: len(shots)], y[shots], base), (x_aug, y_aug, augmented)):
            head = fit_frozen_head(x_fit, y_fit, Cs=(cfg.fewshot_c,), folds=0, seed=ctx.seed)
            accs.append(accuracy_score(y[test], head.predict(x_test)))
        if s == 0:
            pictures[f"{ctx.name}/augment_examples"] = _examples(ctx, x_shots, std, k)
    delta = np.subtract(augmented, base)
    mean, lo, hi = t_interval(delta)
    n = len(delta)
    rows = [
        result_row(
            ctx.name, "augmentation", "accuracy_delta", mean, k=k, n_seeds=n, ci_low=lo, ci_high=hi,
            ci_method=CI_FEWSHOT_EPISODES,
        ),
        result_row(ctx.name, "augmentation", "accuracy_base", np.mean(base), k=k, n_seeds=n),
        result_row(ctx.name, "augmentation", "accuracy_augmented", np.mean(augmented), k=k, n_seeds=n),
    ]
    note = (
        f"{ctx.name}: augmentation with k={k} shots per class, {cfg.augment_per_shot} decoded neighbours per "
        f"shot at latent noise {cfg.augment_noise:g} x train std, {n} episodes; logistic C={cfg.fewshot_c:g}."
    )
    return TaskOutput(frame=result_frame(rows), pictures=pictures, notes=(note,))


@torch.inference_mode()
def _examples(ctx: AppContext, x_shots: torch.Tensor, std: torch.Tensor, k: int) -> np.ndarray:
    """Shots of different classes (episodes list k per class) beside fresh neighbours, (4, 1 + 6, *shape)."""
    pick = np.argsort(np.arange(len(x_shots)) % k, kind="stable")[:_SHOWN_SHOTS]  # first shot of each class first
    x = x_shots[torch.from_numpy(pick)]
    new = neighbours(ctx.model, x, std, ctx.cfg.augment_noise, _SHOWN_NEIGHBOURS, torch.Generator().manual_seed(ctx.seed))
    return torch.cat([x[:, None], new.float()], dim=1).numpy()
