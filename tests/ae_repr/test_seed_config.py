"""`train.seeds` and `ae-repr run --seeds`: accepted values, and bad ones as one line naming the option, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from ae_repr.cli import main
from ae_repr.config import ExperimentConfig, validate_config
from ae_repr.errors import ConfigError
from ae_repr.train import training_key


def test_seeds_from_the_cli_string_a_list_or_yaml():
    cfg = ExperimentConfig()
    assert cfg.train.seeds is None
    assert cfg.with_seeds("0,1,2").train.seeds == (0, 1, 2)
    assert cfg.with_seeds(" 2, 0 ").train.seeds == (0, 2)
    assert cfg.with_seeds([3]).train.seeds == (3,)
    assert cfg.with_seeds(None) is cfg
    assert validate_config({"train": {"seeds": [1, 0]}}).train.seeds == (0, 1)


@pytest.mark.parametrize(("value", "why"), [("", "non-empty"), ("0,,1", "not an integer"), ("0,-1", "negative"),
                                            ("1,0,1", "given twice"), ("0,a", "not an integer"),
                                            ("1.5", "not an integer"), ([True], "not an integer"),
                                            ([1.0], "not an integer")])
def test_bad_seeds_name_the_option(value, why):
    with pytest.raises(ConfigError, match=f"^--seeds .*{why}"):
        ExperimentConfig().with_seeds(value)


@pytest.mark.parametrize(("seeds", "why"), [([], "non-empty"), ([0, 0], "given twice"), ([-2], "negative"),
                                            ("a", "not an integer"), ([0.5], "not an integer")])
def test_bad_seeds_in_a_config_name_the_key(seeds, why):
    with pytest.raises(ConfigError, match=f"^config: train.seeds: .*{why}"):
        validate_config({"train": {"seeds": seeds}})


@pytest.mark.parametrize("value", ["", "0,0", "-1", "x,1"])
def test_bad_seeds_on_the_command_line_exit_2_in_one_line(value: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert main(["run", "--no-tracking", "--out", str(out), "--seeds", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ae-repr: error: --seeds "), err
    assert not out.exists()


def test_the_seed_list_does_not_enter_a_models_training_key():
    cfg = ExperimentConfig()
    model = cfg.models.model_config_for("ae")
    grid = cfg.with_seeds("0,1")
    assert training_key("ae", model, grid.train, 0, "d") == training_key("ae", model, cfg.train, 0, "d")
    assert training_key("ae", model, cfg.train, 1, "d") != training_key("ae", model, cfg.train, 0, "d")
