"""Scale: dSprites at N = 10k, 50k, 100k with a conv VAE, wall time and peak RSS per N, each in its own process.

A child process per N generates `dsprites:N` (64x64 uint8 images, kept uint8; the trainer converts
per batch), and trains one epoch of a conv VAE (channels 16, 32, latent 10, batch 128: a small conv
stack so that three sizes fit a benchmark run; the data path is the trainer's, whatever the width) on
its train split (75% of N, of which 90% are trained on and 10% validated). The child reports its peak
RSS (VmHWM) and its stage times; the parent times it from spawn to exit (interpreter start and imports
included) and takes its CPU time from `os.wait4`.
Goals: time(100k) / time(10k) <= 11 (linear) and peak RSS <= 4 GiB at 100k.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

from _common import dump, machine, say

SIZES = (10_000, 50_000, 100_000)
RSS_GOAL_GIB, TIME_RATIO_GOAL = 4.0, 11.0
CHANNELS = (16, 32)


def child(n: int, out: str) -> None:
    """Generate dsprites:n, train one conv-VAE epoch on it, print the stage times as JSON."""
    import tempfile
    from pathlib import Path

    start = time.perf_counter()
    from ae_repr.config import ExperimentConfig
    from ae_repr.data import load_dataset
    from ae_repr.train import train_variant

    imported = time.perf_counter()
    data = load_dataset(f"dsprites:{n}")
    loaded = time.perf_counter()
    cfg = ExperimentConfig.model_validate({
        "models": {"variants": ["vae"], "latent_dim": 10, "backbone": "conv",
                   "overrides": {"vae": {"channels": list(CHANNELS)}}},
        "train": {"epochs": 1, "batch_size": 128},
    })
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        train_variant("vae", data, cfg, Path(tmp) / "vae", progress=False)
    done = time.perf_counter()
    print("RESULT " + json.dumps({"n": n, "dtype": str(data.x.dtype), "import_s": imported - start,
                                  "data_s": loaded - imported, "train_s": done - loaded,
                                  "vm_hwm_gib": _vm_hwm_kib() / 2**20}), flush=True)


def _vm_hwm_kib() -> int:
    """This process's peak resident set (VmHWM, KiB) from /proc: it belongs to the process's own memory map.

    `ru_maxrss` would not do: on Linux, exec() carries the parent's high-water mark into the child's
    rusage, so a child of a large benchmark process reports at least the parent's size.
    """
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure_n(n: int) -> dict[str, Any]:
    """Run the child for n; wall seconds from spawn to exit, its peak RSS and its stage times."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(n)], stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"scale child for N={n} failed with exit code {proc.returncode}")
    stages = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    rss_gib = stages.pop("vm_hwm_gib")
    say(f"  N={n:>7,}: {wall:7.1f} s wall (data {stages['data_s']:.1f} s, train {stages['train_s']:.1f} s), "
        f"peak RSS {rss_gib:.2f} GiB, images {stages['dtype']}")
    return {"wall_s": wall, "peak_rss_gib": rss_gib, "cpu_s": usage.ru_utime + usage.ru_stime, **stages}


def run(sizes: tuple[int, ...] = SIZES) -> dict[str, Any]:
    """Measure every N in turn; returns per-N figures and the goals."""
    say(f"scale: dsprites:N, conv VAE (channels {CHANNELS}), 1 epoch, one process per N")
    per_n = {n: measure_n(n) for n in sizes}
    lo, hi = per_n[min(sizes)], per_n[max(sizes)]
    ratio = hi["wall_s"] / lo["wall_s"]
    train_ratio = hi["train_s"] / lo["train_s"]
    cpu_ratio = hi["cpu_s"] / lo["cpu_s"]
    size_ratio = max(sizes) / min(sizes)
    say(f"  time({max(sizes):,})/time({min(sizes):,}) = {ratio:.2f} wall, {cpu_ratio:.2f} CPU "
        f"(N ratio {size_ratio:.0f}; goal <= {TIME_RATIO_GOAL:g}; training stage alone {train_ratio:.2f}); peak RSS at {max(sizes):,}: {hi['peak_rss_gib']:.2f} GiB "
        f"(goal <= {RSS_GOAL_GIB:g})")
    return {"per_n": per_n, "time_ratio": ratio, "cpu_time_ratio": cpu_ratio, "train_time_ratio": train_ratio,
            "met_time": ratio <= TIME_RATIO_GOAL, "met_rss": hi["peak_rss_gib"] <= RSS_GOAL_GIB}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)), help="comma-separated N (smallest and largest compared)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    if args.child:
        import tempfile

        child(args.child, tempfile.gettempdir())
        return 0
    dump(args.json, {"machine": machine(), **run(tuple(int(s) for s in args.sizes.split(",")))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
