"""Few-shot end to end: the encoder plus a linear head trained on the k*C shots (pretrained or from scratch).

`fewshot_finetune` loads the pretrained model from the feature file's `model_dir`;
`fewshot_scratch` builds the same variant and config from random initialization (seeded). Both then
run the same procedure on the few-shot episodes of `evaluation.fewshot`, and use no label beyond
the k shots per class (`protocol` says it in one sentence):

1. Inputs are the raw samples of the feature file's rows, normalized with the model's own normalizer.
2. Scratch only: one training-mode `loss` pass without gradients on the shots' inputs, so state a
   variant sets up from data on its first training step (a VQ-VAE's codebook, drawn from encoder
   outputs) exists, as it would in the variant's own training; the shots are the only inputs this
   no-pretraining control sees. Variants without such state are unchanged by it (no normalization
   layers; its random draws come from a private seeded generator).
3. The head starts as the frozen-feature logistic head fitted on the shots' encodings
   (`fit_frozen_head`, C = fewshot_c), folded into one `nn.Linear` (linear probe, then fine-tune:
   Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features"), so training starts from the
   frozen arm's solution rather than from a random head.
4. A fixed schedule at every k: Adam (lr = finetune_lr, fused) on all parameters, cross-entropy,
   exactly finetune_epochs passes over the shots in batches of finetune_batch_size (one full-batch
   step per epoch while k*C <= finetune_batch_size, as for k <= 50 on 10 classes). No held-out
   labelled rows and no early stopping (the k-shot protocol has no labels to stop on); the final
   state is scored on the test split under `torch.inference_mode`.

Run seeds derive from (seed, episode, k), so variants sharing an architecture and config (ae/dae,
vae/beta_vae) get identical scratch numbers: that arm never sees the pretrained weights. Torch's
thread settings are left to the caller.
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ae_repr.checkpoint import LoadedModel, load_model
from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile
from ae_repr.models import Autoencoder, build_model, module_init

from .fewshot import fewshot_episodes, fewshot_row, usable_k
from .inputs import labels, model_dir, raw_inputs, split_mask
from .probe import fit_frozen_head
from .results import result_frame

log = logging.getLogger(__name__)

Arm = Literal["finetune", "scratch"]
_EVAL_BATCH = 2048


def fewshot_finetune(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Few-shot test accuracy of the pretrained encoder + linear head fine-tuned end to end, per k."""
    return _end_to_end(ff, cfg, arm="finetune", seed=seed)


