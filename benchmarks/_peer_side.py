"""One side of the peer benchmark, run in its own process: train the MLP VAE 784-512-16 and print JSON.

`--side pythae` runs under benchmarks/.peer-venv (pythae's BaseTrainer); `--side ours` under the
project's venv (`ae_repr.train.train_variant`). Both get the same random binary 28x28 rows, the same
training rows and validation rows (the trainer's own 90/10 split), batch 128, AdamW (lr 2e-3, weight
decay 1e-4), a Bernoulli (BCE) likelihood and a validation pass every epoch. The clocks run around
the training call (pythae: its trainer's construction and `train()`; ours: `train_variant`) and leave
out imports, data generation and the interpreter's start.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import numpy as np

LR, WEIGHT_DECAY, BATCH, LATENT, HIDDEN = 2e-3, 1e-4, 128, 16, 512


def data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random binary (n, 1, 28, 28) uint8 images and the train / validation row indices (90/10)."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n, 1, 28, 28)) < 0.3).astype(np.uint8)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = int(round(n * 0.1))
    return x, np.sort(perm[n_val:]), np.sort(perm[:n_val])


def pythae_side(n: int, epochs: int, out: str) -> tuple[int, float, float]:
    """pythae's VAE (its default MLP encoder/decoder: 784-512-16) trained by its BaseTrainer."""
    import torch
    from pythae.data.datasets import BaseDataset
    from pythae.models import VAE, VAEConfig
    from pythae.trainers import BaseTrainer, BaseTrainerConfig

    x, tr, va = data(n)
    xf = torch.from_numpy(x).float()
    torch.manual_seed(0)
    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=LATENT, reconstruction_loss="bce"))
    assert [m.out_features for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)] == [HIDDEN, LATENT,
                                                                                                   LATENT]
    cfg = BaseTrainerConfig(output_dir=out, num_epochs=epochs, learning_rate=LR, per_device_train_batch_size=BATCH,
                            per_device_eval_batch_size=BATCH, optimizer_cls="AdamW",
                            optimizer_params={"weight_decay": WEIGHT_DECAY}, no_cuda=True)
    # pythae's own dataset class (what its TrainingPipeline builds from arrays): one dict per sample
    train, val = (BaseDataset(xf[i], torch.zeros(len(i))) for i in (tr, va))
    cpu, wall = time.process_time(), time.perf_counter()
    BaseTrainer(model=model, train_dataset=train, eval_dataset=val, training_config=cfg).train()
    return epochs * len(tr), time.perf_counter() - wall, time.process_time() - cpu


def ours_side(n: int, epochs: int, out: str) -> tuple[int, float, float]:
    """ae_repr's VAE (MLP 784-512-16, Bernoulli for [0, 1] images) trained by `train_variant`."""
    from pathlib import Path

    from ae_repr.config import ExperimentConfig
    from ae_repr.data.dataset import Dataset
    from ae_repr.io import sha256_bytes
    from ae_repr.train import split_validation, train_variant

    x, _, _ = data(n)
    ds = Dataset(name="random", x=x, split=np.full(n, "train"), sample_id=np.arange(n, dtype=np.int64),
                 sha256=sha256_bytes(x.tobytes()))
    cfg = ExperimentConfig.model_validate({
        "models": {"variants": ["vae"], "latent_dim": LATENT, "backbone": "mlp", "overrides": {"vae": {"hidden": [HIDDEN]}}},
        "train": {"epochs": epochs, "batch_size": BATCH, "lr": LR, "weight_decay": WEIGHT_DECAY, "patience": epochs + 1},
    })
    tr, _ = split_validation(ds.train_idx, cfg.train.val_fraction, cfg.seed)
    cpu, wall = time.process_time(), time.perf_counter()
    train_variant("vae", ds, cfg, Path(out) / "vae", progress=False)
    return epochs * len(tr), time.perf_counter() - wall, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", choices=["pythae", "ours"], required=True)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=2)
    args = ap.parse_args()
    import torch
    import torch._dynamo  # noqa: F401  (imported by the first optimizer either side builds: seconds, once per process)

    with tempfile.TemporaryDirectory() as out:
        rows, wall, cpu = (pythae_side if args.side == "pythae" else ours_side)(args.rows, args.epochs, out)
    print("RESULT " + json.dumps({"side": args.side, "work": rows, "wall": wall, "cpu": cpu,
                                  "torch": torch.__version__, "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
