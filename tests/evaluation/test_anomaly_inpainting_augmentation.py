"""The anomaly, inpainting and augmentation application tasks on small synthetic data and tiny models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from eval_synth import D, Synth, write_ff
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ae_repr.checkpoint import LoadedModel, load_model, save_model
from ae_repr.config import EvalConfig, TrainConfig
from ae_repr.data import Normalizer, load_dataset
from ae_repr.io import read_features
from ae_repr.models import Autoencoder, build_model, model_config
from evaluation import inpainting as inpainting_module
from evaluation.anomaly import anomaly, anomaly_baselines
from evaluation.augmentation import augmentation, episode_generator, neighbours
from evaluation.context import AppContext, make_context
from evaluation.fewshot import fewshot_episodes, t_interval
from evaluation.inpainting import MASK_KINDS, inpainting, inpainting_baselines, iterative_fill, make_masks
from evaluation.inputs import subsample


def _blobs(
    directory: Path,
    *,
    spread: float = 3.0,
    sizes: tuple[int, ...] = (60, 60, 60, 60),
    planted: float | None = None,
    informative: bool = True,
    rank: int | None = None,
    seed: int = 0,
) -> Synth:
    """Labelled rows in D dims written as a parquet data file with a 25% test split per class.

    planted: the last class is moved this far along every axis; informative=False: x ignores the label;
    rank: x lies near a random `rank`-dimensional subspace.
    """
    rng = np.random.default_rng(seed)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(sizes)]).astype(np.int64)
    if rank is not None:
        x = rng.normal(size=(len(y), rank)) @ rng.normal(size=(rank, D)) + 0.05 * rng.normal(size=(len(y), D))
    else:
        centers = rng.normal(0.0, spread, size=(len(sizes), D)) if informative else np.zeros((len(sizes), D))
        x = centers[y] + rng.normal(size=(len(y), D))
    if planted is not None:
        x[y == len(sizes) - 1] += planted
    x = x.astype(np.float32)
    split = np.full(len(y), "train", dtype=object)
    for c in range(len(sizes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        split[idx[: len(idx) // 4]] = "test"
    frame = pd.DataFrame({f"f{i:02d}": x[:, i] for i in range(D)})
    frame["label"], frame["split"] = y, split.astype(str)
    path = directory / "data.parquet"
    frame.to_parquet(path, index=False)
    return Synth(path, x, y, split.astype(str))


def _baseline_ctx(tmp_path: Path, synth: Synth, cfg: EvalConfig | None = None, **ff_kw) -> AppContext:
    ff = read_features(write_ff(tmp_path / "raw.parquet", synth, synth.x[:, :4], **ff_kw))
    return make_context(ff, cfg or EvalConfig())


def _value(frame: pd.DataFrame, representation: str, metric: str) -> float:
    sel = (frame["representation"] == representation) & (frame["metric"] == metric)
    return float(frame.loc[sel, "value"].item())


class IdentityAE(Autoencoder):
    """encode and decode are the identity: a latent neighbour is the input plus the latent noise."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(len(z), *self.input_shape)

    def loss(self, x, *, target=None, **schedule):
        raise NotImplementedError


def _identity_ctx(tmp_path: Path, synth: Synth, cfg: EvalConfig) -> AppContext:
    """A context whose model is IdentityAE with the baselines' normalizer; its features are the normalized inputs."""
    normalizer = Normalizer.fit(synth.x[synth.train])
    model = IdentityAE(model_config("ae", latent_dim=D), (D,))
    ff = read_features(write_ff(tmp_path / "identity.parquet", synth, normalizer.numpy(synth.x)))
    return make_context(ff, cfg, loaded=LoadedModel(model, normalizer, {"variant": "ae"}))


# ---------------------------------------------------------------------------------------------- anomaly


def test_anomaly_baselines_find_a_planted_class(tmp_path):
    synth = _blobs(tmp_path, planted=12.0)
    out = anomaly_baselines(_baseline_ctx(tmp_path, synth), k=3)
    truth = (synth.y[synth.test] == 3).astype(np.float32)
    assert set(out.frame["representation"]) == {"pca", "isolation_forest"}
    for rep in ("pca", "isolation_forest"):
        scores = out.pictures[f"{rep}/anomaly_scores"]
        np.testing.assert_array_equal(out.pictures[f"{rep}/anomaly_truth"], truth)
        assert scores.shape == truth.shape and scores.dtype == np.float32
        assert _value(out.frame, rep, "auroc") > 0.95
        assert _value(out.frame, rep, "auroc") == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)
        assert _value(out.frame, rep, "auprc") == pytest.approx(average_precision_score(truth, scores), abs=1e-6)
    assert "anomaly classes [3]" in out.notes[0]


