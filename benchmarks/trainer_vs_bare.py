"""Trainer vs a bare PyTorch loop: same model, batch size, rows and epochs, measured side by side.

For each variant and backbone the project's trainer (`ae_repr.train.train_variant`: normalizer fit, LR
schedule, per-step loss terms, best-weights copy, history, checkpoints, final save with checksum) and a
bare loop (shuffle, gather + float, `loss()["loss"].backward()`, optimizer step, nothing else) train
identical models (same seed, same training rows, the trainer's optimizer and memory format) on random
binary 28x28 images, alternating, several rounds. The headline ratio gives both the same work: no
validation split (`val_fraction` 0), so it measures what the trainer's loop costs. A third side, the
trainer as configured by default (10% of the rows held out, a validation pass each epoch for early
stopping), shows what that extra forward pass costs on top (`with_validation`). Throughput is training
rows x epochs / wall seconds: the trainer's clocks run from the call to the saved model, the bare
loop's only around its loop. Two clocks: rows per CPU-second of this process (the headline: on a shared
machine it is the stable estimate of the dedicated-machine ratio) and rows per wall second (noisy under
load). A ratio is the median over rounds of trainer / bare. The last line is
`trainer_vs_bare=<the smallest CPU ratio>`. With --stock-adamw a fourth side, the bare loop as a minimal
script writes it (`torch.optim.AdamW`'s defaults, default memory format), shows what the trainer's fused
optimizer and channels-last convs are worth.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import torch
from _common import Measured, alternate, dump, machine, measure, median_rate, paired_ratio, random_binary, say

from ae_repr.config import ALL_VARIANTS, ExperimentConfig, TrainConfig
from ae_repr.corruption import corrupt
from ae_repr.data.dataset import Dataset
from ae_repr.models import build_model
from ae_repr.train import split_validation, train_variant

# (backbone, samples): the conv case costs ~3.5x the MLP's multiply-adds per sample
CASES = {"mlp": 20_000, "conv": 6_000}
QUICK_VARIANTS = "vae,vq_vae"


def config(variant: str, backbone: str, epochs: int, val_fraction: float = 0.0) -> ExperimentConfig:
    """MLP 784-512-16 or the default conv stack (32, 64 channels), latent 16, batch 128, no early stop."""
    return ExperimentConfig.model_validate({
        "models": {"variants": [variant], "latent_dim": 16, "backbone": backbone,
                   "overrides": {variant: {"hidden": [512]}}},
        "train": {"epochs": epochs, "batch_size": 128, "patience": epochs + 1, "val_fraction": val_fraction},
    })


def bare_loop(variant: str, cfg: ExperimentConfig, data: Dataset, *, stock_adamw: bool = False) -> Measured:
    """Train with a minimal loop over the trainer's training rows; the clocks run around the loop alone."""
    tc = cfg.train
    torch.manual_seed(cfg.seed)
    model_cfg = cfg.models.model_config_for(variant)
    model = build_model(variant, model_cfg, data.shape, "bernoulli")  # the trainer's choice for [0, 1] images
    if not stock_adamw:  # the trainer's settings: channels-last conv weights and fused AdamW
        model = model.to(memory_format=torch.channels_last)
    fused = {} if stock_adamw else {"fused": True}
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, **fused)
    x = torch.from_numpy(data.x)  # uint8, as the trainer keeps it
    rows = torch.from_numpy(split_validation(data.train_idx, tc.val_fraction, cfg.seed)[0])
    model.train()

    def loop() -> float:
        for _ in range(tc.epochs):
            for b in rows[torch.randperm(len(rows))].split(tc.batch_size):
                xb = x[b].float()  # binary images: already in [0, 1]
                xin = corrupt(xb, model_cfg.corruption) if model_cfg.corruption is not None else xb  # dae's noise
                loss = model.loss(xin, target=xb)["loss"]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        return tc.epochs * len(rows)

    return measure(loop)


