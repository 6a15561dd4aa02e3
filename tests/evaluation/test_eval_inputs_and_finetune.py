"""Input validation, label-free runs, failure reporting, and the end-to-end few-shot arms."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from eval_synth import K, learned_feature_file, save_tiny_ae, write_ff

import evaluation
from ae_repr.config import EvalConfig
from ae_repr.errors import UserError
from ae_repr.io import read_features
from ae_repr.likelihoods import Likelihood
from evaluation import (
    EvaluationFailed,
    evaluate_dir,
    fewshot_finetune,
    fewshot_frozen,
    fewshot_scratch,
    summarize,
)
from evaluation.results import read_results

QUICK = EvalConfig(fewshot_k=(1, 5), fewshot_seeds=3, map_method="none", trustworthiness_max_rows=100)


@pytest.fixture(autouse=True)
def _no_shared_scratch_results():
    """Each test computes its scratch arms and shot heads itself: results stored by an earlier test would skip the
    spies."""
    import evaluation.fewshot as fewshot
    import evaluation.finetune as finetune

    finetune._SCRATCH_RESULTS.clear()
    fewshot._SHOT_HEADS.clear()
    yield
    finetune._SCRATCH_RESULTS.clear()
    fewshot._SHOT_HEADS.clear()


def _z(synth, width=K, seed=0):
    return np.random.default_rng(seed).normal(size=(len(synth.y), width))


def test_missing_or_empty_features_dir(tmp_path):
    with pytest.raises(UserError, match="features folder not found"):
        evaluate_dir(tmp_path / "nope", tmp_path / "out", QUICK)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no feature files"):
        evaluate_dir(tmp_path / "empty", tmp_path / "out", QUICK)
    assert not (tmp_path / "out").exists()


def test_file_lacking_required_columns(tmp_path, synth):
    (tmp_path / "f").mkdir()
    pd.DataFrame({"sample_id": [0, 1], "z_000": [0.0, 1.0]}).to_parquet(tmp_path / "f" / "bad.parquet")
    # `label` may be absent (label tasks are skipped then); `split` may not
    with pytest.raises(UserError, match=r"bad.parquet: missing required column\(s\) split$"):
        evaluate_dir(tmp_path / "f", tmp_path / "out", QUICK)


def test_files_disagreeing_on_sample_ids_or_width(tmp_path, synth):
    f = tmp_path / "f"
    write_ff(f / "a.parquet", synth, _z(synth))
    short = write_ff(f / "b.parquet", synth, _z(synth))
    frame = read_features(short).frame.iloc[:-1]
    frame.to_parquet(short)
    with pytest.raises(UserError, match="sample_id set differs"):
        evaluate_dir(f, tmp_path / "out", QUICK)
    write_ff(f / "b.parquet", synth, _z(synth, width=K + 1))
    with pytest.raises(UserError, match=r"disagree on latent width \(a=4, b=5\)"):
        evaluate_dir(f, tmp_path / "out", QUICK)


def test_without_labels_the_label_free_parts_still_run(tmp_path, synth):
    write_ff(tmp_path / "features" / "a.parquet", synth, _z(synth), labels=None)
    cfg = QUICK.model_copy(update={"map_method": "tsne", "map_max_rows": 40})
    summary = pd.read_parquet(evaluate_dir(tmp_path / "features", tmp_path, cfg))
    assert set(summary["task"]) == {"reduction"}
    assert set(summary["representation"]) == {"a", "raw", "pca", "ica", "random_projection"}
    assert {"trustworthiness", "recon_mse"} <= set(summary["metric"])
    report = (tmp_path / "report.md").read_text()
    assert "linear_probe, knn and few-shot tasks not run: the feature file has no labels" in report
    assert "](plots/latent_maps.png)" in report and "fewshot.png" not in report
    assert (tmp_path / "plots" / "latent_maps.png").is_file()


def test_learned_file_whose_model_dir_is_gone(tmp_path, synth):
    path = write_ff(tmp_path / "features" / "ae.parquet", synth, _z(synth), model_dir="../models/ae")
    out = evaluation.evaluate_representation(path, QUICK, eval_dir=tmp_path / "eval")
    rows, notes = read_results(out)
    assert not rows["task"].isin(["fewshot_finetune", "fewshot_scratch"]).any()
    assert "recon_mse" not in set(rows["metric"]) and "trustworthiness" in set(rows["metric"])
    assert any("fewshot_finetune/fewshot_scratch not run: no model directory" in n for n in notes)


def test_runtime_failure_is_reported_and_raised(tmp_path, synth, monkeypatch):
    import evaluation.pipeline as pipeline

    write_ff(tmp_path / "features" / "a.parquet", synth, _z(synth))
    real = pipeline.reduction

    def flaky(ff, cfg, *, seed=0):
        if ff.name == "ica":
            raise RuntimeError("boom")
        return real(ff, cfg, seed=seed)

    monkeypatch.setattr(pipeline, "reduction", flaky)
    cfg = QUICK.model_copy(update={"baselines": ("pca", "ica")})
    with pytest.raises(EvaluationFailed, match="evaluation failed for ica"):
        evaluate_dir(tmp_path / "features", tmp_path, cfg)
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    assert "ica" not in set(summary["representation"]) and "pca" in set(summary["representation"])
    report = (tmp_path / "report.md").read_text()
    assert "## Failed representations" in report and "**ica**: RuntimeError: boom" in report
    # a stale result must not stand in for a representation the flow reports as failed
    summarize(tmp_path, cfg, failures={"pca": "TimeoutError: took too long"})
    assert "pca" not in set(pd.read_parquet(tmp_path / "summary.parquet")["representation"])


@pytest.fixture
def ae_file(tmp_path, synth):
    return read_features(
        learned_feature_file(tmp_path / "features", synth, save_tiny_ae(tmp_path / "models" / "ae"))
    )


def test_finetune_starts_from_the_frozen_head(ae_file):
    """With a vanishing learning rate, fine-tuning keeps its linear-probe init: it scores as the frozen arm."""
    cfg = QUICK.model_copy(update={"finetune_lr": 1e-12, "finetune_epochs": 1})
    frozen = fewshot_frozen(ae_file, cfg)
    tuned = fewshot_finetune(ae_file, cfg)
    assert list(tuned["k"]) == list(frozen["k"]) == [1, 5]
    n_test = int((ae_file.frame["split"] == "test").sum())
    np.testing.assert_allclose(tuned["value"], frozen["value"], atol=1.5 / n_test)


def test_finetune_arm_takes_the_frozen_arms_heads_where_its_encodings_are_the_features(ae_file, monkeypatch):
    """After the frozen arm, the fine-tune arm fits a head only for episodes whose shot encodings differ from the
    stored features in some bit; its accuracies are those it gets fitting every head itself."""
    import torch

    import evaluation.fewshot as fewshot
    from ae_repr.checkpoint import load_model
    from evaluation.inputs import model_dir, raw_inputs

    cfg = QUICK.model_copy(update={"finetune_epochs": 3})
    alone = fewshot_finetune(ae_file, cfg)  # every head fitted by the arm itself
    fewshot._SHOT_HEADS.clear()
    loaded = load_model(model_dir(ae_file))
    x = loaded.normalizer.torch(torch.from_numpy(raw_inputs(ae_file).x))
    differing = 0
    for k in (1, 5):
        for shots in fewshot.fewshot_episodes(ae_file, k, cfg.fewshot_seeds):
            with torch.inference_mode():
                differing += not np.array_equal(loaded.model.encode(x[shots]).numpy(), ae_file.z[shots])
    fewshot_frozen(ae_file, cfg)
    fits = []
    real_fit = fewshot.fit_frozen_head
    monkeypatch.setattr(fewshot, "fit_frozen_head", lambda *a, **kw: fits.append(1) or real_fit(*a, **kw))
    after_frozen = fewshot_finetune(ae_file, cfg)
    assert len(fits) == differing < 2 * cfg.fewshot_seeds  # some heads were the frozen arm's
    pd.testing.assert_frame_equal(after_frozen, alone)


def test_finetune_and_scratch_rows(ae_file):
    cfg = QUICK.model_copy(
        update={"fewshot_k": (2,), "finetune_epochs": 6, "finetune_lr": 1e-2}
    )
    for fn, task in ((fewshot_finetune, "fewshot_finetune"), (fewshot_scratch, "fewshot_scratch")):
        rows = fn(ae_file, cfg)
        assert set(rows["task"]) == {task} and list(rows["k"]) == [2]
        assert (rows["n_seeds"] == 3).all()
        assert ((rows["value"] >= 0) & (rows["value"] <= 1)).all()
        assert ((rows["ci_low"] <= rows["value"]) & (rows["value"] <= rows["ci_high"])).all()
        if task == "fewshot_finetune":
            pd.testing.assert_frame_equal(rows, fn(ae_file, cfg))  # seeded: the same numbers twice


def test_scratch_builds_a_fresh_model_of_the_same_variant_and_config(ae_file, monkeypatch):
    import evaluation.finetune as finetune

    built = []

    def spy(variant, cfg, input_shape, likelihood, *, seed=None):
        built.append((variant, cfg, input_shape, likelihood))
        assert seed is not None  # scratch models are seeded per run
        return real(variant, cfg, input_shape, likelihood, seed=seed)

    real = finetune.build_model
    monkeypatch.setattr(finetune, "build_model", spy)
    fewshot_scratch(ae_file, QUICK.model_copy(update={"finetune_epochs": 2}))
    assert len(built) == 2 * 3  # one fresh model per k and seed
    variant, cfg, shape, likelihood = built[0]
    assert (variant, cfg.latent_dim, cfg.hidden, shape, likelihood) == ("ae", K, (32,), (16,), Likelihood("gaussian"))
    built.clear()
    fewshot_finetune(ae_file, QUICK.model_copy(update={"finetune_epochs": 2}))
    assert built == []  # fine-tuning starts from the pretrained weights


@pytest.mark.parametrize("arm", ["finetune", "scratch"])
def test_end_to_end_arms_see_only_the_k_shots_labels_for_a_fixed_schedule(ae_file, monkeypatch, arm):
    """No labelled train row beyond the k shots per class is read (k = 1 included); every epoch runs."""
    import torch

    import evaluation.finetune as finetune
    from evaluation.fewshot import fewshot_episodes

    class RowSpy:
        """The raw samples, recording which rows the arm reads."""

        def __init__(self, x: np.ndarray) -> None:
            self.x, self.read = x, []

        def __getitem__(self, rows: np.ndarray) -> np.ndarray:
            self.read.append(np.asarray(rows))
            return self.x[rows]

    real_raw = finetune.raw_inputs
    spy = RowSpy(real_raw(ae_file).x)
    monkeypatch.setattr(finetune, "raw_inputs", lambda ff: type("Raw", (), {"x": spy})())
    batch_sizes = []
    real_ce = torch.nn.functional.cross_entropy

    def counting_ce(logits, target, *args, **kwargs):
        batch_sizes.append(len(target))  # one run's batch: the episodes of a k train as one vectorized ensemble
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", counting_ce)
    cfg = QUICK.model_copy(update={"fewshot_k": (1, 5), "fewshot_seeds": 3, "finetune_epochs": 12, "finetune_lr": 0.05})
    getattr(finetune, f"fewshot_{arm}")(ae_file, cfg)

    split = ae_file.frame["split"].to_numpy()
    test = np.flatnonzero(split == "test")
    episodes = {k: fewshot_episodes(ae_file, k, 3, seed=0) for k in (1, 5)}
    allowed = [test] + [shots for eps in episodes.values() for shots in eps]
    for rows in spy.read:  # each read is the test split or one episode's shots, never anything else
        assert any(np.array_equal(np.sort(rows), np.sort(a)) for a in allowed), f"read rows outside the shots: {rows}"
    n_classes = len(np.unique(ae_file.frame["label"]))
    # a fixed schedule: finetune_epochs full-batch steps on the k*C shots (the 3 episodes together), at every k
    assert batch_sizes == [n_classes] * 12 + [5 * n_classes] * 12


def test_vq_vae_scratch_arm_starts_from_a_codebook_drawn_from_the_shots(tmp_path, synth, monkeypatch):
    """The scratch arm's codebook holds encoder outputs of the shots, not the tiny uniform init; fine-tuning's is the pretrained one."""
    import torch

    import evaluation.finetune as finetune
    from ae_repr.checkpoint import load_model, save_model
    from ae_repr.data import Normalizer
    from ae_repr.models import build_model, model_config

    vq_cfg = model_config("vq_vae", latent_dim=K, hidden=(32,), code_dim=2, codebook_size=16)
    pretrained = build_model("vq_vae", vq_cfg, (synth.x.shape[1],), "gaussian", seed=3)
    with torch.no_grad():  # a pretrained-looking codebook, unlike both the uniform init and encoder outputs
        pretrained.codebook.copy_(torch.linspace(-5, 5, 32).reshape(16, 2))
    model_dir = save_model(
        tmp_path / "models" / "vq_vae",
        pretrained.eval(),
        variant="vq_vae",
        normalizer=Normalizer(np.zeros(synth.x.shape[1]), np.ones(synth.x.shape[1]), "standard"),
    )
    ff = read_features(learned_feature_file(tmp_path / "features", synth, model_dir, name="vq_vae"))
    seen = []
    real = finetune._train_and_score

    def spy(models, shots, *args, **kwargs):
        for model, (x, _) in zip(models, shots, strict=True):
            with torch.no_grad():
                outputs = model.encoder(x).reshape(-1, 2)  # the shots' encoder outputs, one row per code slot
            seen.append((model.codebook.detach().clone(), outputs))
        return real(models, shots, *args, **kwargs)

    monkeypatch.setattr(finetune, "_train_and_score", spy)
    cfg = QUICK.model_copy(update={"fewshot_k": (1,), "finetune_epochs": 1})
    finetune.fewshot_scratch(ff, cfg)
    assert len(seen) == 3
    for codebook, outputs in seen:
        # every code is one of the shots' encoder outputs (the uniform init lies within +-1/16)
        distance = torch.cdist(codebook, outputs, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
        assert distance.max() < 1e-5
        assert codebook.abs().max() > 1.0 / 16
    seen.clear()
    finetune.fewshot_finetune(ff, cfg)
    saved = load_model(model_dir).model.codebook
    assert all(torch.equal(codebook, saved) for codebook, _ in seen)  # the pretrained codebook, untouched


def test_retired_early_stopping_keys_are_accepted_and_ignored(caplog):
    """An earlier run's config (its config.json names every field) still loads; the keys say why they are ignored."""
    from ae_repr.config import ExperimentConfig, validate_config

    old = ExperimentConfig().model_dump(mode="json")
    old["eval"].update(finetune_patience=3, finetune_val_rows=100, finetune_epochs=7)
    with caplog.at_level("WARNING", logger="ae_repr.config"):
        cfg = validate_config(old)
    assert cfg.eval == EvalConfig(finetune_epochs=7)
    assert not hasattr(cfg.eval, "finetune_patience") and not hasattr(cfg.eval, "finetune_val_rows")
    assert "eval.finetune_patience is ignored: few-shot fine-tuning runs a fixed finetune_epochs" in caplog.text
    assert "eval.finetune_val_rows is ignored" in caplog.text


