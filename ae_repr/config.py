"""The experiment configuration: one frozen pydantic model loaded from YAML, overridable from the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import ConfigError
from .variants import default_variants, variant_names

ALL_VARIANTS = default_variants()  # the default run's variants, from the registry (ae_repr.variants)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"

log = logging.getLogger(__name__)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataConfig(_Frozen):
    """Which data set, and how it is split (a `split` column in the data wins)."""

    dataset: str = "digits"
    test_fraction: float = Field(0.25, gt=0, lt=1)
    split_seed: int = 0


class ModelsConfig(_Frozen):
    """Which variants to train, their shared latent width and backbone, and per-variant overrides."""

    variants: tuple[str, ...] = ALL_VARIANTS
    latent_dim: int = Field(16, gt=0)
    backbone: Literal["auto", "mlp", "conv"] = "auto"
    overrides: dict[str, dict[str, Any]] = Field(default_factory=dict)  # variant -> its config fields

    @field_validator("variants", mode="before")
    @classmethod
    def _split_csv(cls, v: Any) -> Any:
        return tuple(s.strip() for s in v.split(",") if s.strip()) if isinstance(v, str) else v

    @field_validator("variants", "overrides")
    @classmethod
    def _known_variants(cls, v: Any, info: ValidationInfo) -> Any:
        if info.field_name == "variants" and not v:
            raise ValueError("no variants selected")
        names = variant_names()
        unknown = [name for name in v if name not in names]
        if unknown:
            raise ValueError(f"unknown variant {unknown[0]!r}; choose from {', '.join(names)}")
        return v

    @model_validator(mode="after")
    def _valid_overrides(self) -> ModelsConfig:
        for v in dict.fromkeys((*self.variants, *self.overrides)):
            try:
                self.model_config_for(v)  # validates overrides now (all of them: a typo fails loudly), not at training time
            except ValidationError as e:  # name the full key, models.overrides.<variant>.<field>
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                msg = err["msg"].removeprefix("Value error, ")
                if loc:
                    msg = f"{'overrides.' if v in self.overrides else ''}{v}.{loc}: {msg}"
                raise ValueError(msg) from None
        return self

    def model_config_for(self, variant: str):  # -> ModelConfig
        """The variant's typed config: registry defaults < shared fields < per-variant overrides."""
        from .models import model_config

        return model_config(
            variant, latent_dim=self.latent_dim, backbone=self.backbone, **self.overrides.get(variant, {})
        )


class TrainConfig(_Frozen):
    """Optimization and schedules, shared by every variant."""

    # training runs until the validation objective stops improving (`patience`), within a step budget
    # (`max_steps`); `epochs` is a cap on top of both
    epochs: int = Field(1000, ge=0)
    max_steps: int = Field(6000, gt=0)  # optimizer steps, the budget of one variant
    batch_size: int = Field(128, gt=0)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.1, ge=0, lt=1)  # of the train split, for early stopping
    # early stopping: epochs without an improvement of `min_delta` (nats per example) in the unweighted
    # validation objective; halfway through, the learning rate is cut by `lr_decay` (ReduceLROnPlateau)
    patience: int = Field(20, ge=2)
    min_delta: float = Field(0.01, ge=0)
    lr_decay: float = Field(0.3, gt=0, lt=1)
    kl_warmup_epochs: int = Field(0, ge=0)  # KL weight ramps linearly from 0 to 1 over these epochs
    free_bits: float = Field(0.0, ge=0)  # per-dimension KL floor in nats
    device: Literal["auto", "cpu", "cuda"] = "auto"
    timeout_s: float = Field(3600, gt=0)  # a training task taking longer fails
    # resumable state is saved after an epoch once this many seconds passed since the last save (0: every
    # epoch): a kill loses at most this much work, and short epochs do not pay a write each (~2% of training)
    checkpoint_every_s: float = Field(10.0, ge=0)
    # a seed grid: every variant trains once per seed (`<variant>@seed=<s>`); None: the config's `seed` alone
    seeds: tuple[int, ...] | None = None

    # GPUs a training task asks Ray for (orchestration.executor ray; fractions share a GPU); None: 1 when the
    # cluster has GPUs, else 0. It leaves the trained model unchanged (not part of the training key)
    gpus_per_task: float | None = Field(None, ge=0)

    @field_validator("seeds", mode="before")
    @classmethod
    def _seed_list(cls, v: Any) -> Any:
        return None if v is None else parse_seeds(v)


