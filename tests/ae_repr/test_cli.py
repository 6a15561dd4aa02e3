"""The CLI's conveniences: --applications, fast rejection of bad input before the temporary Prefect API boots."""

from __future__ import annotations

import threading
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


class _SlowServer:
    """A temporary API that never answers: its start returns only when stopped (or after 15 s)."""

    def __init__(self) -> None:
        self.stopped = threading.Event()

    def start(self, timeout: int | None = None) -> None:
        self.stopped.wait(15)

    def stop(self) -> None:
        self.stopped.set()


def test_a_data_error_cancels_the_api_boot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import prefect.server.api.server

    server = _SlowServer()
    monkeypatch.setattr(prefect.server.api.server, "SubprocessASGIServer", lambda: server)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")  # found out only by loading it: the boot is already under way
    assert main(["run", "--dataset", str(bad), "--no-tracking", "--out", str(tmp_path / "o")]) == 2
    assert "not numeric" in capsys.readouterr().err
    assert server.stopped.is_set()  # cancelled, not waited for


def test_flow_parameters_carry_descriptions() -> None:
    from prefect.utilities.callables import parameter_schema

    from flows.pretrain_and_probe import pretrain_and_probe

    props = parameter_schema(pretrain_and_probe.fn).properties
    assert set(props) == {"config", "dataset", "variants", "epochs", "latent_dim", "out", "seeds", "executor",
                          "ray_address"}
    assert all(p.get("description") for p in props.values()), props
    assert "latent_dim" in props["latent_dim"]["description"]