def test_anomaly_baselines_at_chance_when_anomalies_look_normal(tmp_path):
    synth = _blobs(tmp_path, sizes=(200, 200, 200, 200), informative=False)
    out = anomaly_baselines(_baseline_ctx(tmp_path, synth), k=3)
    for rep in ("pca", "isolation_forest"):
        assert abs(_value(out.frame, rep, "auroc") - 0.5) < 0.15
        assert abs(_value(out.frame, rep, "auprc") - 0.25) < 0.15  # the anomaly share of the test rows


def test_anomaly_classes_setting_and_inapplicable_cases(tmp_path):
    synth = _blobs(tmp_path, planted=12.0)
    out = anomaly_baselines(_baseline_ctx(tmp_path, synth, EvalConfig(anomaly_classes=(0, 1))), k=3)
    expected = np.isin(synth.y[synth.test], [0, 1]).astype(np.float32)
    np.testing.assert_array_equal(out.pictures["pca/anomaly_truth"], expected)
    for cfg, kw, why in (
        (EvalConfig(anomaly_classes=(9,)), {}, "both normal and anomalous"),
        (EvalConfig(anomaly_classes=(0, 1, 2, 3)), {}, "no normal train rows"),
        (EvalConfig(), {"labels": None}, "no labels"),
    ):
        empty = anomaly_baselines(_baseline_ctx(tmp_path, synth, cfg, **kw), k=3)
        assert empty.frame.empty and not empty.pictures and why in empty.notes[0]


def _tiny_model(model_dir: Path, variant: str) -> LoadedModel:
    extra = {"code_dim": 2, "codebook_size": 16} if variant == "vq_vae" else {}
    model = build_model(variant, model_config(variant, latent_dim=4, hidden=(32,), **extra), (D,), "gaussian")
    save_model(model_dir, model, variant=variant, normalizer=Normalizer(np.zeros(D), np.ones(D), "standard"))
    return load_model(model_dir)


@pytest.mark.parametrize("variant", ["ae", "vae", "vq_vae"])
def test_anomaly_retrains_on_normal_classes(tmp_path, variant):
    synth = _blobs(tmp_path, planted=12.0)
    ff = read_features(write_ff(tmp_path / f"{variant}.parquet", synth, synth.x[:, :4]))
    pretrained = _tiny_model(tmp_path / "models" / variant, variant)
    train_cfg = TrainConfig(epochs=40, batch_size=32, device="cpu")
    ctx = make_context(ff, EvalConfig(), loaded=pretrained, train_cfg=train_cfg, work_dir=tmp_path / "work")
    out = anomaly(ctx)

    model_dir = tmp_path / "work" / "anomaly_model"
    assert (model_dir / "model.pt").is_file()
    retrained = load_model(model_dir)
    assert retrained.variant == variant and retrained.model.cfg == pretrained.model.cfg
    assert retrained.meta["train_config"]["epochs"] == 40 and retrained.meta["seed"] == 0
    assert retrained.meta["dataset_sha256"] != load_dataset(str(synth.path)).sha256
    # its normalizer saw only normal rows: the planted class would pull the mean ~3 per feature up
    normal_train = synth.train & (synth.y != 3)
    shift = retrained.normalizer.shift
    assert np.abs(shift - synth.x[normal_train].mean(0)).max() < 0.6
    assert np.linalg.norm(shift - synth.x[synth.train].mean(0)) > 6.0

    truth = (synth.y[synth.test] == 3).astype(np.float32)
    scores = out.pictures[f"{variant}/anomaly_scores"]
    np.testing.assert_array_equal(out.pictures[f"{variant}/anomaly_truth"], truth)
    assert _value(out.frame, variant, "auroc") > 0.9
    assert _value(out.frame, variant, "auroc") == pytest.approx(roc_auc_score(truth, scores), abs=1e-6)

    # the scores, recomputed from the retrained model: the headline is reconstruction error for every
    # variant; the VAE family adds the negative ELBO, vq_vae the code distance, under their own names
    x = retrained.normalizer.torch(torch.from_numpy(synth.x[synth.test]))
    with torch.inference_mode():
        recon = (retrained.model.reconstruct(x) - x).pow(2).sum(1).numpy()
    np.testing.assert_allclose(scores, recon, rtol=1e-4, atol=1e-4)
    expected_metrics = {
        "ae": {"auroc", "auprc"},
        "vae": {"auroc", "auprc", "auroc_neg_elbo", "auprc_neg_elbo"},
        "vq_vae": {"auroc", "auprc", "auroc_code_distance", "auprc_code_distance"},
    }[variant]
    assert set(out.frame["metric"]) == expected_metrics
    if variant == "vae":  # the negative ELBO from many more draws of another seed: the 10-draw estimate is close
        gen = torch.Generator().manual_seed(123)
        with torch.inference_mode():
            direct = -torch.stack([retrained.model.log_weight(x, gen) for _ in range(400)]).mean(0).numpy()
        assert _value(out.frame, variant, "auroc_neg_elbo") == pytest.approx(roc_auc_score(truth, direct), abs=0.02)
    if variant == "vq_vae":
        direct = retrained.model.quantization_error(x).numpy()
        assert _value(out.frame, variant, "auroc_code_distance") == pytest.approx(
            roc_auc_score(truth, direct), abs=1e-6
        )

    # a second run reuses the finished model and gives the same numbers
    stamp = (model_dir / "model.pt").stat().st_mtime_ns
    again = anomaly(ctx)
    assert (model_dir / "model.pt").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(again.frame, out.frame)


