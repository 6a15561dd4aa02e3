"""The executor setting without a cluster: config and CLI validation, the start checks that need no Ray, the
threads path (no Ray imported), the picklable MLflow logger a Ray task gets, and phase seconds from other
processes. tests/e2e/test_ray.py runs the flow on a real Ray cluster."""

from __future__ import annotations

import json
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import background
import pytest
import yaml

from ae_repr.cli import build_parser, main
from ae_repr.config import ExperimentConfig, load_config, validate_config
from ae_repr.errors import ConfigError
from ae_repr.train import training_key

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_orchestration_defaults_and_overrides() -> None:
    cfg = ExperimentConfig()
    assert (cfg.orchestration.executor, cfg.orchestration.ray_address, cfg.orchestration.cpus_per_task) == (
        "threads", None, None)
    assert cfg.train.gpus_per_task is None
    ray = cfg.with_orchestration(executor="ray", ray_address="10.0.0.5:6379")
    assert (ray.orchestration.executor, ray.orchestration.ray_address) == ("ray", "10.0.0.5:6379")
    assert cfg.with_orchestration() is cfg  # nothing given: the config as it was
    for address in ("ray://head.example:10001", "auto", "[::1]:6379"):
        assert cfg.with_orchestration(ray_address=address).orchestration.ray_address == address


@pytest.mark.parametrize(("given", "flag"), [({"executor": "dask"}, "--executor dask"),
                                              ({"ray_address": "head-without-port"}, "--ray-address head-without")])
def test_bad_orchestration_names_the_flag(given: dict[str, str], flag: str) -> None:
    with pytest.raises(ConfigError, match=flag):
        ExperimentConfig().with_orchestration(**given)


