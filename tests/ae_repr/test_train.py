"""The trainer's determinism: a variant's weights depend on its config, data and seed alone, also when
other variants train in other threads at the same time (as in one flow run)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from ae_repr.checkpoint import load_model
from ae_repr.config import ExperimentConfig
from ae_repr.data.dataset import make_dataset
from ae_repr.io import read_json
from ae_repr.train import train_variant

VARIANTS = ("vae", "vq_vae", "hier_vae")  # the ones that draw random numbers while training


def _data():
    rng = np.random.default_rng(0)
    x = rng.random((300, 12)).astype(np.float32)
    split = np.where(np.arange(300) % 4 == 0, "test", "train")
    return make_dataset("synthetic", x, split)


def _cfg() -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {"models": {"variants": list(VARIANTS), "latent_dim": 4, "overrides": {v: {"hidden": [16]} for v in VARIANTS}},
         "train": {"epochs": 3, "batch_size": 32, "device": "cpu"}}
    )


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_model(model_dir).model.state_dict()


def test_variants_trained_side_by_side_match_variants_trained_alone(tmp_path: Path) -> None:
    data, cfg = _data(), _cfg()
    for v in VARIANTS:
        train_variant(v, data, cfg, tmp_path / "alone" / v, progress=False)
    torch.manual_seed(123)  # the global generator's state must not matter either
    errors: list[BaseException] = []

    def train(v: str) -> None:
        try:
            train_variant(v, data, cfg, tmp_path / "together" / v, progress=False)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=train, args=(v,)) for v in VARIANTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for v in VARIANTS:
        alone, together = _weights(tmp_path / "alone" / v), _weights(tmp_path / "together" / v)
        assert alone.keys() == together.keys()
        for k in alone:
            assert torch.equal(alone[k], together[k]), f"{v}: {k} differs between a lone and a side-by-side run"


def test_checkpoints_are_written_at_most_every_checkpoint_every_s(tmp_path: Path) -> None:
    """0 s: resumable state after every epoch; a long interval: none during a short training. Either way the
    trained model is the same (same training key: the setting is operational) and the checkpoint is gone."""
    data = _data()
    seen: dict[float, list[bool]] = {}
    for every in (0.0, 1e9):
        cfg = _cfg()
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_every_s": every})})
        mdir = tmp_path / f"every_{every:g}"
        seen[every] = []
        res = train_variant("vae", data, cfg, mdir,
                            log_fn=lambda rec, epoch, d=mdir, s=seen[every]: s.append((d / "checkpoint.pt").is_file()))
        assert not (mdir / "checkpoint.pt").exists() and len(res.history) == 3
    assert seen == {0.0: [True, True, True], 1e9: [False, False, False]}
    a, b = _weights(tmp_path / "every_0"), _weights(tmp_path / "every_1e+09")
    assert all(torch.equal(a[k], b[k]) for k in a)
    desc = [read_json(tmp_path / d / "config.json")["training_key"] for d in ("every_0", "every_1e+09")]
    assert desc[0] == desc[1]


def _train_cfg(**train: object) -> ExperimentConfig:
    base = {"epochs": 40, "batch_size": 32, "device": "cpu", "checkpoint_every_s": 1e9}
    return ExperimentConfig.model_validate(
        {"models": {"variants": ["vae"], "latent_dim": 4, "overrides": {"vae": {"hidden": [16]}}},
         "train": {**base, **train}}
    )


def test_validation_scores_the_unweighted_objective_and_keeps_its_best_epoch(tmp_path: Path) -> None:
    """With KL warm-up and free bits the training loss is reweighted epoch by epoch; the validation objective
    (what stopping and the kept weights go by) is the plain negative ELBO at every epoch."""
    cfg = _train_cfg(epochs=12, kl_warmup_epochs=30, free_bits=0.5, patience=100)
    res = train_variant("vae", _data(), cfg, tmp_path / "vae", progress=False)
    for h in res.history:
        assert h["val/loss"] == pytest.approx(-h["val/elbo"], rel=1e-5)  # beta 1: loss = recon + KL, no weights
        assert h["val/loss"] == pytest.approx(h["val/recon"] + h["val/kl"], rel=1e-5)
    meta = read_json(tmp_path / "vae" / "config.json")
    best = min(res.history, key=lambda h: -h["val/elbo"])
    assert meta["best_epoch"] == best["epoch"] and meta["best_val"]["elbo"] == pytest.approx(best["val/elbo"])
    assert meta["steps"] == res.history[-1]["step"] == 12 * 7  # 225 train rows less 10% validation: 7 batches


def test_training_stops_on_budget_plateau_or_epoch_cap(tmp_path: Path) -> None:
    data = _data()
    runs = {
        "budget": _train_cfg(max_steps=17, patience=100),  # ends mid-epoch, exactly at the budget
        "plateau": _train_cfg(lr=1e-9, patience=3, min_delta=1.0),  # nothing can improve by 1 nat
        "epochs": _train_cfg(epochs=2, patience=100),
    }
    for reason, cfg in runs.items():
        train_variant("vae", data, cfg, tmp_path / reason, progress=False)
        meta = read_json(tmp_path / reason / "config.json")
        assert meta["stopped_on"] == reason
        assert meta["steps"] == {"budget": 17, "plateau": 4 * 7, "epochs": 2 * 7}[reason]


def test_plateau_cuts_the_learning_rate_before_it_stops(tmp_path: Path) -> None:
    cfg = _train_cfg(lr=1e-6, patience=6, min_delta=1.0, lr_decay=0.5)
    res = train_variant("vae", _data(), cfg, tmp_path / "vae", progress=False)
    lrs = [h["lr"] for h in res.history]
    assert len(lrs) == 7 and lrs[:4] == [1e-6] * 4 and lrs[4:] == [5e-7] * 3  # cut once, at half the patience