def test_anomaly_retrains_with_the_pretrained_models_own_seed(tmp_path):
    """A seed grid's members pretrained with seeds 5 and 6 retrain with those seeds, so their anomaly models (and
    numbers) vary with the pretraining seed; the evaluation seed stays the context's."""
    synth = _blobs(tmp_path, planted=12.0)
    ff = read_features(write_ff(tmp_path / "ae.parquet", synth, synth.x[:, :4]))
    model = build_model("ae", model_config("ae", latent_dim=4, hidden=(32,)), (D,), "gaussian")
    weights = []
    for seed in (5, 6):
        save_model(tmp_path / "models" / f"ae{seed}", model, variant="ae",
                   normalizer=Normalizer(np.zeros(D), np.ones(D), "standard"), extra={"seed": seed})
        ctx = make_context(ff, EvalConfig(), loaded=load_model(tmp_path / "models" / f"ae{seed}"),
                           train_cfg=TrainConfig(epochs=2, batch_size=32, device="cpu"), work_dir=tmp_path / f"w{seed}")
        anomaly(ctx)
        retrained = load_model(tmp_path / f"w{seed}" / "anomaly_model")
        assert retrained.meta["seed"] == seed and ctx.seed == 0
        weights.append(torch.load(tmp_path / f"w{seed}" / "anomaly_model" / "model.pt", weights_only=True))
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_vq_vae_anomaly_auroc_is_reconstruction_error_and_code_distance_is_named_apart(tmp_path):
    """vq_vae's `auroc`/`auprc` are its reconstruction error's, as for every variant; the code distance has its own name."""
    synth = _blobs(tmp_path)  # the held-out class is a blob of its own: far in input space, not from the codes
    ff = read_features(write_ff(tmp_path / "vq_vae.parquet", synth, synth.x[:, :4]))
    ctx = make_context(
        ff,
        EvalConfig(anomaly_epochs=15),
        loaded=_tiny_model(tmp_path / "models" / "vq_vae", "vq_vae"),
        train_cfg=TrainConfig(batch_size=32, device="cpu"),
        work_dir=tmp_path / "work",
    )
    out = anomaly(ctx)
    retrained = load_model(tmp_path / "work" / "anomaly_model")
    model, truth = retrained.model, (synth.y[synth.test] == 3).astype(np.float32)
    x = retrained.normalizer.torch(torch.from_numpy(synth.x[synth.test]))
    with torch.inference_mode():
        recon = (model.decode(model.encode(x)) - x).pow(2).sum(1).numpy()
        code_distance = model.quantization_error(x).numpy()
    auroc_recon, auroc_code = roc_auc_score(truth, recon), roc_auc_score(truth, code_distance)
    assert auroc_recon - auroc_code > 0.1  # the two scores disagree here, so the test tells them apart
    assert _value(out.frame, "vq_vae", "auroc") == pytest.approx(auroc_recon, abs=1e-9)
    assert _value(out.frame, "vq_vae", "auprc") == pytest.approx(average_precision_score(truth, recon), abs=1e-9)
    assert _value(out.frame, "vq_vae", "auroc_code_distance") == pytest.approx(auroc_code, abs=1e-9)
    assert _value(out.frame, "vq_vae", "auprc_code_distance") == pytest.approx(
        average_precision_score(truth, code_distance), abs=1e-9
    )
    assert set(out.frame["metric"]) == {"auroc", "auprc", "auroc_code_distance", "auprc_code_distance"}
    assert "auroc_code_distance/auprc_code_distance: squared distance" in out.notes[0]
    assert "auroc/auprc: squared reconstruction error" in out.notes[0]


