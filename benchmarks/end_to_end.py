"""End to end: `ae-repr run` on the digits default, with MLflow tracking on and off, split by stage.

Each run is a fresh process (`ae-repr run --dataset digits --out TMP [--no-tracking]`) timed from spawn
to exit; the split comes from the run's own `<out>/timings.json` (the flow's per-phase clock): start-up
(spawn until the flow body ran: interpreter, imports, the ephemeral Prefect API), the flow body, and
the time after it (Prefect's shutdown, exit); inside the flow, the busy seconds per phase (data,
training, extraction, evaluation, tracking). Orchestration + tracking = start-up + after + the
tracking phase's busy seconds; Prefect's per-task cost inside the flow body is not separable there and
counts as work (the difference tracking on - off is printed as a cross-check). One untimed warm-up run creates Prefect's database first (a later `make demo` finds it);
then tracking on and off alternate. Goals: under 60 s in all, orchestration + tracking <= 25% of it.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import rounds_main, run_env, say

TOTAL_GOAL_S, OVERHEAD_GOAL = 60.0, 0.25


def one_run(home: Path, tracking: bool) -> dict[str, Any]:
    """One `ae-repr run` on digits in a fresh out folder; its wall time and stage split."""
    out = Path(tempfile.mkdtemp(dir=home))
    cli = Path(sys.executable).parent / "ae-repr"
    env = run_env(home / "prefect", MLFLOW_TRACKING_URI=f"sqlite:///{home / 'mlflow.db'}")
    cmd = [str(cli), "run", "--dataset", "digits", "--out", str(out)] + ([] if tracking else ["--no-tracking"])
    spawned = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    total = time.time() - spawned
    if res.returncode != 0:
        raise RuntimeError(f"ae-repr run failed ({res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    t = json.loads((out / "timings.json").read_text())
    busy = {k: v["busy_s"] for k, v in t["phases"].items()}
    startup = t["flow_started"] - spawned  # interpreter, imports, the ephemeral Prefect API
    after = total - startup - t["flow_s"]  # after the flow body: Prefect's shutdown, process exit
    overhead = startup + after + busy.get("tracking", 0.0)
    return {"tracking": tracking, "total_s": total, "startup_s": startup, "flow_s": t["flow_s"], "after_s": after,
            "overhead_s": overhead, "overhead_share": overhead / total, "phases_busy_s": busy}


def run(rounds: int) -> dict[str, Any]:
    """Warm-up, then alternate tracking on/off; medians per side."""
    say(f"end to end: ae-repr run --dataset digits, tracking on/off x {rounds} rounds (+1 warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        one_run(home, tracking=False)
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for r in range(rounds):
            for side in ("on", "off") if r % 2 == 0 else ("off", "on"):
                runs[side].append(one_run(home, tracking=side == "on"))
                x = runs[side][-1]
                say(f"  tracking {side:3s}: {x['total_s']:5.1f} s total, start-up {x['startup_s']:.1f} s, flow "
                    f"{x['flow_s']:.1f} s, orchestration + tracking {x['overhead_share']:.0%}; busy {x['phases_busy_s']}")
    out: dict[str, Any] = {"runs": runs}
    for side, xs in runs.items():
        out[side] = {k: statistics.median(x[k] for x in xs) for k in ("total_s", "startup_s", "flow_s", "overhead_share")}
    # cross-check: what switching tracking on costs on the wall, paired by round
    out["tracking_cost_s"] = statistics.median(a["total_s"] - b["total_s"] for a, b in zip(runs["on"], runs["off"], strict=True))
    on = out["on"]
    out["overhead_share_paired"] = (on["startup_s"] + statistics.median(x["after_s"] for x in runs["on"])
                                    + max(out["tracking_cost_s"], 0.0)) / on["total_s"]
    out["met_total"], out["met_overhead"] = on["total_s"] < TOTAL_GOAL_S, on["overhead_share"] <= OVERHEAD_GOAL
    say(f"  median, tracking on: {on['total_s']:.1f} s (goal < {TOTAL_GOAL_S:g}), orchestration + tracking "
        f"{on['overhead_share']:.0%} (goal <= {OVERHEAD_GOAL:.0%}); tracking off: {out['off']['total_s']:.1f} s "
        f"(on - off, paired: {out['tracking_cost_s']:+.1f} s; with that as the tracking cost, orchestration + "
        f"tracking is {out['overhead_share_paired']:.0%})")
    return out


def main() -> int:
    return rounds_main(__doc__, run, default_rounds=2)


if __name__ == "__main__":
    sys.exit(main())
