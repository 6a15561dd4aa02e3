"""A variant from another package (examples/ae_repr_sparse_ae, installed into a temporary folder, entry point
`ae_repr.variants`) is trained, extracted and evaluated by `ae-repr run` like a built-in one, with every task
its capabilities allow and a note for the others; nothing in this repository names it. The same run's output
is the CLI's progress test (one run serves both: a run costs tens of seconds here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import background
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "ae_repr_sparse_ae"


def _env(site: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base, DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               MLFLOW_DISABLE_TELEMETRY="true", TQDM_DISABLE="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(site), env.get("PYTHONPATH", "")])
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    env.pop("PREFECT_API_URL", None)
    return env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ae_repr.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def _install(base: Path) -> Path:
    """The example plug-in installed (no dependencies, no index: it is local) into a temporary folder."""
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


def _plugin_run(factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path, Path]:
    """(site, the process, its config, its run folder) of `ae-repr run` of the plug-in's variant, through a pipe."""
    tmp = factory.mktemp("plugin_run")
    env = _env(_install(tmp), background.environ())
    cfg = yaml.safe_load((ROOT / "configs" / "quick.yaml").read_text())
    cfg["models"].update(latent_dim=4, backbone="mlp", overrides={"sparse_ae": {"hidden": [32], "sparsity": 0.05}})
    cfg["eval"].update(applications=["anomaly", "generation", "rate_distortion"], fewshot_k=[1], finetune_epochs=1)
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp / "run"
    res = _cli(env, "run", "--config", str(config), "--variants", "sparse_ae", "--no-tracking", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    return tmp / "site", res, config, out


background.register("plugin_run", _plugin_run)  # started as the session starts; these tests run last


@pytest.fixture
def plugin_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, Path, Path]:
    return background.result("plugin_run", tmp_path_factory)


@pytest.fixture
def site(plugin_run) -> Path:
    return plugin_run[0]


def test_plugin_variant_runs_end_to_end(site: Path, plugin_run, tmp_path: Path) -> None:
    env = _env(site)
    assert "sparse_ae" in _cli(env, "train", "--help").stdout  # a CLI choice once installed
    without = _cli(_env(tmp_path), "train", "--variant", "sparse_ae", "--out", str(tmp_path / "x"))
    assert without.returncode == 2 and "sparse_ae" in without.stderr  # and not before

    _, _, _, out = plugin_run
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


def test_cli_run_prints_progress_lines_up_to_the_planned_total_instead_of_bare_prefect_lines(
    site: Path, plugin_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`ae-repr run` through a pipe: one line per finished task run, named, counting to the planned total
    (the plug-in's run: a progress line is the same for any variant)."""
    import re
    from collections import Counter

    from ae_repr import variants
    from ae_repr.config import load_config
    from flows.pretrain_and_probe import planned_tasks

    _, res, config, _ = plugin_run
    monkeypatch.syspath_prepend(str(site))  # the plug-in's entry point, for this test only
    variants.registry.cache_clear()
    try:
        planned = planned_tasks(load_config(config).with_overrides(variants=["sparse_ae"]))
    finally:
        monkeypatch.undo()
        variants.registry.cache_clear()
    found = [m.groups() for m in re.finditer(r"^\[\s*(\d+)/(\d+)\] (.*)$", res.stdout, re.MULTILINE)]
    lines = [line for line in found if not line[2].startswith("running:")]  # heartbeats of a slow task run
    assert lines, res.stdout
    assert [int(n) for n, _, _ in lines] == list(range(1, len(planned) + 1))  # one line per finished run
    assert {int(total) for _, total, _ in lines} == {len(planned)}
    finished = Counter(re.match(r"(?:done|cached) (\S+)", text).group(1) for _, _, text in lines)
    assert finished == Counter(planned)
    assert lines[-1][2].startswith("done summarize (")
    assert any(text.startswith("done train-sparse_ae (") for _, _, text in lines)
    assert "Finished in state Completed()" not in res.stdout + res.stderr