def test_anomaly_without_work_dir_uses_a_temporary_directory(tmp_path):
    synth = _blobs(tmp_path, planted=12.0)
    ff = read_features(write_ff(tmp_path / "ae.parquet", synth, synth.x[:, :4]))
    cfg = EvalConfig(anomaly_epochs=3)
    ctx = make_context(ff, cfg, loaded=_tiny_model(tmp_path / "m", "ae"), train_cfg=TrainConfig(epochs=50))
    out = anomaly(ctx)
    assert set(out.frame["metric"]) == {"auroc", "auprc"}
    assert "stopped on epochs" in out.notes[0]
    assert not (tmp_path / "anomaly_model").exists()


# ------------------------------------------------------------------------------------------- inpainting


def test_block_masks_hide_a_square_over_all_channels():
    cfg = EvalConfig(inpaint_block=0.5)
    masks = make_masks((2, 8, 10), 20, "block", cfg, np.random.default_rng(0))
    assert masks.shape == (20, 2, 8, 10) and masks.dtype == np.float32
    assert set(np.unique(masks)) == {0.0, 1.0}
    np.testing.assert_array_equal(masks[:, 0], masks[:, 1])
    corners = set()
    for m in masks[:, 0]:
        r, c = np.nonzero(m == 0)
        assert len(r) == 4 * 5 and r.max() - r.min() == 3 and c.max() - c.min() == 4
        corners.add((r.min(), c.min()))
    assert len(corners) > 5  # a random position per image

    flat = make_masks((16,), 30, "block", cfg, np.random.default_rng(0))
    for m in flat:
        hidden = np.flatnonzero(m == 0)
        assert len(hidden) == 8 and hidden[-1] - hidden[0] == 7


def test_random_masks_hide_the_configured_fraction_of_pixels():
    cfg = EvalConfig(inpaint_random_p=0.3)
    masks = make_masks((3, 32, 32), 40, "random", cfg, np.random.default_rng(0))
    assert abs(1 - masks.mean() - 0.3) < 0.01
    np.testing.assert_array_equal(masks[:, 0], masks[:, 2])
    flat = make_masks((16,), 2000, "random", cfg, np.random.default_rng(1))
    assert abs(1 - flat.mean() - 0.3) < 0.01


def test_iterative_fill_identity_oracle_and_observed_entries():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(5, 16)).astype(np.float32)
    mask = make_masks((16,), 5, "random", EvalConfig(), rng)
    hidden = mask == 0
    x_obs = np.where(hidden, 0.0, truth).astype(np.float32)
    init = rng.normal(size=16).astype(np.float32)

    same = iterative_fill(x_obs, mask, lambda x: x, init, iters=5)
    np.testing.assert_array_equal(same, np.where(hidden, np.broadcast_to(init, truth.shape), truth))

    oracle = iterative_fill(x_obs, mask, lambda x: truth, init, iters=3)
    assert float(((oracle - truth)[hidden] ** 2).mean()) == 0.0

    noisy = iterative_fill(x_obs, mask, lambda x: rng.normal(size=x.shape) * 1e3, init, iters=4)
    np.testing.assert_array_equal(noisy[~hidden], truth[~hidden])
    assert np.abs(noisy[hidden] - truth[hidden]).min() > 0  # the hidden ones did change