@pytest.mark.parametrize("n_classes", [2, 4])
def test_lp_head_folds_the_scaler_and_logistic_head_exactly(tmp_path, n_classes):
    """The fine-tune head at epoch 0 computes the frozen head's decision function (binary case included)."""
    import torch

    from ae_repr.checkpoint import load_model
    from evaluation.finetune import _lp_head
    from evaluation.probe import fit_frozen_head

    loaded = load_model(save_tiny_ae(tmp_path / "m"))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32) * 3)
    y = np.arange(40) % n_classes
    head = _lp_head(loaded.model, x, y, n_classes, QUICK)
    with torch.inference_mode():
        z = loaded.model.encode(x)
        logits = head(z).numpy()
    ref = fit_frozen_head(z.numpy(), y, Cs=(QUICK.fewshot_c,), folds=0, seed=0).decision_function(z.numpy())
    if n_classes == 2:  # sklearn's binary decision function is logit(1) - logit(0)
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], ref, rtol=1e-4, atol=1e-4)
    else:  # multinomial: logits up to a per-row constant
        np.testing.assert_allclose(
            logits - logits.mean(1, keepdims=True), ref - ref.mean(1, keepdims=True), rtol=1e-4, atol=1e-4
        )


def test_budgeted_epochs_bound_the_arms_by_the_pretraining_budget():
    """Each arm passes at most fewshot_budget x the pretraining's row budget (or finetune_epochs, or 1 epoch)."""
    from evaluation.finetune import budgeted_epochs

    digits = {"max_steps": 6000, "batch_size": 128, "epochs": 1000}  # the default config on digits' 1347 train rows
    assert budgeted_epochs(EvalConfig(), digits, 1347, 5 * 10 * (1 + 5 + 10 + 50)) == 100  # the budget does not bind
    smoke = {"max_steps": 6000, "batch_size": 128, "epochs": 2}  # two epochs over 1800 rows: 3600 rows
    epochs = budgeted_epochs(EvalConfig(fewshot_budget=2.0), smoke, 1800, 990)
    assert epochs == 7 and epochs * 990 <= 2.0 * 3600 < (epochs + 1) * 990
    steps = {"max_steps": 10, "batch_size": 64, "epochs": 1000}  # the step budget binds: 640 rows
    assert budgeted_epochs(EvalConfig(fewshot_budget=1.0), steps, 10_000, 100) == 6
    assert budgeted_epochs(EvalConfig(), steps, 10_000, 10**6) == 1  # never fewer than one epoch


