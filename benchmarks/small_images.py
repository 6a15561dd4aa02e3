"""64×64 images end to end: `ae-repr run --dataset dsprites:2000 --variants vae,beta_vae --epochs 2`, the run a
user tries first on images, timed from a fresh process (`make bench-quick` runs it once).

Goals: under 120 s in all and at most 3 GiB peak memory (the process and its children: `ru_maxrss` of the
largest). Also printed: evaluation and training busy seconds from the run's `timings.json` and their ratio (the
≤ 1.5 goal is for the default config's training budget on `dsprites`; with `--epochs 2` training is cut
short, so the ratio here is larger by construction and only tracks evaluation's cost over time).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import rounds_main, run_env, say

TOTAL_GOAL_S, MEMORY_GOAL_GIB = 120.0, 3.0


def one_run(home: Path) -> dict[str, Any]:
    """One run in a fresh folder: wall seconds, peak memory and the busy seconds per phase."""
    out = Path(tempfile.mkdtemp(dir=home))
    cli = Path(sys.executable).parent / "ae-repr"
    env = run_env(home / "prefect")
    cmd = [str(cli), "run", "--dataset", "dsprites:2000", "--variants", "vae,beta_vae", "--epochs", "2",
           "--no-tracking", "--quiet", "--out", str(out)]
    started = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.time() - started
    if res.returncode != 0:
        raise RuntimeError(f"ae-repr run failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    busy = {k: v["busy_s"] for k, v in json.loads((out / "timings.json").read_text())["phases"].items()}
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2  # KiB -> GiB, largest child so far
    return {"total_s": total, "peak_gib": peak, "phases_busy_s": busy,
            "eval_over_train": busy.get("evaluation", 0.0) / max(busy.get("training", 0.0), 1e-9)}


def run(rounds: int) -> dict[str, Any]:
    """`rounds` runs one after another; the last one's figures (the first also pays Prefect's database set-up)."""
    say("small images: ae-repr run --dataset dsprites:2000 --variants vae,beta_vae --epochs 2")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one_run(Path(tmp)) for _ in range(rounds)]
    x = runs[-1]
    x["met_total"], x["met_memory"] = x["total_s"] < TOTAL_GOAL_S, x["peak_gib"] <= MEMORY_GOAL_GIB
    say(f"  {x['total_s']:.1f} s (goal < {TOTAL_GOAL_S:g}), peak {x['peak_gib']:.2f} GiB (goal <= "
        f"{MEMORY_GOAL_GIB:g}); busy: training {x['phases_busy_s'].get('training', 0):.1f} s, evaluation "
        f"{x['phases_busy_s'].get('evaluation', 0):.1f} s (ratio {x['eval_over_train']:.1f})")
    return {**x, "runs": runs}


def main() -> int:
    return rounds_main(__doc__, run, default_rounds=1)


if __name__ == "__main__":
    sys.exit(main())