def test_iterative_fill_stops_each_row_at_its_fixed_point(monkeypatch):
    """Rows 0-1 are fixed points of the map from the start, rows 2-4 halve their distance to 1 each step:
    the first leave after one step, the others once a step moves them by at most FIXED_POINT_TOL, and the
    result is what running every step on every row gives, to that tolerance."""
    calls = []

    def reconstruct(x: np.ndarray) -> np.ndarray:  # row-wise: the first (observed) entry says which map
        calls.append(len(x))
        return np.where(x[:, :1] > 0, x, 0.5 * x + 0.5)

    x_obs = np.zeros((5, 4), dtype=np.float32)
    x_obs[:, 0] = [1, 1, -1, -1, -1]
    mask = np.zeros((5, 4), dtype=np.float32)
    mask[:, 0] = 1
    init = np.zeros(4, dtype=np.float32)
    early = iterative_fill(x_obs, mask, reconstruct, init, iters=60)
    assert calls[:2] == [5, 3] and set(calls[1:]) == {3}
    assert len(calls) < 60  # stopped: float32 halvings reach the tolerance in about 20 steps
    steps, tol = len(calls), inpainting_module.FIXED_POINT_TOL
    monkeypatch.setattr(inpainting_module, "FIXED_POINT_TOL", -1.0)  # never settled: every step on every row
    calls.clear()
    full = iterative_fill(x_obs, mask, reconstruct, init, iters=60)
    assert calls == [5] * 60
    np.testing.assert_allclose(early, full, atol=2 * tol)
    np.testing.assert_array_equal(early[:2, 1:], 0.0)  # the fixed rows kept their start
    assert np.abs(early[2:, 1:] - 1.0).max() <= 2 * tol
    assert steps > 10  # the moving rows did not stop after the fixed ones left


def test_inpainting_mse_counts_only_hidden_entries(tmp_path):
    synth = _blobs(tmp_path)
    cfg = EvalConfig(inpaint_max_rows=30)
    ctx = _baseline_ctx(tmp_path, synth, cfg)
    out = inpainting_baselines(ctx, k=3)

    rows = subsample(ctx.ff, "test", 30, 0)
    assert len(rows) == 30
    normalizer = Normalizer.fit(synth.x[synth.train])
    x = normalizer.numpy(synth.x[rows])
    mean = normalizer.numpy(synth.x[synth.train]).mean(0)
    sq_total, n_total = 0.0, 0
    for kind in ("block", "random"):
        mask = make_masks((D,), 30, kind, cfg, np.random.default_rng([0, MASK_KINDS.index(kind)]))
        hidden = mask == 0
        err = (mean[None] - x) ** 2
        expected = err[hidden].mean()
        assert expected != pytest.approx(err.mean(), rel=1e-3)  # all entries would give another number
        assert _value(out.frame, "mean_image", f"mse_masked_{kind}") == pytest.approx(expected, rel=1e-4)
        sq_total, n_total = sq_total + err[hidden].sum(), n_total + hidden.sum()
        np.testing.assert_array_equal(out.pictures[f"inputs/inpaint_mask_{kind}"], mask[:8])
        np.testing.assert_allclose(
            out.pictures[f"mean_image/inpaint_fill_{kind}"], np.where(hidden, mean, x)[:8], atol=1e-5
        )
        assert out.pictures[f"pca/inpaint_fill_{kind}"].shape == (8, D)
    assert _value(out.frame, "mean_image", "mse_masked") == pytest.approx(sq_total / n_total, rel=1e-4)
    np.testing.assert_allclose(out.pictures["inputs/inpaint_original"], x[:8], atol=1e-6)

    # the learned path with an identity model (same normalizer) never moves off the init: the mean-image numbers
    learned = inpainting(_identity_ctx(tmp_path, synth, cfg))
    for metric in ("mse_masked_block", "mse_masked_random", "mse_masked"):
        assert _value(learned.frame, "identity", metric) == pytest.approx(
            _value(out.frame, "mean_image", metric), rel=1e-5
        )
    assert set(learned.pictures) == {"identity/inpaint_fill_block", "identity/inpaint_fill_random"}


def test_pca_fill_beats_the_mean_image_on_low_rank_data(tmp_path):
    synth = _blobs(tmp_path, rank=3)
    out = inpainting_baselines(_baseline_ctx(tmp_path, synth, EvalConfig(inpaint_iters=30)), k=3)
    for metric in ("mse_masked_block", "mse_masked_random", "mse_masked"):
        assert _value(out.frame, "pca", metric) < 0.5 * _value(out.frame, "mean_image", metric)


# ----------------------------------------------------------------------------------------- augmentation


