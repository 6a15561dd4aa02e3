"""A variant from another package (examples/ae_repr_sparse_ae, installed into a temporary folder, entry point
`ae_repr.variants`) is trained, extracted and evaluated by `ae-repr run` like a built-in one, with every task
its capabilities allow and a note for the others; nothing in this repository names it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ae_repr_sparse_ae"


def _env(site: Path) -> dict[str, str]:
    env = dict(os.environ, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), env.get("PYTHONPATH", "")])
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.pop("PREFECT_API_URL", None)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ae_repr.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plug-in installed (no dependencies, no index: it is local) into a temporary folder."""
    base = tmp_path_factory.mktemp("plugin")
    src = shutil.copytree(EXAMPLE, base / "src")  # build in a copy: nothing is written into the repository
    target = base / "site"
    res = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert (target / "ae_repr_sparse_ae").is_dir()
    return target


def test_plugin_variant_runs_end_to_end(site: Path, tmp_path: Path) -> None:
    env = _env(site)
    assert "sparse_ae" in _cli(env, "train", "--help").stdout  # a CLI choice once installed
    without = _cli(_env(tmp_path), "train", "--variant", "sparse_ae", "--out", str(tmp_path / "x"))
    assert without.returncode == 2 and "sparse_ae" in without.stderr  # and not before

    cfg = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    cfg["models"].update(latent_dim=4, backbone="mlp", overrides={"sparse_ae": {"hidden": [32], "sparsity": 0.05}})
    cfg["eval"].update(applications=["anomaly", "generation", "rate_distortion"], fewshot_k=[1], finetune_epochs=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    res = _cli(env, "run", "--config", str(config), "--variants", "sparse_ae", "--no-tracking", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]

    summary = pd.read_parquet(out / "summary.parquet")
    mine = summary[summary["representation"] == "sparse_ae"]
    metrics = set(zip(mine["task"], mine["metric"], strict=True))
    assert ("linear_probe", "accuracy") in metrics
    assert {("anomaly", "auroc"), ("anomaly", "auroc_code_l1")} <= metrics  # its own anomaly score, by its name
    assert ("generation", "sample_confidence") in metrics  # a prior fitted to its codes
    assert not {t for t, _ in metrics} & {"rate_distortion"}  # no posterior: no rate, no distortion...
    assert ("generation", "nll_is") not in metrics
    report = (out / "report.md").read_text()
    assert "sparse_ae: rate_distortion not run: the model has no Gaussian posterior" in report  # ...and why
    assert "nll_is not run" in report
    model_meta = yaml.safe_load((out / "models" / "sparse_ae" / "config.json").read_text())
    assert model_meta["variant"] == "sparse_ae" and model_meta["model_config"]["sparsity"] == 0.05
