"""The flow's stages work on the data the run started with: a data file rewritten mid-run fails the next stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ae_repr.config import validate_config
from ae_repr.errors import DataChanged
from ae_repr.io import read_json
from flows.pretrain_and_probe import PINNED_DATA, data_for, extract_task, prepare_data, train_task


def _table(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(60, 6)).astype(np.float32), y=np.arange(60) % 2)
    return path


def test_a_stage_after_a_rewrite_fails_naming_both_digests(tmp_path: Path) -> None:
    data = _table(tmp_path / "data.npz", seed=0)
    cfg = validate_config({"data": {"dataset": str(data)}, "models": {"variants": ["ae"], "latent_dim": 4},
                           "tracking": {"enabled": False}})
    out = tmp_path / "run"
    out.mkdir()
    info = prepare_data.fn(cfg, str(out))  # the task's body, without the Prefect engine
    assert read_json(out / PINNED_DATA)["sha256"] == info["sha256"]
    assert data_for(cfg, out).sha256 == info["sha256"]

    _table(data, seed=1)  # rewritten mid-run: other values, same shape
    now = data_for(cfg).sha256  # outside a run the new content simply loads
    assert now != info["sha256"]
    expected = f"{data} changed during the run (sha256 {info['sha256'][:12]} at start, {now[:12]} now)"
    for stage in (lambda: train_task.fn("ae", cfg, str(out)),
                  lambda: extract_task.fn("ae", cfg, str(out), str(out / "models" / "ae"))):
        with pytest.raises(DataChanged) as e:
            stage()
        assert str(e.value).startswith(expected), str(e.value)
    assert not (out / "models").exists() and not (out / "features").exists()

    data.write_bytes(data.read_bytes()[:100])  # then cut short by the writer: unreadable, still a change
    with pytest.raises(DataChanged, match=r"changed during the run \(sha256 \w{12} at start, unreadable: "):
        data_for(cfg, out)
