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
   (`fewshot.shots_head`, C = fewshot_c: the frozen arm's own head where the encodings are the same bits),
   folded into one `nn.Linear` (linear probe, then fine-tune: Kumar et al. 2022, "Fine-Tuning can Distort
   Pretrained Features"), so training starts from the frozen arm's solution rather than from a random head.
4. A fixed schedule at every k: Adam (lr = finetune_lr, fused) on all parameters, cross-entropy,
   exactly finetune_epochs passes over the shots in batches of finetune_batch_size (one full-batch
   step per epoch while k*C <= finetune_batch_size, as for k <= 50 on 10 classes). No held-out
   labelled rows and no early stopping (the k-shot protocol has no labels to stop on); the final
   state is scored on the test split under `torch.inference_mode`.

The runs of one k (its `fewshot_seeds` episodes, k*C shots each) train together as one vectorized
ensemble: parameters stacked with `torch.func.stack_module_state`, one `torch.func.vmap`-ed forward
and backward over `functional_call`, one fused Adam over the stacked tensors (elementwise, so each
run steps as with its own optimizer) and the sum of the runs' own mean cross-entropies as the loss
(so each run's gradient is its own). Each run keeps its own seeded shuffle; the runs never mix, and
their numbers equal one-at-a-time training up to float32 rounding (the kernels sum in another order;
a vq_vae code assignment at a near tie can flip with it).
All registered variants vectorize; an encoder torch.func cannot trace (a data-dependent Python
number, say) trains its runs one at a time instead, with a warning.

Run seeds derive from (seed, episode, k), so variants sharing an architecture and config (ae/dae,
vae/beta_vae) get identical scratch numbers: that arm never sees the pretrained weights. They are
computed once per process and shared, keyed by everything the arm reads (variant class, model
config less `corruption`, which only the trainer applies, and the built-in VAEs' `beta`, which only
weights a loss value the arm discards; input shape, likelihood, the normalized shots and test rows,
seeds and EvalConfig); a thread asking for a key being computed waits for it. Torch's thread
settings are left to the caller.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ae_repr.checkpoint import DESCRIPTION, LoadedModel, load_model
from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile, read_json
from ae_repr.models import Autoencoder, build_model, module_init

from .fewshot import fewshot_episodes, fewshot_row, shots_head, usable_k
from .inputs import SharedResults, digest, labels, model_dir, pass_rows, raw_inputs, split_mask, subsample
from .probe import head_weights
from .results import result_frame

log = logging.getLogger(__name__)

Arm = Literal["finetune", "scratch"]


def fewshot_finetune(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Few-shot test accuracy of the pretrained encoder + linear head fine-tuned end to end, per k."""
    return _end_to_end(ff, cfg, arm="finetune", seed=seed)


def fewshot_scratch(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Few-shot test accuracy of the same architecture trained from random initialization, per k."""
    return _end_to_end(ff, cfg, arm="scratch", seed=seed)


def protocol(cfg: EvalConfig, budgeted: bool = False) -> str:
    """The end-to-end arms' training protocol in one sentence (for logs and the report)."""
    cut = (f" (fewer than the configured epochs: each arm trains on at most {cfg.fewshot_budget:g} of the rows "
           "the pretraining's budget allows)") if budgeted else ""
    return (
        f"few-shot fine-tune and scratch: {cfg.finetune_epochs} epochs{cut} of Adam (lr {cfg.finetune_lr:g}, "
        f"batches of up to {cfg.finetune_batch_size} shots) on the k labelled shots per class only, no held-out "
        f"labels and no early stopping; the final state is scored on at most {cfg.fewshot_test_max_rows} test rows."
    )


def arm_config(ff: FeatureFile, cfg: EvalConfig, meta: dict[str, Any]) -> EvalConfig:
    """`cfg` with the end-to-end arms' epochs for `ff`'s model, from its saved description (`budgeted_epochs`)."""
    train_cfg = meta.get("train_config")
    if train_cfg is None:  # a model saved by other means than the trainer: no pretraining budget to go by
        return cfg
    train = split_mask(ff, "train")
    shot_rows = cfg.fewshot_seeds * len(np.unique(labels(ff)[train])) * sum(usable_k(ff, cfg)[0])
    epochs = budgeted_epochs(cfg, train_cfg, int(train.sum()), shot_rows)
    return cfg.model_copy(update={"finetune_epochs": epochs})


def arm_protocol(ff: FeatureFile, cfg: EvalConfig) -> str:
    """The end-to-end arms' protocol for `ff`'s model, with the epochs its budget allows (for the report)."""
    arm_cfg = arm_config(ff, cfg, read_json(model_dir(ff) / DESCRIPTION))  # the description only, not the weights
    return protocol(arm_cfg, budgeted=arm_cfg.finetune_epochs < cfg.finetune_epochs)


def budgeted_epochs(cfg: EvalConfig, train_cfg: dict[str, Any], train_rows: int, shot_rows: int) -> int:
    """The end-to-end arms' epochs: `finetune_epochs`, or fewer when one arm's `shot_rows` per epoch (all its k
    and seeds) would pass more than `fewshot_budget` of the rows the pretraining's budget allows (its
    `max_steps` batches of `batch_size`, or `epochs` passes over the `train_rows`, whichever is fewer); at least 1.

    The arms then cost a bounded fraction of the pretraining (encoder only, a half of its model) at any budget.
    """
    budget = min(train_cfg["max_steps"] * train_cfg["batch_size"], train_cfg["epochs"] * train_rows)
    return max(1, min(cfg.finetune_epochs, int(cfg.fewshot_budget * budget // max(1, shot_rows))))


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

    y_all = labels(ff)
    # scored on a bounded subsample of the test split: every run (k x seeds x arms) encodes it once
    train, test = np.flatnonzero(split_mask(ff, "train")), subsample(ff, "test", cfg.fewshot_test_max_rows, seed)
    classes = np.unique(y_all[train])
    ks = usable_k(ff, cfg, task=f"fewshot_{arm}")[0]
    cfg = arm_config(ff, cfg, loaded.meta)  # the scratch arms' sharing key includes its epochs
    y = _class_index(y_all, classes)  # -1 for test labels never seen in train: always wrong
    x_test, y_test = inputs(test), torch.from_numpy(y[test])
    test_digest = digest(x_test, y_test) if arm == "scratch" else b""
    rows = []
    for k in ks:
        episodes = fewshot_episodes(ff, k, cfg.fewshot_seeds, seed=seed)
        run_seeds = [int(np.random.SeedSequence([seed, s, k]).generate_state(1)[0]) for s in range(len(episodes))]
        shots = [(inputs(e), y[e]) for e in episodes]
        run = functools.partial(_runs, loaded, arm, shots, (x_test, y_test), len(classes), cfg, run_seeds)
        if arm == "finetune":
            accs = run()
        else:  # twin variants' scratch arms (ae/dae, vae/beta_vae) are one computation
            key = _scratch_key(loaded.model, shots, test_digest, len(classes), cfg, run_seeds)
            accs = list(_SCRATCH_RESULTS.get(key, run))
        rows.append(fewshot_row(ff.name, f"fewshot_{arm}", k, accs))
        log.info("%s: fewshot_%s k=%d accuracy %.4f", ff.name, arm, k, rows[-1]["value"])
    return result_frame(rows)


_SCRATCH_RESULTS: SharedResults[list[float]] = SharedResults()
# model config fields the scratch arm does not depend on: those a model declares as changing its training
# objective only (`LOSS_ONLY_FIELDS`: the input corruption, a VAE's beta), whose effect the scratch arm's one
# state-setting pass discards; so ae/dae and vae/beta_vae share one scratch result


def _scratch_key(
    model: Autoencoder,
    shots: list[tuple[torch.Tensor, np.ndarray]],
    test_digest: bytes,
    n_classes: int,
    cfg: EvalConfig,
    seeds: list[int],
) -> str:
    """Everything the scratch arm's accuracies at one k depend on: the variant class and its config (less the
    fields it cannot depend on), input shape, likelihood, the shots and test rows as normalized, the seeds
    and the evaluation config; not the variant's name nor its pretrained weights."""
    ignored = set(getattr(type(model), "LOSS_ONLY_FIELDS", ()))
    spec = (
        type(model).__module__,
        type(model).__qualname__,
        model.cfg.model_dump_json(exclude=ignored),
        model.input_shape,
        str(model.likelihood),
        n_classes,
        tuple(seeds),
        cfg.model_dump_json(),
    )
    h = hashlib.blake2b(repr(spec).encode(), digest_size=20)
    h.update(test_digest)
    h.update(digest(*(a for x, y in shots for a in (x, y))))
    return h.hexdigest()


def _runs(
    loaded: LoadedModel,
    arm: Arm,
    shots: list[tuple[torch.Tensor, np.ndarray]],
    test: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    cfg: EvalConfig,
    seeds: list[int],
) -> list[float]:
    """Test accuracies of one k's runs (one per episode: its shots and seed), from their initial models."""
    models = [_initial_model(loaded, arm, s, x) for s, (x, _) in zip(seeds, shots, strict=True)]
    return _train_and_score(models, shots, test, n_classes, cfg, seeds)


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


def _lp_head(model: Autoencoder, x: torch.Tensor, y: np.ndarray, n_classes: int, cfg: EvalConfig) -> nn.Linear:
    """The frozen-feature logistic head on the shots, its scaler folded in, as an nn.Linear."""
    model.eval()
    with torch.inference_mode():
        z = model.encode(x).numpy()  # float32, as stored in feature files
    w, b = head_weights(shots_head(z, y, cfg))  # the frozen arm's head where these encodings are its features
    with module_init():  # its random init is overwritten below, but must not shift a seeded build elsewhere
        head = nn.Linear(z.shape[1], n_classes)
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(w, dtype=torch.float32))
        head.bias.copy_(torch.as_tensor(b, dtype=torch.float32))
    return head


def _accuracy(model: Autoencoder, head: nn.Linear, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([head(model.encode(xb)).argmax(1) for xb in x.split(pass_rows(x[0].numel()))])
    return float((pred == y).double().mean())


class _Classifier(nn.Module):
    """An encoder and its linear head as one module (`torch.func` calls a module through `forward`)."""

    def __init__(self, model: Autoencoder, head: nn.Linear) -> None:
        super().__init__()
        self.model, self.head = model, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode(x))


def _train_and_score(
    models: list[Autoencoder],
    shots: list[tuple[torch.Tensor, np.ndarray]],
    test: tuple[torch.Tensor, torch.Tensor],
    n_classes: int,
    cfg: EvalConfig,
    seeds: list[int],
) -> list[float]:
    """Fine-tune each encoder + LP-initialized head on its own shots for `finetune_epochs`; test accuracy of each."""
    return [_accuracy(m.model, m.head, *test) for m in _fine_tuned(models, shots, n_classes, cfg, seeds)]


def _fine_tuned(
    models: list[Autoencoder],
    shots: list[tuple[torch.Tensor, np.ndarray]],
    n_classes: int,
    cfg: EvalConfig,
    seeds: list[int],
    *,
    vectorize: bool = True,
) -> list[_Classifier]:
    """Each encoder (trained in place) with its LP-initialized head, fine-tuned on its own shots (the same
    number for all): as one vectorized ensemble, or one after another where the encoder does not vectorize."""
    members = [
        _Classifier(model, _lp_head(model, x, y, n_classes, cfg)) for model, (x, y) in zip(models, shots, strict=True)
    ]
    x = torch.stack([x for x, _ in shots])  # (M, n, *input_shape)
    y = torch.stack([torch.from_numpy(y) for _, y in shots])  # (M, n)
    if vectorize:
        size = max(1, STEP_ELEMENTS // (min(x.shape[1], cfg.finetune_batch_size) * x[0, 0].numel()))
        try:
            for i in range(0, len(members), size):  # as many members at once as the step's memory bound allows
                _fit_ensemble(members[i : i + size], x[i : i + size], y[i : i + size], cfg, seeds[i : i + size])
            return members
        except RuntimeError as e:  # an encoder torch.func cannot vectorize (the first group fails): all untouched
            log.warning("few-shot fine-tuning one run at a time: the encoder does not vectorize (%s)", e)
    for i, member in enumerate(members):
        _fit_ensemble([member], x[i : i + 1], y[i : i + 1], cfg, seeds[i : i + 1], vectorize=False)
    return members


# input elements in one vectorized fine-tuning step (members x rows x input size): bounds the activations it
# keeps for the backward pass, about 330 bytes per element on the conv backbone (five 64x64 members at k=50 on
# dSprites, 3.1M elements, held 1.0 GB); digits' steps (8x8 inputs) hold every member at once
STEP_ELEMENTS = 1 << 20


def _fit_ensemble(
    members: list[_Classifier],
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: EvalConfig,
    seeds: list[int],
    *,
    vectorize: bool = True,
) -> None:
    """Train every member on its own shots x[i], y[i] (M, n, ...) in place, each as if trained alone.

    Vectorized, the members' parameters and buffers are stacked along a new leading dimension and one
    `torch.func.vmap`-ed forward and backward serves all of them: the total loss is the sum of the
    members' own mean cross-entropies, so a member's gradient is its solo gradient; Adam is
    elementwise, so one optimizer over the stacked tensors steps each member as its own optimizer
    would (a parameter without a gradient, a decoder's, is skipped for every member alike). Nothing
    is written back to the members until training has finished. Not vectorized (one member only),
    the member's own module is trained directly.
    """
    if vectorize:
        params, buffers = torch.func.stack_module_state(members)
        base = copy.deepcopy(members[0]).to("meta")  # the architecture only: vmap supplies every member's tensors

        def member_loss(p: dict, b: dict, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(torch.func.functional_call(base, (p, b), (xb,)), yb)

        batched = torch.func.vmap(member_loss)

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return batched(params, buffers, xb, yb).sum()

        trained, tensors = base, list(params.values())
    else:
        assert len(members) == 1, "only a single member trains without vectorization"
        trained = members[0]

        def loss(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(trained(xb[0]), yb[0])

        tensors = list(trained.parameters())
    # fused: one kernel over all parameters (the per-tensor loop was ~8% of a fine-tuning run on CPU)
    opt = torch.optim.Adam(tensors, lr=cfg.finetune_lr, fused=True)
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # each member shuffles with its own generator
    member = torch.arange(len(members))[:, None]
    trained.train()
    for _ in range(cfg.finetune_epochs):
        order = torch.stack([torch.randperm(x.shape[1], generator=g) for g in gens])  # (M, n)
        for batch in order.split(cfg.finetune_batch_size, dim=1):
            value = loss(x[member, batch], y[member, batch])
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
    if vectorize:
        with torch.no_grad():
            for i, m in enumerate(members):
                for name, t in [*m.named_parameters(), *m.named_buffers()]:
                    t.copy_({**params, **buffers}[name][i])
