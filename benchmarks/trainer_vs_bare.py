"""Trainer vs a bare PyTorch loop: same model, batch size, data and epochs, measured side by side.

For each case the project's trainer (`ae_repr.train.train_variant`, with its validation pass,
checkpoints and history) and a bare loop (shuffle, forward, `loss()["loss"].backward()`, AdamW step)
train identical models from the same initialization, alternating, several rounds; the ratio of their
training throughputs (train samples / wall second, median over rounds) is printed. The last line is
`trainer_vs_bare=<the smallest ratio>`.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ae_repr.config import ExperimentConfig
from ae_repr.data.dataset import Dataset, stratified_split
from ae_repr.models import build_model
from ae_repr.train import train_variant


def random_binary(n: int, shape: tuple[int, ...], seed: int = 0) -> Dataset:
    """n random binary samples of `shape` (uint8), all but a 2% sliver in the train split."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, *shape)) < 0.3).astype(np.uint8)
    split = stratified_split(n, None, test_fraction=0.02, seed=seed)
    return Dataset(name=f"random{shape}", x=x, split=split, sample_id=np.arange(n, dtype=np.int64),
                   sha256=hashlib.sha256(x.tobytes()).hexdigest())


def bare_loop(variant: str, cfg: ExperimentConfig, data: Dataset, epochs: int) -> float:
    """Train with a minimal loop over the same train rows; returns samples/s."""
    torch.manual_seed(cfg.seed)
    model = build_model(variant, cfg.models.model_config_for(variant), data.shape, "bernoulli")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    x = torch.from_numpy(data.x)
    idx = torch.from_numpy(data.train_idx)
    n_train = int(round(len(idx) * (1 - cfg.train.val_fraction)))  # the trainer holds out a validation part
    idx = idx[:n_train]
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for b in idx[torch.randperm(len(idx))].split(cfg.train.batch_size):
            xb = x[b].float()
            loss = model.loss(xb, target=xb)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return epochs * len(idx) / (time.perf_counter() - start)


def trainer(variant: str, cfg: ExperimentConfig, data: Dataset, epochs: int) -> float:
    """Train with the project's trainer; returns train samples/s over its whole wall time."""
    n_train = int(round(len(data.train_idx) * (1 - cfg.train.val_fraction)))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_variant(variant, data, cfg, Path(tmp) / variant, progress=False)
        return epochs * n_train / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and samples (CI-sized)")
    ap.add_argument("--variants", default="vae", help="comma-separated variants (default: vae)")
    args = ap.parse_args()
    n, rounds, epochs = (20_000, 3, 2) if args.quick else (20_000, 5, 3)
    torch.set_num_threads(torch.get_num_threads())
    cases = [("mlp", (784,), (512,)), ("conv", (1, 28, 28), (512,))]
    ratios: list[float] = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {n} samples, {epochs} epochs x {rounds} rounds")
    for variant in args.variants.split(","):
        for backbone, shape, hidden in cases:
            data = random_binary(n, shape)
            cfg = ExperimentConfig.model_validate({
                "models": {"variants": [variant], "latent_dim": 16, "backbone": backbone,
                           "overrides": {variant: {"hidden": list(hidden)}}},
                "train": {"epochs": epochs, "batch_size": 128, "patience": epochs + 1},
            })
            ours, bare = [], []
            for _ in range(rounds):  # alternate so drift on a shared machine hits both alike
                bare.append(bare_loop(variant, cfg, data, epochs))
                ours.append(trainer(variant, cfg, data, epochs))
            o, b = statistics.median(ours), statistics.median(bare)
            ratios.append(o / b)
            print(f"{variant:9s} {backbone:5s} trainer {o:9.0f} samples/s  bare {b:9.0f} samples/s  ratio {o / b:.3f}")
            sys.stdout.flush()
    print(f"trainer_vs_bare={min(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
