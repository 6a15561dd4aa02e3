"""Distance to the hardware limit: the trainer's achieved FLOP/s on the MLP VAE vs the fp32 matmul peak.

FLOPs are counted from the layer shapes. The MLP VAE 784-512-16 has Linear layers 784x512, 512x32
(mu and log-variance), 16x512 and 512x784: M = 827,392 multiply-adds per row. A training row costs
2M FLOPs forward, 2M for the weight gradients and 2M for the input gradients, except the first
layer's (the data needs none): 6M - 2*784*512 = 4.16 MFLOP executed. The common "6 x params" rule
gives 6M = 4.96 MFLOP; both are reported, the goal is judged on the executed count. Activations,
losses and the optimizer are not counted; the trainer's validation pass is timed but not counted.
The peak is the best of five 2048x2048 `torch.mm` calls, measured in every round next to a full
trainer run (20k random binary 28x28 rows, batch 128, 2 epochs); a round's fraction is the trainer's
FLOP/s over that round's peak, on the wall clock and on this process's CPU clock.

`run(..., threads=n)` measures both sides at n torch threads. `ae-repr run` trains each model with
`flows.plan.threads_per_task()` threads (the cores shared by the two task runs side by side: one each on two
cores), so the full and quick runs measure that case too, beside the process's own thread count.
"""

from __future__ import annotations

import statistics
import sys
from typing import Any

import torch
from _common import Measured, alternate, measure, rounds_main, say
from trainer_vs_bare import config, trainer

from ae_repr.models import build_model
from ae_repr.train import torch_threads

GOAL = 0.5
MM = 2048


def linear_macs(model: torch.nn.Module) -> tuple[int, int]:
    """Multiply-adds per row of all Linear layers, and of the first one (it needs no input gradient)."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    return sum(m.in_features * m.out_features for m in layers), layers[0].in_features * layers[0].out_features


def peak() -> Measured:
    """The best of five fp32 MM x MM matmuls (after one warm-up)."""
    a, b = torch.randn(MM, MM), torch.randn(MM, MM)
    torch.mm(a, b)
    return min((measure(lambda: (torch.mm(a, b), 2.0 * MM**3)[1]) for _ in range(5)), key=lambda m: m.wall)


def run(rounds: int, rows: int = 20_000, threads: int | None = None) -> dict[str, Any]:
    """Alternate peak and trainer runs (at `threads` torch threads, else the process's); returns FLOP/s of each
    and the fractions of peak."""
    from _common import random_binary

    if threads is not None:
        with torch_threads(threads):
            return run(rounds, rows)  # its result records the thread count

    data, cfg = random_binary(rows, (1, 28, 28)), config("vae", "mlp", 2)
    model = build_model("vae", cfg.models.model_config_for("vae"), data.shape, "bernoulli")
    macs, first = linear_macs(model)
    executed, rule = 6 * macs - 2 * first, 6 * macs
    res = alternate({"peak": peak, "trainer": lambda: trainer("vae", cfg, data)}, rounds)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "macs_per_row": macs, "flop_per_row_executed": executed, "flop_per_row_6x": rule,
                           "rounds": res}
    for clock in ("wall", "cpu"):
        peaks = [p.rate(clock) for p in res["peak"]]
        train = [t.rate(clock) * executed for t in res["trainer"]]
        out[clock] = {"peak_gflops": statistics.median(peaks) / 1e9, "train_gflops": statistics.median(train) / 1e9,
                      "fraction": statistics.median(t / p for t, p in zip(train, peaks, strict=True)),
                      "fraction_6x": statistics.median(t / p * rule / executed for t, p in zip(train, peaks, strict=True))}
    c, w = out["cpu"], out["wall"]
    say(f"FLOP/s at {torch.get_num_threads()} torch thread(s): MLP VAE {macs:,} MACs/row, {executed / 1e6:.2f} MFLOP/row executed ({rule / 1e6:.2f} by 6x params)")
    say(f"  per CPU-s : peak {c['peak_gflops']:.0f} GFLOP, trainer {c['train_gflops']:.0f} GFLOP -> "
        f"{c['fraction']:.1%} of peak ({c['fraction_6x']:.1%} by 6x params)")
    say(f"  per wall-s: peak {w['peak_gflops']:.0f} GFLOP/s, trainer {w['train_gflops']:.0f} GFLOP/s -> "
        f"{w['fraction']:.1%} of peak ({w['fraction_6x']:.1%} by 6x params)")
    out["met"] = c["fraction"] >= GOAL
    return out


def main() -> int:
    return rounds_main(__doc__, run, default_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
