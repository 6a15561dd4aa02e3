"""Security: model and checkpoint files load as tensors only (a pickled object is refused, never run),
user data is never unpickled, and environment variables never become config params."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import Trained, assert_one_line_error, run_cli, write_config

from ae_repr.checkpoint import load_model
from ae_repr.config import ExperimentConfig, load_config
from ae_repr.data import load_dataset
from ae_repr.errors import DataError, UserError
from ae_repr.io import read_json, sha256_file, write_json
from ae_repr.train import train_variant


class Payload:
    """Unpickling this creates `marker` (a harmless stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant_pickle(model_dir: Path, marker: Path) -> Path:
    """Replace model.pt with a torch file holding a live pickle payload, and record its checksum."""
    weights = model_dir / "model.pt"
    state = torch.load(weights, weights_only=True)
    state["evil"] = Payload(marker)
    torch.save(state, weights)
    desc = read_json(model_dir / "config.json")
    desc["weights_sha256"] = sha256_file(weights)  # the attacker also fixes the checksum
    write_json(model_dir / "config.json", desc)
    return weights


def test_payload_is_live(tmp_path: Path, trained: Trained) -> None:
    """Control: the crafted file does run code when loaded without weights_only (so the tests below can fail)."""
    model = trained.copy(tmp_path / "model")
    marker = tmp_path / "pwned"
    weights = plant_pickle(model, marker)
    torch.load(weights, weights_only=False)
    assert marker.exists()


def test_model_with_pickled_object_is_refused_without_running_it(tmp_path: Path, trained: Trained) -> None:
    model = trained.copy(tmp_path / "model")
    marker = tmp_path / "pwned"
    plant_pickle(model, marker)
    with pytest.raises(UserError, match="model.pt"):
        load_model(model)
    assert not marker.exists(), "loading a model executed a pickled object"


def test_extract_refuses_a_pickled_model_in_one_line(tmp_path: Path, trained: Trained) -> None:
    model = trained.copy(tmp_path / "model")
    marker = tmp_path / "pwned"
    plant_pickle(model, marker)
    out = tmp_path / "out"
    res = run_cli("extract", "--model", model, "--dataset", "digits", "--out", out)
    assert_one_line_error(res, 2, str(model / "model.pt"))
    assert not marker.exists(), "extract executed a pickled object"
    assert not out.exists()


def test_pickled_checkpoint_is_not_resumed_from_and_not_run(tmp_path: Path, trained: Trained) -> None:
    """A checkpoint.pt carrying a pickle payload is ignored (training starts over), never executed."""
    cfg = load_config(trained.config).with_overrides(variants=["ae"], epochs=1)
    mdir = tmp_path / "models" / "ae"
    mdir.mkdir(parents=True)
    marker = tmp_path / "pwned"
    torch.save({"training_key": "x", "meta": Payload(marker)}, mdir / "checkpoint.pt")
    res = train_variant("ae", load_dataset("digits"), cfg, mdir, progress=False)
    assert res.resumed_from is None and len(res.history) == 1
    assert not marker.exists(), "resuming executed a pickled object"


def test_npy_with_pickled_objects_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = tmp_path / "objects.npy"
    np.save(data, np.array([Payload(marker), Payload(marker)], dtype=object), allow_pickle=True)
    np.load(data, allow_pickle=True)  # control: the payload is live
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_dataset(str(data))
    assert not marker.exists(), "loading user data executed a pickled object"


def test_npz_with_pickled_objects_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = tmp_path / "objects.npz"
    np.savez(data, x=np.ones((20, 3)), y=np.array([Payload(marker)] * 20, dtype=object))
    with pytest.raises(DataError):
        load_dataset(str(data))
    assert not marker.exists(), "loading user data executed a pickled object"


def test_pickle_file_is_not_a_data_format(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    data = tmp_path / "data.pkl"
    data.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DataError):
        load_dataset(str(data))
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- environment


SECRET = "s3cr3t-Value-0f-an-env-var"


def test_flat_config_never_holds_environment_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AE_REPR_TEST_API_TOKEN", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "HOME_DIR_SECRET"):
        monkeypatch.setenv(name, SECRET)
    # a config that mentions the variables by name: they must stay names, never be expanded
    cfg_path = write_config(tmp_path / "env.yaml", {"tracking": {"experiment": "${AE_REPR_TEST_API_TOKEN}"},
                                                     "data": {"dataset": "$AWS_SECRET_ACCESS_KEY.csv"}})
    for cfg in (ExperimentConfig(), load_config(cfg_path), load_config(None)):
        flat = cfg.flat()
        assert flat, "flat() is empty"
        leaked = {k: v for k, v in flat.items() if SECRET in v or SECRET in k}
        assert not leaked, f"environment values in params: {leaked}"
        env_values = {v for k, v in os.environ.items() if len(v) >= 8 and k not in ("PWD", "OLDPWD")}
        assert not env_values & set(flat.values()), "an environment variable's value became a param"
    assert load_config(cfg_path).flat()["tracking.experiment"] == "${AE_REPR_TEST_API_TOKEN}"


def test_variant_params_and_tags_redact_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow params/tags built from a config whose values happen to contain a secret are redacted."""
    from flows.tracking import record as rec

    monkeypatch.setenv("AE_REPR_TEST_API_TOKEN", SECRET)
    cfg = load_config(write_config(tmp_path / "c.yaml", {"data": {"dataset": f"/data/{SECRET}/x.csv"}}))
    params = rec.variant_params(cfg, "ae")
    tags = rec.parent_tags(cfg, {"dataset": f"https://user:pw@host/{SECRET}.csv"}, tmp_path, {}, "unknown")
    for d in (params, tags):
        assert not [v for v in d.values() if SECRET in v or "user:pw@" in v], d