def test_end_to_end_arms_train_for_the_budgeted_epochs(tmp_path, synth, monkeypatch):
    """A model pretrained on a small budget gets fewer fine-tuning epochs, and the report note says so."""
    import torch

    import evaluation.finetune as finetune
    from ae_repr.checkpoint import load_model, save_model

    mdir = save_tiny_ae(tmp_path / "models" / "ae")
    loaded = load_model(mdir)
    train_cfg = {"max_steps": 6000, "batch_size": 128, "epochs": 1}  # one pass over the train rows
    save_model(mdir, loaded.model, variant="ae", normalizer=loaded.normalizer, extra={"train_config": train_cfg})
    ff = read_features(learned_feature_file(tmp_path / "features", synth, mdir))
    n_train, n_classes = int((ff.frame["split"] == "train").sum()), ff.frame["label"].nunique()
    cfg = QUICK.model_copy(update={"fewshot_k": (1,), "fewshot_seeds": 2, "fewshot_budget": 0.1})
    expected = max(1, int(0.1 * n_train // (2 * n_classes)))
    assert expected < cfg.finetune_epochs
    steps = []
    real_ce = torch.nn.functional.cross_entropy
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", lambda *a, **k: steps.append(1) or real_ce(*a, **k))
    fewshot_finetune(ff, cfg)
    assert len(steps) == expected  # one full-batch step per epoch at k=1
    assert f"{expected} epochs (fewer than the configured epochs" in finetune.arm_protocol(ff, cfg)


def test_end_to_end_arms_score_a_bounded_test_subsample(ae_file, monkeypatch):
    """Each run is scored on the documented fixed subsample of at most fewshot_test_max_rows test rows."""
    import evaluation.finetune as finetune
    from evaluation.inputs import subsample

    scored = []
    real = finetune._train_and_score

    def spy(models, shots, test, *args, **kwargs):
        scored.append(test[1].clone())
        return real(models, shots, test, *args, **kwargs)

    monkeypatch.setattr(finetune, "_train_and_score", spy)
    cfg = QUICK.model_copy(update={"fewshot_k": (1,), "fewshot_test_max_rows": 10, "finetune_epochs": 1})
    fewshot_finetune(ae_file, cfg)
    rows = subsample(ae_file, "test", 10, 0)
    assert len(scored) == 1 and len(scored[0]) == 10 < int((ae_file.frame["split"] == "test").sum())
    expected = np.searchsorted(np.unique(ae_file.frame["label"]), ae_file.frame["label"].to_numpy()[rows])
    np.testing.assert_array_equal(scored[0].numpy(), expected)


_TWO_TASKS = """
import json, threading
import numpy as np
from evaluation.inputs import single_thread

rng = np.random.default_rng(0)
a, b = rng.normal(size=100_000), rng.normal(size=100_000)
out = {}

def run(fn):
    t = threading.Thread(target=fn)
    t.start()
    t.join(10)

def alone():
    with single_thread():
        out["one thread"] = float(a @ b)

run(alone)
run(lambda: out.__setitem__("unlimited", float(a @ b)))
entered = {name: threading.Event() for name in "ab"}
a_left = threading.Event()

b_left = threading.Event()
measured = threading.Event()

def task_a():  # lives on until the last product: OpenBLAS control stays with a live thread that set a limit
    with single_thread():
        entered["a"].set()
        entered["b"].wait(10)
    a_left.set()
    measured.wait(10)

def task_b():
    entered["a"].wait(10)
    with single_thread():
        entered["b"].set()
        a_left.wait(10)
        out["b after a left"] = float(a @ b)
    b_left.set()

threads = [threading.Thread(target=task_a), threading.Thread(target=task_b)]
for t in threads:
    t.start()
b_left.wait(10)
run(lambda: out.__setitem__("after both left", float(a @ b)))
measured.set()
for t in threads:
    t.join(10)
print(json.dumps(out))
"""


def test_single_thread_holds_until_the_last_thread_inside_leaves():
    """Two task threads inside `single_thread` at once: the first to leave must not give the other its BLAS
    threads back (FastICA's result depends on their number). Seen by what BLAS computes: a long dot product
    sums in another order on two threads, so B's product after A left must be the one-thread product. A's
    thread lives until the last product, so the undo by B must also take OpenBLAS control from a thread
    that is still alive. In a fresh process: the BLAS thread state earlier tests leave behind would blur it."""
    import json
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        pytest.fail("needs two cores: on one, BLAS runs one thread whatever the limit")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", _TWO_TASKS], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["one thread"] != out["unlimited"], f"BLAS ran one thread anyway: nothing to tell apart ({out})"
    assert out["b after a left"] == out["one thread"], out
    assert out["after both left"] == out["unlimited"], out  # the limit was undone