def fewshot_scratch(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Few-shot test accuracy of the same architecture trained from random initialization, per k."""
    return _end_to_end(ff, cfg, arm="scratch", seed=seed)


def protocol(cfg: EvalConfig) -> str:
    """The end-to-end arms' training protocol in one sentence (for logs and the report)."""
    return (
        f"few-shot fine-tune and scratch: {cfg.finetune_epochs} epochs of Adam (lr {cfg.finetune_lr:g}, batches of "
        f"up to {cfg.finetune_batch_size} shots) on the k labelled shots per class only, no held-out labels and "
        "no early stopping; the final state is scored."
    )


def _end_to_end(ff: FeatureFile, cfg: EvalConfig, *, arm: Arm, seed: int) -> pd.DataFrame:
    mdir = model_dir(ff)
    if mdir is None:
        log.warning("%s: no model_dir in the feature file; fewshot_%s skipped", ff.name, arm)
        return result_frame()
    loaded = load_model(mdir)
    raw = raw_inputs(ff).x

    def inputs(rows: np.ndarray) -> torch.Tensor:  # (n, *input_shape), normalized as in training
        x = loaded.normalizer.torch(torch.from_numpy(np.ascontiguousarray(raw[rows])))
        return x.reshape(len(rows), *loaded.model.input_shape)

    log.info("%s: %s", ff.name, protocol(cfg))
    y_all = labels(ff)
    train, test = np.flatnonzero(split_mask(ff, "train")), np.flatnonzero(split_mask(ff, "test"))
    classes = np.unique(y_all[train])
    y = _class_index(y_all, classes)  # -1 for test labels never seen in train: always wrong
    x_test, y_test = inputs(test), torch.from_numpy(y[test])
    rows = []
    for k in usable_k(ff, cfg, task=f"fewshot_{arm}")[0]:
        accs = []
        for s, shots in enumerate(fewshot_episodes(ff, k, cfg.fewshot_seeds, seed=seed)):
            run_seed = int(np.random.SeedSequence([seed, s, k]).generate_state(1)[0])
            x_shots = inputs(shots)
            model = _initial_model(loaded, arm, run_seed, x_shots)
            accs.append(_train_and_score(model, (x_shots, y[shots]), (x_test, y_test), len(classes), cfg, run_seed))
        rows.append(fewshot_row(ff.name, f"fewshot_{arm}", k, accs))
        log.info("%s: fewshot_%s k=%d accuracy %.4f", ff.name, arm, k, rows[-1]["value"])
    return result_frame(rows)


def _class_index(y: np.ndarray, classes: np.ndarray) -> np.ndarray:
    pos = np.minimum(np.searchsorted(classes, y), len(classes) - 1)
    return np.where(classes[pos] == y, pos, -1).astype(np.int64)


def _initial_model(loaded: LoadedModel, arm: Arm, seed: int, x_shots: torch.Tensor) -> Autoencoder:
    """A private copy of the pretrained model, or a fresh one of the same variant/config seeded by `seed`."""
    if arm == "finetune":
        return copy.deepcopy(loaded.model)
    m = loaded.model
    model = build_model(loaded.variant, m.cfg, m.input_shape, m.likelihood, seed=seed)
    # the variant's first-training-step state from the shots: a VQ-VAE codebook would otherwise stay
    # at its tiny uniform init, which fine-tuning through `encode` never moves (scratch k=50 on digits: 0.31)
    model.train()
    with torch.no_grad():
        model.loss(x_shots, generator=torch.Generator().manual_seed(seed))
    return model


def _lp_head(
    model: Autoencoder, x: torch.Tensor, y: np.ndarray, n_classes: int, cfg: EvalConfig, seed: int
) -> nn.Linear:
    """The frozen-feature logistic head on the shots, its scaler folded in, as an nn.Linear."""
    model.eval()
    with torch.inference_mode():
        z = model.encode(x).numpy()  # float32, as stored in feature files
    pipe = fit_frozen_head(z, y, Cs=(cfg.fewshot_c,), folds=0, seed=seed)
    scaler, logreg = pipe.named_steps["scale"], pipe.named_steps["logreg"]
    w, b = logreg.coef_, logreg.intercept_  # (C, K), (C,); binary: one row for the positive class
    if w.shape[0] == 1:
        w, b = np.vstack([-w / 2, w / 2]), np.array([-b[0] / 2, b[0] / 2])
    w = w / scaler.scale_  # logits = W (z - mean) / scale + b
    b = b - w @ scaler.mean_
    with module_init():  # its random init is overwritten below, but must not shift a seeded build elsewhere
        head = nn.Linear(z.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def _accuracy(model: Autoencoder, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([head(model.encode(xb)).argmax(1) for xb in x.split(_EVAL_BATCH)])
    return float((pred == y).double().mean())


def _train_and_score(
    model: Autoencoder,
    shots: tuple[torch.Tensor, np.ndarray],
    test: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    cfg: EvalConfig,
    seed: int,
) -> float:
    """Fine-tune encoder + LP-initialized head on the shots for `finetune_epochs`; test accuracy of the final state."""
    x, y_np = shots
    y = torch.from_numpy(y_np)
    head = _lp_head(model, x, y_np, n_classes, cfg, seed)
    # fused: one kernel over all parameters (the per-tensor loop was ~8% of a fine-tuning run on CPU)
    opt = torch.optim.Adam([*model.parameters(), *head.parameters()], lr=cfg.finetune_lr, fused=True)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(cfg.finetune_epochs):
        for batch in torch.randperm(len(x), generator=gen).split(cfg.finetune_batch_size):
            loss = F.cross_entropy(head(model.encode(x[batch])), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return _accuracy(model, head, *test)
