"""The CLI's conveniences: --applications, fast rejection of bad input before the temporary Prefect API boots."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from ae_repr.cli import build_parser, main


def _cfg_of(argv: list[str]):
    from ae_repr.cli import _load_cfg, with_applications

    args = build_parser().parse_args(argv)
    return with_applications(_load_cfg(args), args.applications)


def test_applications_override_the_config() -> None:
    assert _cfg_of(["run", "--applications", "generation,anomaly"]).eval.applications == ("generation", "anomaly")
    assert _cfg_of(["run", "--applications", "none"]).eval.applications == ()
    assert len(_cfg_of(["run"]).eval.applications) == 6  # without the flag the config's list stays


def test_evaluate_passes_the_applications_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import evaluation

    seen = {}
    monkeypatch.setattr(evaluation, "evaluate_dir", lambda f, out, cfg, seed: seen.setdefault("apps", cfg.applications))
    (tmp_path / "features").mkdir()
    argv = ["evaluate", "--features", str(tmp_path / "features"), "--out", str(tmp_path / "o"),
            "--applications", "rate_distortion"]
    assert main(argv) == 0
    assert seen["apps"] == ("rate_distortion",)


@pytest.mark.parametrize("value", ["anomaly,bogus", "none,anomaly", ","])
@pytest.mark.parametrize("command", ["run", "evaluate"])
def test_bad_applications_are_one_line_and_exit_2(command: str, value: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    extra = ["--features", str(tmp_path)] if command == "evaluate" else ["--no-tracking"]
    with pytest.raises(SystemExit) as exc:
        main([command, *extra, "--out", str(out), "--applications", value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--applications" in err[0]
    assert "not an application task" in err[0] or "stands alone" in err[0]
    assert not out.exists()


def test_unknown_dataset_is_rejected_before_the_api_boots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    import flows.early_api

    entered = []

    @contextmanager
    def booting():
        entered.append(True)
        yield lambda: None

    monkeypatch.setattr(flows.early_api, "api_booting", booting)
    assert main(["run", "--dataset", "nosuchthing", "--no-tracking", "--out", str(tmp_path / "o")]) == 2
    assert "nosuchthing" in capsys.readouterr().err
    assert entered == []
    assert not (tmp_path / "o").exists()


def _never_answers(port: int) -> list[str]:
    """A temporary API that never answers: a process that sleeps for a minute."""
    return [sys.executable, "-c", "import time; time.sleep(60)"]


def test_a_data_error_stops_the_booting_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import flows.early_api

    stopped = []

    def stop(proc: subprocess.Popen) -> None:
        stopped.append(proc)
        real_stop(proc)

    real_stop = flows.early_api.stop
    monkeypatch.setattr(flows.early_api, "server_command", _never_answers)
    monkeypatch.setattr(flows.early_api, "stop", stop)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")  # found out only by loading it: the boot is already under way
    assert main(["run", "--dataset", str(bad), "--no-tracking", "--out", str(tmp_path / "o")]) == 2
    assert "not numeric" in capsys.readouterr().err
    assert len(stopped) == 1 and stopped[0].returncode == -signal.SIGTERM  # stopped while booting, not waited for


_PARENT = """
import time
from flows.early_api import api_booting

with api_booting():
    print("booting", flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_api_server_dies_with_its_run(tmp_path: Path) -> None:
    """SIGKILL on the run (nothing of it runs after) still stops its temporary server, booting or not: the kernel
    sends it SIGTERM."""
    env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_ENABLED": "true"}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout.readline().strip() == "booting"
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children").read_text().split()
        assert len(children) == 1, children
        server = int(children[0])
        assert _alive(server)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 20
    while _alive(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _alive(server):
        os.kill(server, signal.SIGKILL)
        pytest.fail("the server outlived its run")


def test_flow_parameters_carry_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pretrain_and_probe import pretrain_and_probe

    props = parameter_schema(pretrain_and_probe.fn).properties
    assert set(props) == {"config", "dataset", "variants", "epochs", "latent_dim", "out", "seeds", "executor",
                          "ray_address"}
    assert all(p.get("description") for p in props.values()), props
    assert "latent_dim" in props["latent_dim"]["description"]
