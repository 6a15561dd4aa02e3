"""The end-to-end few-shot arms as vectorized ensembles: the same numbers as one run at a time; scratch arms shared."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_synth import D, K, Synth, learned_feature_file

import evaluation.finetune as finetune
from ae_repr.checkpoint import LoadedModel, save_model
from ae_repr.config import EvalConfig
from ae_repr.data import Normalizer
from ae_repr.io import FeatureFile, read_features
from ae_repr.models import REGISTRY, build_model, model_config
from evaluation import fewshot_scratch

IMAGE = (1, 8, 8)
CLASSES, SHOTS, MEMBERS = 3, 4, 3
# several batches per epoch (12 shots in batches of 5), so the per-member shuffle and split are exercised
CFG = EvalConfig(finetune_epochs=8, finetune_batch_size=5, finetune_lr=5e-3, fewshot_k=(SHOTS,), fewshot_seeds=MEMBERS)
SMALL = {"latent_dim": 4, "channels": (4, 8), "hidden": (16,)}
EXTRA = {"vq_vae": {"code_dim": 2, "codebook_size": 8}}


@pytest.fixture(autouse=True)
def _no_shared_scratch_results():
    """Each test computes its scratch arms itself: results stored by an earlier test would skip the spies."""
    finetune._SCRATCH_RESULTS.clear()
    yield
    finetune._SCRATCH_RESULTS.clear()


def _images(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """n 8x8 images of CLASSES noisy templates, classes in turn."""
    templates = torch.randn(CLASSES, *IMAGE, generator=torch.Generator().manual_seed(99))
    y = np.arange(n) % CLASSES
    x = templates[y] + 0.5 * torch.randn(n, *IMAGE, generator=torch.Generator().manual_seed(seed))
    return x, y


def _pretrained(variant: str) -> LoadedModel:
    """A seeded model of `variant` with data-set state (a VQ-VAE's codebook drawn from encoder outputs)."""
    model = build_model(variant, model_config(variant, **SMALL, **EXTRA.get(variant, {})), IMAGE, "gaussian", seed=1)
    model.train()
    with torch.no_grad():
        model.loss(_images(64, seed=7)[0], generator=torch.Generator().manual_seed(0))
    model.eval()
    return LoadedModel(model, Normalizer(np.zeros(1), np.ones(1), "standard"), {"variant": variant})


def _initial(variant: str, arm: str) -> tuple[list, list[tuple[torch.Tensor, np.ndarray]], list[int]]:
    """MEMBERS runs' initial models, each with its own shots and seed."""
    loaded = _pretrained(variant)
    seeds = [11 + i for i in range(MEMBERS)]
    shots = [_images(SHOTS * CLASSES, seed=i) for i in range(MEMBERS)]
    return [finetune._initial_model(loaded, arm, s, x) for s, (x, _) in zip(seeds, shots, strict=True)], shots, seeds


def _runs(variant: str, arm: str, vectorize: bool) -> list[finetune._Classifier]:
    """MEMBERS fine-tuned runs."""
    models, shots, seeds = _initial(variant, arm)
    return finetune._fine_tuned(models, shots, CLASSES, CFG, seeds, vectorize=vectorize)


def _logits(members: list[finetune._Classifier], x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack([m.eval()(x) for m in members])


@pytest.mark.parametrize("arm", ["finetune", "scratch"])
@pytest.mark.parametrize("variant", ["ae", "vae", "vq_vae", "hier_vae"])
def test_ensemble_trains_each_run_as_if_alone(variant, arm):
    """Conv encoders on 8x8 images: the vectorized ensemble's final test logits are the one-at-a-time runs'."""
    x_test = _images(90, seed=50)[0]
    got = _logits(_runs(variant, arm, vectorize=True), x_test)
    want = _logits(_runs(variant, arm, vectorize=False), x_test)
    scale = want.abs().max().item()  # float32 rounding in a different order: differences relative to the logits' size
    np.testing.assert_allclose(got.numpy() / scale, want.numpy() / scale, rtol=0, atol=1e-5)
    assert torch.equal(got.argmax(-1), want.argmax(-1))  # hence the same accuracies
    # not a vacuous match: training moved every run's encoder, and the runs differ (own shots and seeds)
    untrained, _, _ = _initial(variant, arm)
    for model, trained in zip(untrained, _runs(variant, arm, vectorize=True), strict=True):
        params = zip(model.encoder.parameters(), trained.model.encoder.parameters(), strict=True)
        assert max((a - b).abs().max() for a, b in params) > 1e-3
    assert (want[0] - want[1]).abs().max() > 1e-2


def test_a_memory_bound_splits_the_ensemble_into_groups_with_the_same_results(monkeypatch):
    """STEP_ELEMENTS lets one step hold two members' batches: the three runs train as groups of two and one,
    each run as it trains in the whole ensemble."""
    x_test = _images(90, seed=50)[0]
    whole = _logits(_runs("vae", "finetune", vectorize=True), x_test)
    groups = []
    real = finetune._fit_ensemble
    monkeypatch.setattr(finetune, "_fit_ensemble", lambda members, *a, **k: (groups.append(len(members)),
                                                                               real(members, *a, **k)))
    monkeypatch.setattr(finetune, "STEP_ELEMENTS", 2 * CFG.finetune_batch_size * int(np.prod(IMAGE)))
    split = _logits(_runs("vae", "finetune", vectorize=True), x_test)
    assert groups == [2, 1]
    scale = whole.abs().max().item()
    np.testing.assert_allclose(split.numpy() / scale, whole.numpy() / scale, rtol=0, atol=1e-5)
    assert torch.equal(split.argmax(-1), whole.argmax(-1))


class _ScalarGatedAE(REGISTRY["ae"].load()):
    """An AE whose encoder reads a data-dependent Python number, which vmap cannot trace."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return super().encode(x) * (1.0 + 0.0 * float(x.abs().max()))


def test_an_encoder_that_does_not_vectorize_trains_one_run_at_a_time(caplog):
    cfg = model_config("ae", **SMALL)
    pretrained = _ScalarGatedAE(cfg, IMAGE, "gaussian")
    loaded = LoadedModel(pretrained.eval(), Normalizer(np.zeros(1), np.ones(1), "standard"), {"variant": "ae"})
    shots = [_images(SHOTS * CLASSES, seed=i) for i in range(MEMBERS)]
    seeds = list(range(MEMBERS))

    def run(vectorize: bool) -> torch.Tensor:
        models = [finetune._initial_model(loaded, "finetune", s, x) for s, (x, _) in zip(seeds, shots, strict=True)]
        return _logits(finetune._fine_tuned(models, shots, CLASSES, CFG, seeds, vectorize=vectorize), shots[0][0])

    with caplog.at_level(logging.WARNING, logger="evaluation.finetune"):
        fallback = run(vectorize=True)
    assert "one run at a time: the encoder does not vectorize" in caplog.text
    assert torch.equal(fallback, run(vectorize=False))  # the same runs, exactly


def _saved(tmp_path: Path, synth: Synth, variant: str, **fields: object) -> FeatureFile:
    """A feature file over the synthetic rows whose model is a `variant` with the tiny shared architecture."""
    model = build_model(variant, model_config(variant, **{"latent_dim": K, "hidden": (32,), **fields}), (D,), "gaussian", seed=5)
    normalizer = Normalizer(np.zeros(D), np.ones(D), "standard")
    model_dir = save_model(tmp_path / "models" / variant, model.eval(), variant=variant, normalizer=normalizer)
    return read_features(learned_feature_file(tmp_path / "features", synth, model_dir, name=variant))


@pytest.mark.parametrize(("variant", "twin"), [("ae", "dae"), ("vae", "beta_vae")])
def test_scratch_arms_of_twin_variants_are_computed_once(tmp_path, synth, monkeypatch, variant, twin):
    """ae/dae (corruption) and vae/beta_vae (beta) have the same scratch arm: computed apart, the numbers are
    equal; within a process the twin's arm reuses them, building no model."""
    cfg = CFG.model_copy(update={"fewshot_k": (1, 3), "finetune_batch_size": 512})
    first, second = _saved(tmp_path, synth, variant), _saved(tmp_path, synth, twin)
    assert first.meta["model_dir"] != second.meta["model_dir"]
    alone = fewshot_scratch(second, cfg)
    finetune._SCRATCH_RESULTS.clear()
    reference = fewshot_scratch(first, cfg)
    assert reference["value"].tolist() == alone["value"].tolist()

    built = []
    real = finetune.build_model
    monkeypatch.setattr(finetune, "build_model", lambda *a, **kw: built.append(a) or real(*a, **kw))
    shared = fewshot_scratch(second, cfg)
    assert built == []
    assert shared["value"].tolist() == reference["value"].tolist()
    assert set(shared["representation"]) == {twin}
    # a field the scratch arm does depend on (the architecture) is not shared
    wider = _saved(tmp_path / "wider", synth, variant, hidden=(24,))
    fewshot_scratch(wider, cfg)
    assert len(built) == 2 * MEMBERS


def test_shared_results_are_computed_once_across_threads_and_retried_after_a_failure():
    from evaluation.inputs import SharedResults

    results = SharedResults()
    started, release, calls = threading.Event(), threading.Event(), []

    def slow() -> list[float]:
        calls.append("slow")
        started.set()
        release.wait(10)
        return [0.5]

    got = []
    owner = threading.Thread(target=lambda: got.append(results.get("k", slow)))
    owner.start()
    started.wait(10)
    waiter = threading.Thread(target=lambda: got.append(results.get("k", lambda: calls.append("again") or [0.0])))
    waiter.start()
    release.set()
    owner.join(10)
    waiter.join(10)
    assert got == [[0.5], [0.5]] and calls == ["slow"]

    def failing() -> list[float]:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        results.get("bad", failing)
    assert results.get("bad", lambda: [1.0]) == [1.0]  # a failure is not stored