@pytest.mark.parametrize(("section", "value", "message"), [
    ("orchestration", {"executor": "dask"}, "orchestration.executor"),
    ("orchestration", {"cpus_per_task": 0}, "orchestration.cpus_per_task"),
    ("orchestration", {"ray_adress": "x:1"}, "orchestration.ray_adress"),
    ("train", {"gpus_per_task": -1}, "train.gpus_per_task"),
])
def test_bad_orchestration_in_yaml_is_one_config_error(section: str, value: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config({section: value})


def test_gpus_per_task_leaves_the_training_identity_alone() -> None:
    """A GPU count is where a model trains, not what it is: the same key, so no retraining and the same cache."""
    cfg = ExperimentConfig()
    gpu = validate_config({"train": {"gpus_per_task": 1}})
    model_cfg = cfg.models.model_config_for("vae")
    assert training_key("vae", model_cfg, cfg.train, 0, "d") == training_key("vae", model_cfg, gpu.train, 0, "d")


def test_cli_options_reach_the_config() -> None:
    from ae_repr.cli import _load_cfg

    args = build_parser().parse_args(["run", "--executor", "ray", "--ray-address", "127.0.0.1:6379"])
    cfg = _load_cfg(args).with_orchestration(executor=args.executor, ray_address=args.ray_address)
    assert (cfg.orchestration.executor, cfg.orchestration.ray_address) == ("ray", "127.0.0.1:6379")


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    return code, capsys.readouterr().err.strip().splitlines()


def test_unknown_executor_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_cli(["run", "--executor", "dask", "--no-tracking", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1 and "--executor: invalid choice: 'dask'" in err[0], err
    assert not (tmp_path / "o").exists()


def test_bad_ray_address_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run_cli(["run", "--executor", "ray", "--ray-address", "nohost", "--no-tracking",
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and err == ["ae-repr: error: --ray-address nohost: 'nohost' is not HOST:PORT, "
                                 "ray://HOST:PORT or auto"]
    assert not (tmp_path / "o").exists()


def test_ray_with_a_local_mlflow_store_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """An SQLite file is on one machine: Ray tasks elsewhere could not log to it. Refused before anything starts."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    code, err = _run_cli(["run", "--executor", "ray", "--ray-address", "127.0.0.1:1", "--out",
                          str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1, err
    assert "needs an MLflow tracking server" in err[0] and "sqlite:///" in err[0] and "--no-tracking" in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


def test_unreachable_ray_address_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    code, err = _run_cli(["run", "--executor", "ray", "--ray-address", address, "--no-tracking",
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"ae-repr: error: Ray cluster at {address} is unreachable")
    assert time.monotonic() - started < 15
    assert not (tmp_path / "o").exists()


def test_ray_address_env_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.executor import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert ray_address(ExperimentConfig()) == "10.1.2.3:6379"
    assert ray_address(ExperimentConfig().with_orchestration(ray_address="10.9.9.9:1")) == "10.9.9.9:1"  # config wins


def test_malformed_ray_address_env_is_one_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.executor import ray_address

    monkeypatch.setenv("RAY_ADDRESS", "{{ $RAY_ADDRESS }}")  # a deployment's placeholder, unset when deployed
    with pytest.raises(ConfigError, match=r"RAY_ADDRESS='\{\{ \$RAY_ADDRESS \}\}': not HOST:PORT"):
        ray_address(ExperimentConfig())


@pytest.mark.background  # one subprocess: runs from the session's start
def test_threads_path_imports_no_ray(tmp_path: Path) -> None:
    """The default executor runs without Ray: the flow's module, the CLI and the threads context import none of it,
    and torch threads per task follow orchestration.cpus_per_task when it is set."""
    code = f"""
import sys, torch
from pathlib import Path
import ae_repr.cli, flows.pretrain_and_probe
from ae_repr.config import validate_config
from flows.executor import running_on
cfg = validate_config({{"orchestration": {{"cpus_per_task": 3}}}})
with running_on(cfg, Path({str(tmp_path)!r}), threads=1) as ex:
    assert ex.name == "threads" and torch.get_num_threads() == 3, torch.get_num_threads()
with running_on(validate_config({{}}), Path({str(tmp_path)!r}), threads=1):
    assert torch.get_num_threads() == 1
bad = sorted(m for m in sys.modules if m == "ray" or m.startswith(("ray.", "prefect_ray")))
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**background.environ(), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_clock_travels_as_the_receiving_process_clock_and_merges_phases(tmp_path: Path) -> None:
    import flows.pretrain_and_probe as fp
    from flows.executor import PHASES, Ray

    assert pickle.loads(pickle.dumps(fp.CLOCK)) is fp.CLOCK  # a task's code shipped to a worker names its clock
    clock = fp._Clock()
    with clock.phase("training"):
        time.sleep(0.01)
    own = clock.export()["training"]
    (tmp_path / PHASES).mkdir()
    (tmp_path / PHASES / "a.json").write_text(json.dumps({"training": [2.0, own[1] - 5, own[2] + 5],
                                                          "evaluation": [1.5, 10.0, 12.0]}))
    (tmp_path / PHASES / "b.json").write_text(json.dumps({"evaluation": [0.5, 11.0, 13.0]}))
    Ray().collect(clock, tmp_path)
    phases = clock.summary()["phases"]
    assert phases["training"]["busy_s"] == pytest.approx(own[0] + 2.0, abs=1e-3)
    assert phases["training"]["wall_s"] == pytest.approx(own[2] - own[1] + 10, abs=1e-3)
    assert phases["evaluation"] == {"busy_s": 2.0, "wall_s": 3.0}
    assert not (tmp_path / PHASES).exists()  # read once, then gone


def test_run_log_pickles_small_and_logs_from_its_own_process(tmp_path: Path) -> None:
    """What a Ray task gets: the URI and run id only; it logs every epoch once, tags, and reports what arrived."""
    from mlflow import MlflowClient

    from flows.executor import WORKER_TAG, task_logging, worker_id
    from flows.tracking.remote import RunLog, logged_epochs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("x")).info.run_id
    sent = pickle.dumps(RunLog(uri, run_id, retries=1, backoff_s=0.1))
    assert len(sent) < 500
    log = pickle.loads(sent)
    history = [{"epoch": e, "train/loss": 10.0 / e, "val/loss": 11.0 / e} for e in (1, 2, 3)]
    with task_logging(log):
        for rec in history:
            log({k: v for k, v in rec.items() if k != "epoch"}, rec["epoch"])
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert client.get_metric_history(run_id, "system/max_rss_mb")[0].value > 0
    assert client.get_run(run_id).data.tags[WORKER_TAG] == worker_id()
    assert logged_epochs(client, run_id, history) == 3
    assert logged_epochs(client, run_id, []) == 0


def test_flow_ray_parameters_are_documented() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pretrain_and_probe import pretrain_and_probe

    props = parameter_schema(pretrain_and_probe.fn).properties
    assert "ray" in props["executor"]["description"] and "threads" in props["executor"]["description"]
    assert "HOST:PORT" in props["ray_address"]["description"]


def test_prefect_yaml_has_a_ray_deployment() -> None:
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    ray = deployments["ray"]
    assert ray["entrypoint"] == deployments["local"]["entrypoint"]
    assert ray["parameters"]["executor"] == "ray"
    assert "RAY_ADDRESS" in ray["work_pool"]["job_variables"]["env"]


def test_default_config_file_stays_on_threads() -> None:
    assert load_config().orchestration.executor == "threads"


def test_a_task_granted_no_gpu_sees_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs: the executor hides them for its duration."""
    import os

    from flows.executor import _no_gpu_unless

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with _no_gpu_unless(False):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    with _no_gpu_unless(True):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with _no_gpu_unless(False):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert "CUDA_VISIBLE_DEVICES" not in os.environ
