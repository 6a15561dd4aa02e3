"""One-class anomaly detection (task `anomaly`): how well a model trained only on normal data flags the rest.

Protocol (the held-out-class setup of Akcay et al. 2018, "GANomaly: Semi-Supervised Anomaly Detection
via Adversarial Training"): the anomaly classes are `EvalConfig.anomaly_classes`, or the largest label
when that is None; every other class is normal. The detector is fitted on the train rows of the normal classes only; every test row
is scored, and the test rows of the anomaly classes are the positives. Metrics: `auroc`
(`roc_auc_score`) and `auprc` (`average_precision_score`), higher score = more anomalous.

A learned variant's pretrained model has seen every class, so it is retrained from scratch on the
normal train rows with its own variant, model config, training config and seed, by the same rule as
training (until the validation objective stops improving), within `EvalConfig.anomaly_budget` of the
training step budget (default half) and `EvalConfig.anomaly_epochs` epochs (else the training config's
cap), into `<work_dir>/anomaly_model`
(reused when a finished model with the same training key is there). Scores, in the retrained model's
normalized space:

- `auroc` / `auprc`, every variant: the reconstruction error, ||x - model.reconstruct(x)||^2 summed
  over inputs (decode(encode(x)), the likelihood mean), so the headline metric means the same for all;
- `auroc_<score>` / `auprc_<score>` for each score of a model with the `AnomalyScorer` capability
  (`anomaly_scores`): `neg_elbo` (the VAE family: the mean of -log w over `ELBO_DRAWS` posterior draws),
  `code_distance` (vq_vae: the squared distance from the encoder outputs to their nearest codes, summed
  over positions), or a plug-in's own.

The model-free baselines are PCA (k components, squared reconstruction error) and scikit-learn's
IsolationForest (score = -score_samples); they get `auroc` / `auprc` only.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import average_precision_score, roc_auc_score

from ae_repr.checkpoint import LoadedModel, load_model
from ae_repr.config import EvalConfig, ExperimentConfig, ModelsConfig
from ae_repr.data.dataset import make_dataset
from ae_repr.models import AnomalyScorer, Autoencoder, inference_copy
from ae_repr.models.capabilities import GaussianLatentScores
from ae_repr.train import train_variant

from .context import AppContext, TaskOutput
from .inputs import pass_rows, single_thread
from .intervals import auroc_interval, interval_fields
from .results import result_frame, result_row

log = logging.getLogger(__name__)

ELBO_DRAWS = GaussianLatentScores.ELBO_DRAWS  # posterior draws averaged into the negative-ELBO score
HEADLINE = "reconstruction"  # the score behind `auroc` / `auprc`; every other score is `auroc_<name>` / `auprc_<name>`
_OWN_SCORE = "the model's own score (anomaly_scores)"  # a plug-in's score, named by the plug-in
_SCORE_NAMES = {
    HEADLINE: "squared reconstruction error (normalized input vs decode(encode(x)), summed over inputs)",
    "neg_elbo": f"negative ELBO (mean -log w over {ELBO_DRAWS} posterior draws)",
    "code_distance": "squared distance from the encoder outputs to their nearest codes, summed over positions",
}


def one_class_split(ctx: AppContext) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]] | str:
    """(normal train rows, test rows, test truth 0/1, anomaly classes), or why the protocol cannot apply."""
    y = ctx.labels
    if y is None:
        return "the feature file has no labels"
    classes = np.unique(y)
    if len(classes) < 2:
        return f"{len(classes)} class(es); one-class detection needs at least 2"
    anomalous = tuple(ctx.cfg.anomaly_classes) if ctx.cfg.anomaly_classes is not None else (int(classes.max()),)
    is_anomaly = np.isin(y, anomalous)
    train, test = ctx.rows("train"), ctx.rows("test")
    normal_train = train[~is_anomaly[train]]
    truth = is_anomaly[test].astype(np.float32)
    if len(normal_train) == 0:
        return f"no normal train rows (anomaly classes {list(anomalous)})"
    if truth.min() == truth.max():
        return f"the test split needs both normal and anomalous rows (anomaly classes {list(anomalous)})"
    return normal_train, test, truth, anomalous


def anomaly(ctx: AppContext) -> TaskOutput:
    """AUROC and AUPRC of the variant retrained on the normal classes, scoring every test row."""
    split = one_class_split(ctx)
    if isinstance(split, str):
        return TaskOutput(notes=(f"{ctx.name}: anomaly not run: {split}.",))
    normal_train, test, truth, anomalous = split
    epochs = ctx.cfg.anomaly_epochs or ctx.train_cfg.epochs
    work = contextlib.nullcontext(ctx.work_dir) if ctx.work_dir is not None else tempfile.TemporaryDirectory()
    with work as directory:
        loaded = retrain_on_normal(ctx, normal_train, test, Path(directory) / "anomaly_model", epochs)
        x = loaded.normalizer.torch(torch.from_numpy(np.ascontiguousarray(ctx.x_raw[test])))
        scores = model_scores(inference_copy(loaded.model), x, seed=ctx.seed)
    described = "; ".join(
        f"{_metric('auroc', n)}/{_metric('auprc', n)}: {_SCORE_NAMES.get(n, _OWN_SCORE)}"
        for n in scores
    )
    note = (
        f"{ctx.name}: anomaly classes {list(anomalous)}; the {ctx.loaded.variant} retrained on the normal "
        f"classes ({loaded.meta.get('steps')} steps, {loaded.meta.get('epochs_run')} epochs, stopped on "
        f"{loaded.meta.get('stopped_on')}; budget {round(ctx.cfg.anomaly_budget * ctx.train_cfg.max_steps)} steps, "
        f"{epochs} epochs); scores: {described}."
    )
    headline = {ctx.name: scores.pop(HEADLINE)}
    return _output(headline, truth, (note,), ctx.cfg, ctx.seed, more={ctx.name: scores})


def anomaly_baselines(ctx: AppContext, k: int) -> TaskOutput:
    """AUROC and AUPRC of PCA (k components) and IsolationForest fitted on the normal train rows."""
    split = one_class_split(ctx)
    if isinstance(split, str):
        return TaskOutput(notes=(f"anomaly baselines not run: {split}.",))
    normal_train, test, truth, anomalous = split
    x_train, x_test = ctx.flat(normal_train), ctx.flat(test)
    n_components = min(k, *x_train.shape)
    with single_thread():
        pca = PCA(n_components=n_components, random_state=ctx.seed).fit(x_train)
        forest = IsolationForest(random_state=ctx.seed).fit(x_train)
        pca_scores = ((x_test - pca.inverse_transform(pca.transform(x_test))) ** 2).sum(axis=1)
        forest_scores = -forest.score_samples(x_test)
    note = (
        f"anomaly baselines: anomaly classes {list(anomalous)}; pca: squared reconstruction error with "
        f"{n_components} components; isolation_forest: -score_samples, {forest.n_estimators} trees."
    )
    return _output({"pca": pca_scores, "isolation_forest": forest_scores}, truth, (note,), ctx.cfg, ctx.seed)


def retrain_on_normal(
    ctx: AppContext, normal_train: np.ndarray, test: np.ndarray, model_dir: Path, epochs: int
) -> LoadedModel:
    """Train the context's variant from scratch on the normal train rows (test rows kept as "test")."""
    variant, model_cfg = ctx.loaded.variant, ctx.model.cfg
    shared = {"latent_dim", "backbone"}  # ModelsConfig's own fields; the rest go in as the variant's overrides
    models = ModelsConfig(
        variants=(variant,),
        latent_dim=model_cfg.latent_dim,
        backbone=model_cfg.backbone,
        overrides={variant: model_cfg.model_dump(mode="json", exclude=shared)},
    )
    budget = max(1, round(ctx.cfg.anomaly_budget * ctx.train_cfg.max_steps))
    # the pretrained model's own seed: the members of a seed grid retrain as differently as they pretrained
    seed = int(ctx.loaded.meta.get("seed", ctx.seed))
    cfg = ExperimentConfig(
        models=models, train=ctx.train_cfg.model_copy(update={"epochs": epochs, "max_steps": budget}), seed=seed
    )
    assert models.model_config_for(variant) == model_cfg, f"{variant}: model config did not round-trip"
    rows = np.sort(np.concatenate([normal_train, test]))
    data = make_dataset(
        f"{ctx.ff.meta.get('dataset', ctx.name)}:normal-classes",
        ctx.x_raw[rows],
        np.where(np.isin(rows, test), "test", "train"),
        labels=ctx.labels[rows],
        sample_id=ctx.ff.frame["sample_id"].to_numpy()[rows],
    )
    result = train_variant(variant, data, cfg, model_dir, progress=False)
    log.info("%s: anomaly model %s in %s", ctx.name, "reused" if result.skipped else "trained", model_dir)
    return load_model(model_dir)