def trainer(variant: str, cfg: ExperimentConfig, data: Dataset) -> Measured:
    """Train with the project's trainer; the clocks run from the call to the saved model."""
    n_train = len(split_validation(data.train_idx, cfg.train.val_fraction, cfg.seed)[0])
    with tempfile.TemporaryDirectory() as tmp:

        def call() -> float:
            train_variant(variant, data, cfg, Path(tmp) / variant, progress=False)
            return cfg.train.epochs * n_train

        return measure(call)


def run(variants: list[str], backbones: list[str], rounds: int, epochs: int, stock_adamw: bool = False,
        scale: float = 1.0) -> dict[str, Any]:
    """Measure every (variant, backbone) case; returns the cases and the smallest ratio."""
    say(f"trainer vs bare: torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{epochs} epochs x {rounds} rounds, batch 128")
    cases: list[dict[str, Any]] = []
    datasets = {b: random_binary(int(CASES[b] * scale), (1, 28, 28)) for b in backbones}
    for variant in variants:
        for backbone in backbones:
            data, cfg = datasets[backbone], config(variant, backbone, epochs)
            with_val = config(variant, backbone, epochs, TrainConfig().val_fraction)
            sides = {"bare": partial(bare_loop, variant, cfg, data), "trainer": partial(trainer, variant, cfg, data),
                     "trainer_val": partial(trainer, variant, with_val, data)}
            if stock_adamw:
                sides["bare_stock_adamw"] = partial(bare_loop, variant, cfg, data, stock_adamw=True)
            res = alternate(sides, rounds)
            case: dict[str, Any] = {"variant": variant, "backbone": backbone, "rows": len(data), "rounds": res}
            for clock in ("cpu", "wall"):
                case[clock] = {"trainer": median_rate(res["trainer"], clock), "bare": median_rate(res["bare"], clock),
                               "ratio": paired_ratio(res["trainer"], res["bare"], clock),
                               "with_validation": paired_ratio(res["trainer_val"], res["bare"], clock)}
                if stock_adamw:
                    case[clock]["vs_stock_adamw"] = paired_ratio(res["trainer"], res["bare_stock_adamw"], clock)
            c, w = case["cpu"], case["wall"]
            line = (f"{variant:9s} {backbone:5s} per CPU-s: trainer {c['trainer']:7.0f} bare {c['bare']:7.0f} ratio "
                    f"{c['ratio']:.3f} | per wall-s: trainer {w['trainer']:7.0f} bare {w['bare']:7.0f} ratio {w['ratio']:.3f}"
                    f" | with validation: cpu {c['with_validation']:.3f} wall {w['with_validation']:.3f}")
            if stock_adamw:
                line += f" | vs bare+stock AdamW: cpu {c['vs_stock_adamw']:.3f} wall {w['vs_stock_adamw']:.3f}"
            say(line)
            cases.append(case)
    return summarize(cases)


def summarize(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The cases with the smallest ratio per clock, same work and with the default validation pass."""
    return {"cases": cases, "min_ratio": min(c["cpu"]["ratio"] for c in cases),
            "min_ratio_wall": min(c["wall"]["ratio"] for c in cases),
            "min_with_validation": min(c["cpu"]["with_validation"] for c in cases),
            "min_with_validation_wall": min(c["wall"]["with_validation"] for c in cases)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"variants {QUICK_VARIANTS}, fewer rounds (CI-sized)")
    ap.add_argument("--variants", help="comma-separated variants (default: the registry's default run; --quick: " + QUICK_VARIANTS + ")")
    ap.add_argument("--backbones", default="mlp,conv", help="comma-separated backbones (default: mlp,conv)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per training run (default 2)")
    ap.add_argument("--stock-adamw", action="store_true", help="also time the bare loop with stock AdamW")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    variants = (args.variants or (QUICK_VARIANTS if args.quick else ",".join(ALL_VARIANTS))).split(",")
    result = run(variants, args.backbones.split(","), args.rounds or 3, args.epochs, args.stock_adamw,
                 scale=0.5 if args.quick else 1.0)
    dump(args.json, {"machine": machine(), **result})
    say(f"smallest ratio per wall second: {result['min_ratio_wall']:.3f}")
    say(f"trainer_vs_bare={result['min_ratio']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
