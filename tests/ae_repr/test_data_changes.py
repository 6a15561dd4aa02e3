"""A data file that changes while it is read, or during a run: never two versions of the data in one run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ae_repr.cli import main
from ae_repr.data import load_dataset, tabular
from ae_repr.errors import DataError


def _table(path: Path, seed: int = 0) -> Path:
    """A small labelled table (.npz), different content per seed, same shape."""
    rng = np.random.default_rng(seed)
    np.savez(path, x=rng.normal(size=(60, 6)).astype(np.float32), y=np.arange(60) % 2)
    return path


@pytest.mark.parametrize("how", ["appended", "truncated"])
def test_a_file_that_changes_while_it_is_read_is_refused(tmp_path: Path, monkeypatch, how: str) -> None:
    path = _table(tmp_path / "data.npz")
    read = tabular._read_npz

    def read_while_written(p: Path) -> tabular.RawData:
        out = read(p)  # a whole, valid read; then the writer moves on
        with open(p, "r+b") as f:
            if how == "appended":
                f.seek(0, 2)
                f.write(b"\0" * 100)
            else:
                f.truncate(p.stat().st_size // 2)
        return out

    monkeypatch.setattr(tabular, "_read_npz", read_while_written)
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    msg = str(e.value)
    assert msg.startswith(f"{path}: changed while it was being read") and "re-run when it is complete" in msg
    assert "\n" not in msg


def test_an_unchanged_file_loads(tmp_path: Path) -> None:
    assert len(load_dataset(str(_table(tmp_path / "data.npz")))) == 60


def _err(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def test_commands_of_one_run_refuse_data_rewritten_between_them(tmp_path: Path, capsys) -> None:
    """`train` and `extract` on one version, then the file is rewritten: `extract` and `evaluate` exit 1 in one
    line naming the file and both digests, and write nothing."""
    data = _table(tmp_path / "data.npz", seed=0)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("models: {latent_dim: 4, overrides: {ae: {hidden: [8]}}}\ntrain: {epochs: 1}\n"
                   "eval: {baselines: [raw], applications: [], fewshot_finetune: false, map_method: none}\n"
                   "tracking: {enabled: false}\n")
    run = tmp_path / "run"
    assert main(["train", "--variant", "ae", "--config", str(cfg), "--dataset", str(data), "--out", str(run)]) == 0
    assert main(["extract", "--model", str(run / "models" / "ae"), "--out", str(run)]) == 0
    before = load_dataset(str(data)).sha256
    _table(data, seed=1)  # rewritten with other values, same shape
    after = load_dataset(str(data)).sha256
    capsys.readouterr()

    assert main(["extract", "--model", str(run / "models" / "ae"), "--out", str(tmp_path / "again")]) == 1
    lines = _err(capsys)
    assert len(lines) == 1, "\n".join(lines)
    assert f"{data} changed during the run (sha256 {before[:12]} at start, {after[:12]} now)" in lines[0], lines
    assert not (tmp_path / "again").exists()

    features = sorted((run / "features").iterdir())
    assert main(["evaluate", "--features", str(run / "features"), "--out", str(tmp_path / "eval"),
                 "--config", str(cfg)]) == 1
    lines = _err(capsys)
    assert len(lines) == 1, "\n".join(lines)
    line = lines[0]
    assert f"{data} changed during the run (sha256 {before[:12]} at start, {after[:12]} now)" in line, line
    assert "re-run when it is no longer being written" in line
    assert sorted((run / "features").iterdir()) == features and not (tmp_path / "eval").exists()


def test_extracting_another_data_set_of_the_same_shape_still_works(tmp_path: Path, caplog) -> None:
    """A model applied to other data (another file) is a warning, as before: only the same data set's content is
    pinned."""
    data, other = _table(tmp_path / "data.npz", seed=0), _table(tmp_path / "other.npz", seed=1)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("models: {latent_dim: 4, overrides: {ae: {hidden: [8]}}}\ntrain: {epochs: 1}\n")
    run = tmp_path / "run"
    assert main(["train", "--variant", "ae", "--config", str(cfg), "--dataset", str(data), "--out", str(run)]) == 0
    assert main(["extract", "--model", str(run / "models" / "ae"), "--dataset", str(other), "--out", str(run)]) == 0
    assert "differs from the training data" in caplog.text
