"""Feature extraction throughput: rows/s from a saved model to a finished feature Parquet file.

An MLP VAE encoder (784-512-16, the trainer's architecture for flat 28x28 inputs) is saved the way the
trainer saves it; `ae_repr.features.extract_features` then loads it (checksum verified), encodes every
row of N uint8 28x28 images in batches and writes the contract Parquet file atomically. The clocks run
around that one call; the median over rounds is reported (rows per wall second and per CPU-second).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from _common import Measured, dump, machine, measure, median_rate, random_binary, say

from ae_repr.checkpoint import save_model
from ae_repr.data.dataset import Normalizer
from ae_repr.features import extract_features
from ae_repr.models import build_model, model_config

GOAL = 100_000  # rows per second on 2 cores


def saved_model(folder: Path, shape: tuple[int, ...]) -> Path:
    """An untrained MLP VAE 784-512-16 saved like a trained one (throughput does not depend on the weights)."""
    torch.manual_seed(0)
    model = build_model("vae", model_config("vae", latent_dim=16, backbone="mlp", hidden=[512]), shape, "bernoulli")
    return save_model(folder / "models" / "vae", model, variant="vae",
                      normalizer=Normalizer(np.array(0.0), np.array(1.0), "minmax"), extra={})


def run(n: int, rounds: int) -> dict[str, Any]:
    """Extract n rows `rounds` times; returns rows/s on both clocks."""
    data = random_binary(n, (1, 28, 28), test_fraction=0.25)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = saved_model(Path(tmp), data.shape)
        out = Path(tmp) / "features" / "vae.parquet"

        def once() -> float:
            extract_features(model_dir, data, out)
            return n

        extract_features(model_dir, data, out)  # warm-up: first-call allocations and imports
        runs: list[Measured] = [measure(once) for _ in range(rounds)]
        assert pq.read_metadata(out).num_rows == n
    wall, cpu = median_rate(runs, "wall"), median_rate(runs, "cpu")
    say(f"extraction: {n} rows (784-d uint8 -> 16 float32), {rounds} rounds: {wall:,.0f} rows/s wall, "
        f"{cpu:,.0f} rows per CPU-s  (goal {GOAL:,} rows/s: {'met' if wall >= GOAL else 'not met'})")
    return {"rows": n, "rounds": runs, "rows_per_s": wall, "rows_per_cpu_s": cpu, "goal": GOAL, "met": wall >= GOAL}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    dump(args.json, {"machine": machine(), **run(args.rows, args.rounds)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
