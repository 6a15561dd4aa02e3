"""Helpers of the reliability suite: the `ae-repr` CLI as a real subprocess, small configs, a trained model.

Everything here is kept small (digits, 1-2 epochs, an MLP of width 32, latent width 4): the suite runs
in CI on 2 shared cores.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import background
import numpy as np
import yaml

from ae_repr.config import ALL_VARIANTS

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "ae-repr"
# the installed console script when it sits beside this interpreter (the venv), else the module
CLI = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "ae_repr.cli"]

# A small, fast model and evaluation: an MLP of width 32 on digits, latent width 4, cheap eval settings.
TINY: dict = {
    "models": {
        "latent_dim": 4,
        "backbone": "mlp",
        "overrides": {v: {"hidden": [32]} for v in ALL_VARIANTS},
    },
    "train": {"epochs": 1, "batch_size": 128, "patience": 1000},
    "eval": {  # speed knobs only; the ones EvalConfig does not (or no longer) know are dropped by write_config
        "baselines": ["pca"],
        "knn_k": [5],
        "fewshot_k": [1],
        "fewshot_seeds": 2,
        "fewshot_finetune": False,
        "map_method": "none",
        "probe_c_grid": [1.0],
        "probe_Cs": [1.0],
        "probe_folds": 2,
        "trustworthiness_max_rows": 300,
    },
    "tracking": {"enabled": False},
    "seed": 0,
}


def deep_merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested dicts merged key by key."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, extra: dict | None = None) -> Path:
    """Write TINY (plus `extra`, deep-merged) as YAML."""
    from ae_repr.config import EvalConfig

    base = dict(TINY, eval={k: v for k, v in TINY["eval"].items() if k in EvalConfig.model_fields})
    path.write_text(yaml.safe_dump(deep_merge(base, extra or {}), sort_keys=False))
    return path


def cli_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every CLI subprocess runs with (`base`, by default the session's starting one: background
    tests call this beside tests that change `os.environ`): no telemetry, no progress bars, one thread each."""
    env = background.environ() if base is None else dict(base)
    env.update(
        DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        TQDM_DISABLE="1",
        OMP_NUM_THREADS="1",  # several CLI processes share 2 cores; more threads only thrash
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.pop("PREFECT_API_URL", None)  # `run` must use its own ephemeral API in these tests
    return env


def run_cli(*args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `ae-repr ARGS` to completion; stdout and stderr captured as text."""
    return subprocess.run(
        [*CLI, *map(str, args)], cwd=cwd or ROOT, env=cli_env(env), capture_output=True, text=True, timeout=timeout
    )


def start_cli(*args: str | os.PathLike[str], cwd: Path | None = None, log: Path | None = None,
              env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `ae-repr ARGS` in its own process group; output goes to `log` (stdout and stderr together)."""
    with open(log if log is not None else os.devnull, "w") as out:  # the child keeps its own copy
        return subprocess.Popen(
            [*CLI, *map(str, args)], cwd=cwd or ROOT, env=cli_env(env), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stderr_lines(res: subprocess.CompletedProcess) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.strip()]


def describe(res: subprocess.CompletedProcess) -> str:
    """The command's outcome, for assertion messages."""
    return f"exit {res.returncode}\n--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-3000:]}"


def assert_one_line_error(res: subprocess.CompletedProcess, code: int, *names: str) -> str:
    """Exit `code`, exactly one non-empty stderr line that contains every one of `names`, no traceback."""
    lines = stderr_lines(res)
    assert res.returncode == code, describe(res)
    assert "Traceback" not in res.stderr + res.stdout, describe(res)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}\n{describe(res)}"
    line = lines[0]
    for name in names:
        assert name in line, f"the error line does not name {name!r}: {line}"
    return line


def files_under(folder: Path) -> set[Path]:
    """Every file and folder below `folder` (empty set when it does not exist)."""
    return set(folder.rglob("*")) if folder.exists() else set()


@dataclass(frozen=True)
class Trained:
    """A model trained once per session: its run directory, model directory and config file."""

    out: Path
    model_dir: Path
    config: Path

    def copy(self, dest: Path) -> Path:
        """A private copy of the model directory (for tests that tamper with it); returns the copy."""
        shutil.copytree(self.model_dir, dest)
        return dest


def digits_features(
    path: Path,
    *,
    k: int = 4,
    n: int = 300,
    variant: str | None = None,
    labels: bool = True,
    sample_id: np.ndarray | None = None,
    drop: tuple[str, ...] = (),
) -> Path:
    """A contract feature file over the first `n` digits rows (random z), as `extract` would write it."""
    import pyarrow.parquet as pq

    from ae_repr.data import load_dataset
    from ae_repr.io import write_features

    ds = load_dataset("digits")
    rows = np.arange(n)
    rng = np.random.default_rng(k + n)
    write_features(
        path,
        sample_id=ds.sample_id[rows] if sample_id is None else sample_id,
        split=ds.split[rows],
        label=ds.labels[rows] if labels else None,
        z=rng.normal(size=(n, k)).astype(np.float32),
        metadata={"variant": variant or path.stem, "latent_dim": k, "dataset": "digits", "dataset_sha256": ds.sha256},
    )
    if drop:
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(list(drop)), path)
    return path
