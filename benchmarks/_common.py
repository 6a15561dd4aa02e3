"""Shared helpers of the benchmark scripts: the machine's description, alternating rounds, synthetic data."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout
    sys.path.insert(0, str(ROOT))


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, torch and its threads, OpenMP policy, load, date."""
    import torch

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


@dataclass(frozen=True)
class Measured:
    """Work done (rows, FLOPs, ...) in `wall` seconds of wall clock and `cpu` seconds of this process's CPU."""

    work: float
    wall: float
    cpu: float

    def rate(self, clock: str) -> float:
        """Work per wall second, or per CPU second of this process ("wall" | "cpu")."""
        return self.work / (self.wall if clock == "wall" else self.cpu)


def measure(fn: Callable[[], float]) -> Measured:
    """Call `fn` (it returns the work it did) under both clocks."""
    cpu, wall = time.process_time(), time.perf_counter()
    work = fn()
    return Measured(work, time.perf_counter() - wall, time.process_time() - cpu)


def alternate(sides: dict[str, Callable[[], Any]], rounds: int) -> dict[str, list[Any]]:
    """Run every side once per round, in an order reversed every other round; each side's results by round.

    On a shared machine the load drifts: adjacent measurements see nearly the same load, so ratios
    are taken within a round and their median over rounds is reported.
    """
    out: dict[str, list[Any]] = {k: [] for k in sides}
    names = list(sides)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            out[name].append(sides[name]())
    return out


def paired_ratio(num: list[Measured], den: list[Measured], clock: str) -> float:
    """Median over rounds of num[i].rate / den[i].rate on `clock`."""
    return statistics.median(a.rate(clock) / b.rate(clock) for a, b in zip(num, den, strict=True))


def median_rate(xs: list[Measured], clock: str) -> float:
    """Median over rounds of the rate on `clock`."""
    return statistics.median(x.rate(clock) for x in xs)


def random_binary(n: int, shape: tuple[int, ...], seed: int = 0, test_fraction: float = 0.02):  # -> Dataset
    """n random binary uint8 samples of `shape` (like binarized MNIST), all but a small sliver in the train split."""
    from ae_repr.data.dataset import Dataset, stratified_split

    rng = np.random.default_rng(seed)
    x = (rng.random((n, *shape)) < 0.3).astype(np.uint8)
    split = stratified_split(n, None, test_fraction=test_fraction, seed=seed)
    return Dataset(name=f"random{shape}x{n}", x=x, split=split, sample_id=np.arange(n, dtype=np.int64),
                   sha256=hashlib.sha256(x.tobytes()).hexdigest())


def dump(path: str | os.PathLike[str] | None, result: dict[str, Any]) -> None:
    """Write a script's result as JSON when `--json PATH` was given."""
    if path:
        Path(path).write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")


def _jsonable(o: Any) -> Any:
    return asdict(o) if isinstance(o, Measured) else str(o)


def run_env(prefect_home: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of a measured `ae-repr run` (or script) process: telemetry off, Prefect's home (its cache and
    the temporary API's database) under `prefect_home` when given, plus `extra`."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_DISABLE_TELEMETRY": "true", **extra}
    if prefect_home is not None:
        env["PREFECT_HOME"] = str(prefect_home)
    return env


def say(*parts: object) -> None:
    """Print and flush (results arrive while a long benchmark runs)."""
    print(*parts, flush=True)


def rounds_main(doc: str, run: Callable[[int], dict[str, Any]], default_rounds: int) -> int:
    """The command line of a benchmark whose one knob is its round count: `--rounds N [--json FILE]`."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=default_rounds)
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    dump(args.json, {"machine": machine(), **run(args.rounds)})
    return 0
