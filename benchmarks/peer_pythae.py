"""Against a peer: the same VAE (784-512-16, MLP, batch 128, same rows) trained by pythae's trainer and by ours.

Each side runs in its own process (`_peer_side.py`): pythae under benchmarks/.peer-venv (installed from
benchmarks/requirements-peers.txt, never a dependency of the project), ours under the project's venv;
the sides alternate for several rounds, and the ratio is the median over rounds of ours / pythae in
training rows per second (wall clock and this process's CPU clock). Goal: >= 1.3x pythae.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from _common import Measured, alternate, median_rate, paired_ratio, rounds_main, say

HERE = Path(__file__).resolve().parent
PEER_PYTHON = HERE / ".peer-venv" / "bin" / "python"
GOAL = 1.3


def side(python: Path | str, name: str, rows: int, epochs: int) -> Measured:
    """Run one side in a fresh process; its training rows, wall and CPU seconds."""
    res = subprocess.run([str(python), str(HERE / "_peer_side.py"), "--side", name, "--rows", str(rows),
                          "--epochs", str(epochs)], capture_output=True, text=True)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"{name} side failed (exit {res.returncode}): {res.stderr.strip().splitlines()[-1:]}")
    r = json.loads(lines[-1][7:])
    return Measured(r["work"], r["wall"], r["cpu"])


def run(rounds: int, rows: int = 20_000, epochs: int = 2) -> dict[str, Any]:
    """Alternate the two sides; returns rows/s of each and ours / pythae."""
    if not PEER_PYTHON.exists():
        raise RuntimeError(f"{PEER_PYTHON} is missing: run `make peer-venv` first")
    say(f"peer: pythae vs ours, MLP VAE 784-512-16, {rows} rows, batch 128, {epochs} epochs x {rounds} rounds")
    res = alternate({"pythae": lambda: side(PEER_PYTHON, "pythae", rows, epochs),
                     "ours": lambda: side(sys.executable, "ours", rows, epochs)}, rounds)
    out: dict[str, Any] = {"rows": rows, "epochs": epochs, "rounds": res}
    for clock in ("cpu", "wall"):
        out[clock] = {"ours": median_rate(res["ours"], clock), "pythae": median_rate(res["pythae"], clock),
                      "ratio": paired_ratio(res["ours"], res["pythae"], clock)}
        o = out[clock]
        say(f"  per {clock}-s: ours {o['ours']:8.0f} rows  pythae {o['pythae']:8.0f} rows  ours/pythae {o['ratio']:.2f}x")
    out["met"] = out["cpu"]["ratio"] >= GOAL
    return out


def main() -> int:
    return rounds_main(__doc__, run, default_rounds=3)


if __name__ == "__main__":
    sys.exit(main())