@torch.inference_mode()
def model_scores(model: Autoencoder, x: torch.Tensor, *, seed: int = 0) -> dict[str, np.ndarray]:
    """Anomaly scores per row of normalized inputs `x` (higher = more anomalous) by score name, float64 (n,).

    Every model gets `HEADLINE` (reconstruction error); an `AnomalyScorer` adds its own `anomaly_scores`.
    """
    generator = torch.Generator(device=x.device).manual_seed(seed)

    def scores(xb: torch.Tensor) -> dict[str, torch.Tensor]:
        own = model.anomaly_scores(xb, generator) if isinstance(model, AnomalyScorer) else {}
        assert HEADLINE not in own, f"{type(model).__name__}: anomaly score {HEADLINE!r} is reserved"
        return {HEADLINE: (model.reconstruct(xb) - xb).pow(2).flatten(1).sum(1), **own}  # (B, *shape) -> (B,)

    out: dict[str, list[torch.Tensor]] = {}
    for xb in x.split(pass_rows(x[0].numel(), ELBO_DRAWS)):  # an AnomalyScorer may take several draws per row
        for name, score in scores(xb).items():
            out.setdefault(name, []).append(score.double().cpu())
    return {name: torch.cat(parts).numpy() for name, parts in out.items()}


def _metric(metric: str, score: str) -> str:
    """`auroc` for the headline score, `auroc_<score>` for the others."""
    return metric if score == HEADLINE else f"{metric}_{score}"


def _output(
    scores: dict[str, np.ndarray],
    truth: np.ndarray,
    notes: tuple[str, ...],
    cfg: EvalConfig,
    seed: int,
    *,
    more: dict[str, dict[str, np.ndarray]] | None = None,
) -> TaskOutput:
    """Rows and pictures for each representation's headline test scores against the same truth.

    `more`: {representation: {score name: scores}}, rows `auroc_<name>` / `auprc_<name>` only (the
    pictures, and so the ROC plot, stay on the headline score).
    """
    rows, pictures = [], {}
    for name, s in scores.items():
        extra = (more or {}).get(name, {})
        for score, values in {HEADLINE: s, **extra}.items():
            ci = interval_fields(auroc_interval(truth, values, cfg.bootstrap_samples, seed), cfg.bootstrap_samples)
            rows.append(result_row(name, "anomaly", _metric("auroc", score), roc_auc_score(truth, values), **ci))
            rows.append(result_row(name, "anomaly", _metric("auprc", score), average_precision_score(truth, values)))
        pictures[f"{name}/anomaly_scores"] = np.asarray(s, dtype=np.float32)
        pictures[f"{name}/anomaly_truth"] = truth
    return TaskOutput(frame=result_frame(rows), pictures=pictures, notes=notes)