def parse_seeds(value: Any) -> tuple[int, ...]:
    """A seed list (`0,1,2` or a sequence) in ascending order (the same seeds are the same grid): non-negative
    integers, each once; ValueError naming the bad one."""
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items or items == [""]:
        raise ValueError("expected a non-empty list of seeds, e.g. 0,1,2")
    seeds: list[int] = []
    for item in items:
        # bools are ints to Python, and 1.0 would pass int(): only integers, or their decimal digits, are seeds
        if isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item):
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int):
            raise ValueError(f"seed {item!r} is not an integer")
        if item < 0:
            raise ValueError(f"seed {item} is negative")
        if item in seeds:
            raise ValueError(f"seed {item} is given twice")
        seeds.append(item)
    return tuple(sorted(seeds))


class EvalConfig(_Frozen):
    """Evaluation protocol settings."""

    baselines: tuple[str, ...] = ("raw", "pca", "ica", "random_projection")
    knn_k: tuple[int, ...] = (5, 20)
    fewshot_k: tuple[int, ...] = (1, 5, 10, 50)
    fewshot_seeds: int = Field(5, ge=2)
    fewshot_finetune: bool = True
    finetune_lr: float = Field(1e-3, gt=0)
    finetune_epochs: int = Field(100, gt=0)  # the fixed schedule of the end-to-end few-shot arms, at every k
    # each end-to-end arm trains on at most this fraction of the rows the pretraining's budget allows
    # (min(train.max_steps * batch_size, train.epochs * train rows)); fewer epochs when finetune_epochs would not fit
    fewshot_budget: float = Field(0.5, gt=0)
    fewshot_test_max_rows: int = Field(2000, gt=0)  # test rows (a fixed subsample) scoring the end-to-end arms' runs
    trustworthiness_max_rows: int = Field(2000, gt=10)
    map_method: Literal["tsne", "umap", "none"] = "tsne"
    map_max_rows: int = Field(2000, gt=10)
    # t-SNE iterations: 500 ended within 1% of 1000's KL divergence, at equal trustworthiness, in 0.43x the time
    map_iters: int = Field(500, ge=250)
    probe_c_grid: tuple[float, ...] = Field((0.01, 0.1, 1.0, 10.0, 100.0), min_length=1)  # linear-probe C grid
    probe_folds: int = Field(5, ge=2)  # stratified CV folds on the train split for choosing C
    # C is chosen on a stratified subsample of at most this many train rows, then the head is fitted on all;
    # wide features get fewer: probe_cv_max_values // features rows, never below 500, so that raw 64x64 pixels
    # (4096 features: 610 rows) cost the search what 5000 rows of 500 features do
    probe_cv_max_rows: int = Field(5000, ge=10)
    probe_cv_max_values: int = Field(2_500_000, ge=1000)
    fewshot_c: float = Field(1.0, gt=0)  # fixed C of the few-shot logistic head (k*C rows are too few for CV)
    finetune_batch_size: int = Field(512, gt=0)  # k*C shots up to this size are one full batch
    # resamples of the test rows behind each single-split interval (linear probe, kNN, reduction, chance)
    bootstrap_samples: int = Field(1000, ge=100)
    # applications: tasks that use the trained model itself (baselines get their own rows where they apply)
    applications: tuple[
        Literal["anomaly", "inpainting", "generation", "augmentation", "rate_distortion", "disentanglement"], ...
    ] = ("anomaly", "inpainting", "generation", "augmentation", "rate_distortion", "disentanglement")
    anomaly_classes: tuple[int, ...] | None = None  # held-out classes scored as anomalies; None: the largest label
    anomaly_epochs: int | None = Field(None, gt=0)  # retraining on the normal classes; None: train.epochs
    # retraining's step budget as a fraction of train.max_steps; it stops on the same plateau rule as training
    anomaly_budget: float = Field(0.5, gt=0, le=1)
    inpaint_masks: tuple[Literal["block", "random"], ...] = Field(("block", "random"), min_length=1)
    inpaint_block: float = Field(0.5, gt=0, lt=1)  # the square block's side as a fraction of the image side
    inpaint_random_p: float = Field(0.5, gt=0, lt=1)  # fraction of pixels the random mask hides
    inpaint_iters: int = Field(10, gt=0)  # x <- m * x_obs + (1 - m) * decode(encode(x)) repetitions
    inpaint_max_rows: int = Field(500, gt=0)  # test rows inpainted (a fixed subsample)
    nll_samples: int = Field(500, gt=0)  # importance samples per row for nll_is: at most this many
    nll_samples_min: int = Field(50, gt=1)  # every scored row gets this many; then more in rounds (see nll_mc_ratio)
    # rows get more samples (doubling, up to nll_samples) while the importance-sampling standard error of the
    # mean nll_is exceeds this fraction of its standard error over the scored rows: then it pays; later it is noise
    nll_mc_ratio: float = Field(0.1, gt=0)
    nll_max_rows: int = Field(500, gt=0)  # test rows scored by nll_is (a fixed subsample)
    # nll_is draws from 1/2 q + 1/2 q with every posterior std times this (a defensive mixture: bounded weights where
    # q is too narrow); 1 is q alone. On dSprites after 1-2 epochs, 50 draws so gave a bound 5-13 nats tighter than
    # 50 draws from q (and than 400); on a converged digits VAE 0.2 nats tighter (evaluation.generation)
    nll_proposal_widen: float = Field(2.0, ge=1)
    generation_samples: int = Field(1000, gt=0)  # prior samples scored by the real-data classifier
    augment_k: int = Field(5, gt=0)  # labelled examples per class in the augmentation experiment
    augment_per_shot: int = Field(10, gt=0)  # generated neighbours per labelled example
    augment_noise: float = Field(0.5, gt=0)  # latent perturbation, in units of each dimension's train std
    rd_betas: tuple[Annotated[float, Field(ge=0)], ...] = ()  # beta sweep: extra beta_vae models for the rate-distortion curve
    # each sweep model's step budget as a fraction of train.max_steps; it stops on the same plateau rule as training
    rd_budget: float = Field(0.5, gt=0, le=1)
    mig_bins: int = Field(20, ge=2)  # equal-width bins per latent for MIG's mutual information
    dci_model: Literal["gbt", "lasso"] = "gbt"  # importance matrix from gradient-boosted trees or lasso
    disentanglement_max_rows: int = Field(10000, gt=10)  # rows (train and test each) used by the estimators
    # retrain: the champion alias moves only when the new model's linear probe is significantly better on a
    # validation part of the train split (McNemar's exact test, one-sided); the test split is left for reporting
    promotion_alpha: float = Field(0.05, gt=0, lt=1)
    promotion_val_fraction: float = Field(0.2, gt=0, lt=1)  # of each class's train rows

    @model_validator(mode="before")
    @classmethod
    def _drop_retired(cls, data: Any) -> Any:
        """Accept and ignore keys that no longer mean anything (every earlier run's config.json names them)."""
        retired = sorted(_RETIRED_EVAL_KEYS.keys() & data.keys()) if isinstance(data, dict) else []
        for key in retired:
            log.warning("eval.%s is ignored: %s", key, _RETIRED_EVAL_KEYS[key])
        return {k: v for k, v in data.items() if k not in _RETIRED_EVAL_KEYS} if retired else data