def test_augmentation_delta_is_augmented_minus_base_per_episode(tmp_path):
    synth = _blobs(tmp_path, spread=0.5)  # overlapping classes: accuracies well below 1
    cfg = EvalConfig(augment_k=3, augment_per_shot=4, augment_noise=0.8, fewshot_seeds=4)
    ctx = _identity_ctx(tmp_path, synth, cfg)
    out = augmentation(ctx)

    normalizer = Normalizer.fit(synth.x[synth.train])
    x, te = normalizer.numpy(synth.x), synth.test
    std = torch.from_numpy(x[synth.train].std(0))
    base, augmented = [], []
    for s, shots in enumerate(fewshot_episodes(ctx.ff, 3, 4, seed=0)):
        with torch.inference_mode():
            new = neighbours(ctx.model, torch.from_numpy(x[shots]), std, 0.8, 4, episode_generator(0, s))
        assert new.shape == (len(shots), 4, D)
        x_aug = np.concatenate([x[shots], new.reshape(-1, D).numpy()])
        y_aug = np.concatenate([synth.y[shots], np.repeat(synth.y[shots], 4)])
        for xf, yf, accs in ((x[shots], synth.y[shots], base), (x_aug, y_aug, augmented)):
            clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(xf, yf)
            accs.append(accuracy_score(synth.y[te], clf.predict(x[te])))
    delta = np.subtract(augmented, base)
    assert np.ptp(delta) > 0 and 0.3 < np.mean(base) < 0.95
    mean, lo, hi = t_interval(delta)
    row = out.frame.set_index("metric")
    assert row.loc["accuracy_delta", "value"] == pytest.approx(mean, abs=1e-9)
    assert row.loc["accuracy_delta", "ci_low"] == pytest.approx(lo, abs=1e-9)
    assert row.loc["accuracy_delta", "ci_high"] == pytest.approx(hi, abs=1e-9)
    assert lo < row.loc["accuracy_delta", "value"] < hi
    assert row.loc["accuracy_base", "value"] == pytest.approx(np.mean(base), abs=1e-9)
    assert row.loc["accuracy_augmented", "value"] == pytest.approx(np.mean(augmented), abs=1e-9)
    assert (row["k"] == 3).all() and (row["n_seeds"] == 4).all()
    assert out.pictures["identity/augment_examples"].shape == (4, 7, D)


def test_augmentation_with_near_copies_changes_nothing(tmp_path):
    synth = _blobs(tmp_path, spread=0.5)
    cfg = EvalConfig(augment_k=3, augment_per_shot=1, augment_noise=1e-4, fewshot_seeds=4)
    out = augmentation(_identity_ctx(tmp_path, synth, cfg))
    row = out.frame.set_index("metric")
    assert abs(row.loc["accuracy_delta", "value"]) < 0.03
    grid = out.pictures["identity/augment_examples"]
    assert np.abs(grid[:, 1:] - grid[:, :1]).max() < 1e-2  # neighbours are near-copies of their shot
    # the four shown shots come from four different classes
    labels = {int(synth.y[np.argmin(np.abs(_norm(synth) - g[0]).sum(1))]) for g in grid}
    assert labels == {0, 1, 2, 3}


def _norm(synth: Synth) -> np.ndarray:
    return Normalizer.fit(synth.x[synth.train]).numpy(synth.x)


def test_vq_neighbours_are_requantized(tmp_path):
    torch.manual_seed(0)
    cfg = model_config("vq_vae", latent_dim=4, hidden=(32,), code_dim=2, codebook_size=8)
    model = build_model("vq_vae", cfg, (D,), "gaussian").eval()
    x = torch.randn(6, D)
    with torch.inference_mode():
        new = neighbours(model, x, torch.ones(4), 1e-3, 3, torch.Generator().manual_seed(0))
        recon = model.reconstruct(x)
    for j in range(3):  # a tiny perturbation snaps back to the same codes
        torch.testing.assert_close(new[:, j], recon, rtol=0, atol=1e-6)


def test_augmentation_not_run_without_labels_or_with_too_large_k(tmp_path):
    synth = _blobs(tmp_path)
    ctx = _identity_ctx(tmp_path, synth, EvalConfig(augment_k=100))
    out = augmentation(ctx)
    assert out.frame.empty and "exceeds the smallest train class (45)" in out.notes[0]
    unlabelled = read_features(write_ff(tmp_path / "u.parquet", synth, synth.x, labels=None))
    out = augmentation(make_context(unlabelled, EvalConfig(), loaded=ctx.loaded))
    assert out.frame.empty and "no labels" in out.notes[0]
