"""MLflow tracking overhead: the demo (`ae-repr run`) with tracking on vs off, measured side by side.

Each round runs the same command twice into fresh output folders, once with `--no-tracking` and once
tracked into a local SQLite store (created once before the rounds: a brand-new store costs a one-time
schema set-up of a few seconds, reported separately), alternating which goes first. Prints each pair's
wall and CPU seconds (the command and everything it started; CPU is the steadier number on a shared
machine) and the seconds the tracked run's flow spent in its `tracking` phase (`timings.json`); the last
line is `tracking_overhead=<median on/off wall ratio>` (goal <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import run_env

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # reaped descendants included
    return usage.ru_utime + usage.ru_stime


def _run(args: list[str], out: Path, env: dict[str, str], tracked: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of one `ae-repr run`."""
    cmd = [str(BIN / "ae-repr"), "run", *args, "--out", str(out)] + ([] if tracked else ["--no-tracking"])
    start, cpu = time.perf_counter(), _cpu()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return elapsed, _cpu() - cpu


def _phases(out: Path) -> dict[str, float]:
    """Busy seconds per flow phase from the run's `timings.json`."""
    path = out / "timings.json"
    phases = json.loads(path.read_text()).get("phases", {}) if path.is_file() else {}
    return {k: float(v.get("busy_s", float("nan"))) for k, v in phases.items()}


def main() -> None:
    """Run the rounds and print the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="configs/quick.yaml instead of the demo's default config")
    p.add_argument("--rounds", type=int, default=2, help="pairs of runs (default 2)")
    p.add_argument("--variants", help="comma-separated subset of variants")
    a = p.parse_args()
    args = ["--config", str(ROOT / "configs" / "quick.yaml")] if a.quick else []
    if a.variants:
        args += ["--variants", a.variants]
    with tempfile.TemporaryDirectory(prefix="tracking-overhead-") as tmp:
        tmp_path = Path(tmp)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = run_env(MLFLOW_TRACKING_URI=uri, TQDM_DISABLE="1")
        env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.MlflowClient().search_experiments()"],
                       env=env, check=True, capture_output=True)
        print(f"one-time store set-up (new SQLite schema): {time.perf_counter() - start:.1f}s", flush=True)
        ratios = []
        for i in range(a.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            outs = {t: tmp_path / f"r{i}-{'on' if t else 'off'}" for t in order}
            m = {t: _run(args, outs[t], env, t) for t in order}
            ratios.append(m[True][0] / m[False][0])
            print(f"round {i + 1}: wall off {m[False][0]:.1f}s on {m[True][0]:.1f}s ratio {ratios[-1]:.3f}; "
                  f"cpu off {m[False][1]:.1f}s on {m[True][1]:.1f}s ratio {m[True][1] / m[False][1]:.3f}; "
                  f"tracking phase {_phases(outs[True]).get('tracking', float('nan')):.1f}s", flush=True)
            for t in (False, True):
                busy = ", ".join(f"{k} {v:.1f}s" for k, v in sorted(_phases(outs[t]).items()))
                print(f"  busy per phase, tracking {'on ' if t else 'off'}: {busy}", flush=True)
        print(f"tracking_overhead={statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