# retired EvalConfig keys -> why they are ignored
_RETIRED_EVAL_KEYS = {
    key: "few-shot fine-tuning runs a fixed finetune_epochs schedule on the k shots per class, "
    "with no held-out labelled rows and no early stopping"
    for key in ("finetune_patience", "finetune_val_rows")
}


class TrackingConfig(_Frozen):
    """MLflow settings (used by flows/ only)."""

    enabled: bool = True
    experiment: str = Field("pretrain-and-probe", min_length=1)
    register_models: bool = True  # as `ae-repr-<dataset slug>-<variant>`; its first version gets the `champion` alias
    log_models: bool = True
    log_plots: bool = True  # upload the per-variant figures (the flow draws them under plots/<variant>/ either way)
    connect_timeout_s: float = Field(10.0, gt=0, le=30)  # at start: an unreachable server fails the run this fast
    retries: int = Field(5, ge=0, le=10)  # per write, mid-run; then the run goes on without tracking
    retry_backoff_s: float = Field(1.0, ge=0)  # first retry delay, doubled each time (capped at 16 s)
    flush_timeout_s: float = Field(300.0, gt=0)  # the longest the end of a run waits for queued writes


EXECUTORS = ("threads", "ray")
_RAY_ADDRESS = re.compile(r"(ray://)?[A-Za-z0-9_.\-]+:[0-9]{1,5}|\[[0-9A-Fa-f:]+\]:[0-9]{1,5}|auto")


class OrchestrationConfig(_Frozen):
    """Where the flow's task runs execute: threads of the flow's process, or a Ray cluster through prefect-ray."""

    executor: Literal["threads", "ray"] = "threads"
    # the cluster's head, HOST:PORT (GCS port) or ray://HOST:PORT (Ray Client); None: RAY_ADDRESS, else a local Ray
    ray_address: str | None = None
    # CPUs each task asks Ray for, and torch threads per task under either executor; None: 1 on Ray, and under
    # threads the process's cores shared by the task runs side by side
    cpus_per_task: int | None = Field(None, gt=0)

    @field_validator("ray_address")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None and not _RAY_ADDRESS.fullmatch(v.strip()):
            raise ValueError(f"{v!r} is not HOST:PORT, ray://HOST:PORT or auto")
        return None if v is None else v.strip()


