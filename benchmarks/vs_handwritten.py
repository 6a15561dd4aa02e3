"""The default `ae-repr run` against the pipeline a tutorial user writes by hand (benchmarks/handwritten_pipeline.py).

Each run is a fresh process timed from spawn to exit: `ae-repr run --dataset digits --out TMP` (every default
variant and evaluation, MLflow tracking on) and `python benchmarks/handwritten_pipeline.py`, each tracking
into a brand-new SQLite store of its own (both pay MLflow's schema set-up, as a first run does). Each side
has its own PREFECT_HOME in the temp folder, created by one untimed warm-up run of that side, so no timed
run pays for Prefect's database. The sides alternate which goes first each round; the ratio ours / script
is taken per round, its median reported (wall clock, the time a user waits), with both sides' CPU seconds
(the process and every descendant it reaped), and ours' wall seconds per phase from its `timings.json`
(phases overlap: tracking spans the flow). Goal: ours / script <= 1.0 (moonshot 0.77).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, rounds_main, run_env, say

GOAL, MOONSHOT = 1.0, 0.77
SIDES = ("ours", "script")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants included
    return usage.ru_utime + usage.ru_stime


def command(side: str, run_dir: Path) -> list[str]:
    """The command line of one side, writing into `run_dir`."""
    if side == "ours":
        cli = Path(sys.executable).parent / "ae-repr"
        return [str(cli), "run", "--dataset", "digits", "--out", str(run_dir / "out")]
    return [sys.executable, str(ROOT / "benchmarks" / "handwritten_pipeline.py"),
            "--mlflow-uri", f"sqlite:///{run_dir / 'mlflow.db'}"]


def one_run(home: Path, side: str) -> dict[str, Any]:
    """One run of `side` with a fresh MLflow store; its wall and CPU seconds."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{side}-", dir=home))
    env = run_env(home / f"prefect-{side}", MLFLOW_TRACKING_URI=f"sqlite:///{run_dir / 'mlflow.db'}",
                  # this checkout's ae_repr, whichever one the venv's console script was installed from
                  PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine starts it slowly
    cmd = command(side, run_dir)
    cpu, wall = _children_cpu(), time.perf_counter()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=run_dir)
    wall, cpu = time.perf_counter() - wall, _children_cpu() - cpu
    if res.returncode != 0:
        raise RuntimeError(f"{side} failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    out: dict[str, Any] = {"wall_s": wall, "cpu_s": cpu}
    timings = run_dir / "out" / "timings.json"
    if timings.is_file():  # ours: where its time went, by the flow's own per-phase clock
        phases = json.loads(timings.read_text())["phases"]
        out["phases_wall_s"] = {k: v["wall_s"] for k, v in phases.items()}
    return out


def run(rounds: int) -> dict[str, Any]:
    """One warm-up per side, then `rounds` alternating rounds; medians per side and of the per-round ratios."""
    say(f"vs hand-written: ae-repr run --dataset digits vs benchmarks/handwritten_pipeline.py x {rounds} rounds "
        "(+1 warm-up each)")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="vs-handwritten-") as tmp:
        home = Path(tmp)
        for side in SIDES:
            one_run(home, side)
        for r in range(rounds):
            for side in SIDES if r % 2 == 0 else reversed(SIDES):
                runs[side].append(one_run(home, side))
            ours, script = runs["ours"][-1], runs["script"][-1]
            say(f"  round {r + 1}: ours {ours['wall_s']:.1f} s ({ours['cpu_s']:.1f} CPU-s), script "
                f"{script['wall_s']:.1f} s ({script['cpu_s']:.1f} CPU-s), ours / script "
                f"{ours['wall_s'] / script['wall_s']:.3f} (CPU {ours['cpu_s'] / script['cpu_s']:.3f}); ours' "
                f"phases, wall s: {ours.get('phases_wall_s')}")
    out: dict[str, Any] = {"runs": runs}
    for side in SIDES:
        out[side] = {k: statistics.median(x[k] for x in runs[side]) for k in ("wall_s", "cpu_s")}
    pairs = list(zip(runs["ours"], runs["script"], strict=True))
    out["ratios"] = [a["wall_s"] / b["wall_s"] for a, b in pairs]
    out["ratio"] = statistics.median(out["ratios"])
    out["cpu_ratio"] = statistics.median(a["cpu_s"] / b["cpu_s"] for a, b in pairs)
    out["met"], out["met_moonshot"] = out["ratio"] <= GOAL, out["ratio"] <= MOONSHOT
    say(f"  median: ours {out['ours']['wall_s']:.1f} s, script {out['script']['wall_s']:.1f} s; ours / script "
        f"{out['ratio']:.3f} (goal <= {GOAL:g}, moonshot {MOONSHOT:g}: {'met' if out['met'] else 'missed'}); "
        f"CPU {out['cpu_ratio']:.3f}")
    return out


def main() -> int:
    return rounds_main(__doc__, run, default_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