class ExperimentConfig(_Frozen):
    """Everything one run of pretrain-and-probe needs."""

    data: DataConfig = Field(default_factory=DataConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    seed: int = 0

    def with_beta(self, beta: float) -> ExperimentConfig:
        """A copy whose beta_vae has KL weight `beta` and the sweep's step budget (one point of the rate-distortion sweep)."""
        d = self.model_dump()
        d["models"]["overrides"].setdefault("beta_vae", {})["beta"] = beta
        d["train"]["max_steps"] = max(1, round(self.eval.rd_budget * self.train.max_steps))
        return ExperimentConfig.model_validate(d)

    def with_overrides(
        self,
        *,
        dataset: str | None = None,
        variants: str | list[str] | tuple[str, ...] | None = None,
        epochs: int | None = None,
        latent_dim: int | None = None,
    ) -> ExperimentConfig:
        """A copy with the CLI's top-level overrides applied and validated; an error names the flag."""
        d = self.model_dump()
        given = {}
        for (section, key), value in zip(_OVERRIDE_FLAGS, (dataset, variants, epochs, latent_dim), strict=True):
            if value is not None:
                d[section][key] = given[section, key] = value
        try:
            return ExperimentConfig.model_validate(d)
        except ValidationError as e:
            loc = tuple(str(p) for p in e.errors()[0]["loc"])
            for (section, key), value in given.items():
                if loc[:2] == (section, key):
                    shown = ",".join(value) if isinstance(value, list | tuple) else value
                    msg = e.errors()[0]["msg"].removeprefix("Value error, ")
                    raise ConfigError(f"{_OVERRIDE_FLAGS[section, key]} {shown}: {msg}") from None
            raise ConfigError(f"options: {_first_error(e)}") from None

    def with_seeds(self, seeds: str | list[int] | tuple[int, ...] | None) -> ExperimentConfig:
        """A copy whose `train.seeds` is `seeds` (`--seeds 0,1,2`; None keeps the config's); an error names --seeds."""
        if seeds is None:
            return self
        try:
            return self.model_copy(update={"train": self.train.model_copy(update={"seeds": parse_seeds(seeds)})})
        except ValueError as e:
            shown = (seeds if isinstance(seeds, str) else ",".join(map(str, seeds))) or "''"
            raise ConfigError(f"--seeds {shown}: {e}") from None

    def with_orchestration(self, *, executor: str | None = None, ray_address: str | None = None) -> ExperimentConfig:
        """A copy with `--executor` / `--ray-address` applied and validated; an error names the flag."""
        given = {k: v for k, v in (("executor", executor), ("ray_address", ray_address)) if v is not None}
        if not given:
            return self
        try:
            return self.model_copy(update={"orchestration": OrchestrationConfig.model_validate(
                {**self.orchestration.model_dump(), **given})})
        except ValidationError as e:
            err = e.errors()[0]
            key = str(err["loc"][0]) if err["loc"] else "executor"
            flag = {"executor": "--executor", "ray_address": "--ray-address"}.get(key, key)
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{flag} {given.get(key, '')}: {msg}") from None

    def sha256(self, *sections: str) -> str:
        """Stable hash of the whole config or of the named sections."""
        d = self.model_dump(mode="json")
        if sections:
            d = {s: d[s] for s in sections}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        """Flattened `section.key` -> string, for MLflow params."""
        out: dict[str, str] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict) and v:
                for k, sub in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), sub)
            else:
                out[prefix] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)

        walk("", self.model_dump(mode="json"))
        return out


# the CLI flags that override config keys, in with_overrides' argument order
_OVERRIDE_FLAGS = {
    ("data", "dataset"): "--dataset",
    ("models", "variants"): "--variants",
    ("train", "epochs"): "--epochs",
    ("models", "latent_dim"): "--latent-dim",
}


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def validate_config(d: Any, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict as an ExperimentConfig; ConfigError with one line on failure."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(d).__name__}")
    try:
        return ExperimentConfig.model_validate(d)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_first_error(e)}") from None


def load_config(path: str | Path | None = None) -> ExperimentConfig:
    """Load a YAML experiment config (the packaged default when `path` is None)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    if not p.is_file():
        if path is None:  # an installed copy without configs/: the built-in defaults are the same
            return ExperimentConfig()
        raise ConfigError(f"config file not found: {p}")
    try:
        d = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: invalid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config ({e.__class__.__name__})") from None
    return validate_config(d, source=str(p))
