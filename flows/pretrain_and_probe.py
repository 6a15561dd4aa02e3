"""The `pretrain-and-probe` Prefect flow: a thin DAG over ae_repr (train, extract) and evaluation.

data → for each variant in parallel: train → extract → evaluate (probes, few-shot, reduction and the
applications); baselines → evaluate; the applications' model-free references; optionally a beta sweep
for the rate-distortion curve; each variant's figures under `plots/<variant>/`; then summary and report.
Tasks exchange paths and small dicts only; MLflow tracking goes through `flows.tracking`, whose recorder
the flow hands its callbacks from (the tasks never look it up).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.states import Completed, Failed, State
from prefect.task_runners import ThreadPoolTaskRunner

import ae_repr
from ae_repr.checkpoint import DESCRIPTION, WEIGHTS
from ae_repr.config import ExperimentConfig, load_config, validate_config
from ae_repr.data import Dataset, data_changed, load_dataset, parse_dataset_spec
from ae_repr.errors import DataError
from ae_repr.features import extract_features
from ae_repr.io import exclusive_lock, read_json, remove_torn_writes, sha256_file, write_json
from ae_repr.memory import check_dataset_fits
from ae_repr.seeds import Member, grid_members, pretraining_seeds
from ae_repr.train import train_variant
from evaluation import (
    BASELINES_NAME,
    SWEEP_NAME,
    drop_stale,
    evaluate_application_baselines,
    evaluate_beta_sweep,
    evaluate_representation,
    representations_dir,
    summarize,
    write_baselines,
)
from evaluation.variant_plots import variant_plots

from .crashed import settle_flow_run
from .executor import Executor, running_on, task_logging
from .plan import TASK_WORKERS, beta_sweep, threads_per_task, trainings_at_once
from .progress_log import epoch_reporter, task_started
from .tracking import Recorder, example_rows

FLOW_NAME = "pretrain-and-probe"
TIMINGS = "timings.json"
PINNED_DATA = "data.json"  # the data set a run started with (spec and content digest): every stage checks it
log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
EpochLog = Callable[[dict[str, float], int], None]  # the trainer's per-epoch metrics callback
EvalLog = Callable[[dict[str, float]], None]  # evaluation's metrics callback


class _ThreadTimeoutNote(logging.Filter):
    """Drops Prefect's warning that a timeout in a worker thread cannot interrupt blocking calls.

    It fires for every training task; the trainer's loop is Python between batches, where the
    timeout's exception does land.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "running in a worker thread" not in record.getMessage()


logging.getLogger("prefect.task_runs").addFilter(_ThreadTimeoutNote())


@functools.lru_cache(maxsize=4)
def _data(spec: str, test_fraction: float, seed: int, stamp: tuple[int, ...] | None = None) -> Dataset:
    # one load per process: the tasks of a flow run share it (threads), instead of each re-reading; `stamp` only
    # keys the cache (a changed data file is a new entry)
    return load_dataset(spec, test_fraction=test_fraction, seed=seed)


def _stamp(spec: str) -> tuple[int, ...] | None:
    """Modification times and sizes of a file-backed data set's files (None for the built-in ones)."""
    try:
        path = parse_dataset_spec(spec).path
        files = sorted(path.iterdir()) if path is not None and path.is_dir() else [path] if path is not None else []
        return tuple(x for f in files for x in (f.stat().st_mtime_ns, f.stat().st_size))
    except Exception:  # the load reports a bad spec or path itself
        return None


def data_for(cfg: ExperimentConfig, out: str | Path | None = None) -> Dataset:
    """The (process-cached) data set a config names; a data file changed since it was loaded is loaded again.

    With `out`, the run folder, the content must be the one the run started with (`data.json`, written by
    prepare-data): a stage never works on another version than the stages before it (DataChanged otherwise).
    """
    spec = cfg.data.dataset
    pinned = Path(out) / PINNED_DATA if out is not None else None
    start = read_json(pinned) if pinned is not None and pinned.is_file() else {}
    if start.get("dataset") != spec:
        return _data(spec, cfg.data.test_fraction, cfg.data.split_seed, _stamp(spec))
    try:
        data = _data(spec, cfg.data.test_fraction, cfg.data.split_seed, _stamp(spec))
    except DataError as e:  # unreadable now (being rewritten), though it was read at the start
        raise data_changed(spec, start["sha256"], f"unreadable: {str(e).splitlines()[0]}") from None
    if data.sha256 != start["sha256"]:
        raise data_changed(spec, start["sha256"], data.sha256)
    return data


class _Clock:
    """Busy seconds and wall span per phase (training, evaluation, tracking...), across task threads.

    A phase nested in another (tracking callbacks inside training) is subtracted from the outer one,
    so the phases add up to the work done.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self.reset()

    def reset(self) -> None:
        """Forget everything measured so far (one flow run at a time per process)."""
        with self._lock:
            self.started = time.time()
            self.busy: dict[str, float] = defaultdict(float)
            self.spans: dict[str, list[float]] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the time spent inside to `name`."""
        stack = self._local.__dict__.setdefault("stack", [])
        if not stack and (ctx := TaskRunContext.get()) is not None:  # a task run's body begins: say so
            task_started(str(ctx.task_run.id), ctx.task_run.name, name)
        stack.append(0.0)  # time spent in nested phases
        t0, w0 = time.perf_counter(), time.time()
        try:
            yield
        finally:
            elapsed, nested = time.perf_counter() - t0, stack.pop()
            if stack:
                stack[-1] += elapsed
            with self._lock:
                self.busy[name] += elapsed - nested
                span = self.spans.setdefault(name, [w0, w0])
                span[0], span[1] = min(span[0], w0), max(span[1], time.time())

    def wrap(self, name: str, fn: F | None) -> F | None:
        """`fn`, timed as `name` at every call (None stays None)."""
        if fn is None:
            return None

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(name):
                return fn(*args, **kwargs)

        return timed  # type: ignore[return-value]

    def __reduce__(self) -> tuple[Callable[[], _Clock], tuple[()]]:
        # a task's code shipped to a Ray worker names CLOCK: it unpickles as that process's own clock
        return _process_clock, ()

    def export(self) -> dict[str, list[float]]:
        """Per phase: [busy seconds, first start, last end] (wall clock), to be merged in another process."""
        with self._lock:
            return {k: [self.busy[k], s[0], s[1]] for k, s in self.spans.items()}

    def merge(self, phases: dict[str, list[float]]) -> None:
        """Add the phases another process measured (`export` of a Ray task's clock)."""
        with self._lock:
            for name, (busy, start, end) in phases.items():
                self.busy[name] += busy
                span = self.spans.setdefault(name, [start, end])
                span[0], span[1] = min(span[0], start), max(span[1], end)

    def summary(self) -> dict[str, Any]:
        """Seconds per phase: busy (summed over threads) and wall (first start to last end)."""
        with self._lock:
            return {
                "flow_started": self.started,
                "flow_s": round(time.time() - self.started, 3),
                "phases": {k: {"busy_s": round(self.busy[k], 3), "wall_s": round(s[1] - s[0], 3)}
                           for k, s in sorted(self.spans.items())},
            }


CLOCK = _Clock()


def _process_clock() -> _Clock:
    return CLOCK


def _identity(cfg: ExperimentConfig, variant: str) -> dict[str, Any]:
    """What a trained model depends on: its own model config, training, data, seed, package version."""
    return {
        "variant": variant,
        "model": cfg.models.model_config_for(variant).model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude={"timeout_s", "gpus_per_task"}),
        "data": cfg.data.model_dump(mode="json"),
        "data_sha256": data_for(cfg).sha256,
        "seed": cfg.seed,
        "version": ae_repr.__version__,
    }


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _train_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """Cache key of a training task: the variant's identity, the run folder and the model folder's name."""
    cfg: ExperimentConfig = params["cfg"]
    return _key({"task": "train", "out": str(Path(params["out"]).resolve()), "name": params.get("name"),
                 **_identity(cfg, params["variant"])})


def _extract_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """Cache key of an extraction task: the variant's identity and the checksum of the weights it encodes with."""
    cfg: ExperimentConfig = params["cfg"]
    desc = Path(params["model_dir"]) / DESCRIPTION
    weights = read_json(desc).get("weights_sha256") if desc.is_file() else None
    # a grid member's name: the same weights may also be written under the plain variant's name
    named = {"name": params["name"]} if params.get("name") else {}
    return _key({"task": "extract", "out": str(Path(params["out"]).resolve()), "weights": weights,
                 **named, **_identity(cfg, params["variant"])})


def _evaluate_key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    """Cache key of an evaluation task: the feature file's content, the eval config, seed and version."""
    cfg: ExperimentConfig = params["cfg"]
    path = Path(params["feature_path"])
    return _key({"task": "evaluate", "out": str(Path(params["out"]).resolve()), "name": params["name"],
                 "features": sha256_file(path) if path.is_file() else None,
                 "eval": cfg.eval.model_dump(mode="json"), "seed": cfg.seed, "version": ae_repr.__version__})


@task(name="prepare-data", task_run_name="prepare-data", retries=2, retry_delay_seconds=[1, 5])
def prepare_data(cfg: ExperimentConfig, out: str) -> dict[str, Any]:
    """Load and validate the data, record the config; returns the data's identity."""
    with CLOCK.phase("data"):
        data = data_for(cfg)
        check_dataset_fits(cfg, data=data, variants_at_once=trainings_at_once(cfg))
        write_json(Path(out) / "config.json", cfg.model_dump(mode="json"))
        info = {"dataset": data.name, "sha256": data.sha256, "rows": len(data), "shape": list(data.shape),
                "labels": data.labels is not None}
        write_json(Path(out) / PINNED_DATA, info)  # what every later stage checks its data against
    return info


@task(name="train", tags=["gpu"], persist_result=True, cache_key_fn=_train_key, task_run_name="train-{variant}")
def train_task(variant: str, cfg: ExperimentConfig, out: str, log_fn: EpochLog | None = None,
               name: str | None = None) -> str:
    """Train one variant into `models/<name or variant>`; returns its model folder."""
    with CLOCK.phase("training"), task_logging(log_fn):
        res = train_variant(variant, data_for(cfg, out), cfg, Path(out) / "models" / (name or variant),
                            log_fn=epoch_reporter(name or variant, CLOCK.wrap("tracking", log_fn)), progress=False)
    if res.skipped:
        get_run_logger().info("%s: already trained for this config, skipped", variant)
    elif res.resumed_from is not None:
        get_run_logger().info("%s: resumed from epoch %d", variant, res.resumed_from)
    return str(res.model_dir)


@task(name="extract", retries=2, retry_delay_seconds=[1, 5], persist_result=True, cache_key_fn=_extract_key,
      task_run_name="extract-{variant}")
def extract_task(variant: str, cfg: ExperimentConfig, out: str, model_dir: str,
                 metadata: dict[str, str] | None = None, name: str | None = None) -> str:
    """Write the variant's features to `features/<name or variant>.parquet` (with `metadata` in the file's
    metadata); returns the Parquet path."""
    with CLOCK.phase("extraction"):
        path = extract_features(model_dir, data_for(cfg, out), Path(out) / "features" / f"{name or variant}.parquet",
                                metadata=metadata)
    return str(path)


@task(name="baselines", task_run_name="baselines", retries=2, retry_delay_seconds=[1, 5])
def baselines_task(cfg: ExperimentConfig, out: str, features: list[str]) -> list[str]:
    """Write the baseline feature files (raw, PCA, ICA, random projection) at the width of this run's features."""
    with CLOCK.phase("evaluation"):
        paths = write_baselines(Path(out) / "features", cfg.eval, seed=cfg.seed, reference=Path(features[0]))
        return [str(p) for p in paths]


@task(name="evaluate", persist_result=True, cache_key_fn=_evaluate_key, task_run_name="evaluate-{name}")
def evaluate_task(name: str, feature_path: str, cfg: ExperimentConfig, out: str,
                  log_fn: EvalLog | None = None) -> str:
    """Every evaluation task for one representation; returns its tidy results file."""
    with CLOCK.phase("evaluation"):
        path = evaluate_representation(Path(feature_path), cfg.eval, eval_dir=representations_dir(Path(out)),
                                       seed=cfg.seed, log=CLOCK.wrap("tracking", log_fn))
    return str(path)


@task(name="variant-plots", task_run_name="plots-{variant}")
def plots_task(variant: str, cfg: ExperimentConfig, out: str, model_dir: str, feature_path: str,
               name: str | None = None) -> list[str]:
    """The variant's figures (loss curves, reconstructions, prior samples, latent map) under
    `plots/<name or variant>/`."""
    with CLOCK.phase("plots"):
        example, _ = example_rows(data_for(cfg, out))
        try:
            made = variant_plots(model_dir, example, feature_path, Path(out) / "plots" / (name or variant))
        except Exception as e:  # a figure must not cost the run its results
            get_run_logger().warning("%s: plots failed: %s: %s", variant, e.__class__.__name__, e)
            return []
    return [str(p) for p in made]


@task(name="application-baselines", persist_result=True, cache_key_fn=_evaluate_key,
      task_run_name="evaluate-{name}")
def application_baselines_task(name: str, feature_path: str, cfg: ExperimentConfig, out: str) -> str | None:
    """The model-free references of the application tasks (PCA, IsolationForest, mean image, real data)."""
    with CLOCK.phase("evaluation"):
        path = evaluate_application_baselines(Path(feature_path), cfg.eval, eval_dir=representations_dir(Path(out)),
                                              seed=cfg.seed)
    return None if path is None else str(path)


@task(name="beta-sweep", task_run_name="beta-sweep")
def beta_sweep_task(cfg: ExperimentConfig, out: str, feature_path: str, model_dirs: dict[float, str]) -> str:
    """Rate and distortion of the beta sweep's models."""
    with CLOCK.phase("evaluation"):
        return str(evaluate_beta_sweep(Path(feature_path), cfg.eval, {b: Path(p) for b, p in model_dirs.items()},
                                       eval_dir=representations_dir(Path(out)), seed=cfg.seed))


@task(name="summarize", task_run_name="summarize", retries=2, retry_delay_seconds=[1, 5])
def summarize_task(cfg: ExperimentConfig, out: str, names: list[str], failures: dict[str, str]) -> str:
    """summary.parquet, eval/<task>.parquet, report.md and plots over this run's representations."""
    with CLOCK.phase("evaluation"):
        # results of representations this run did not ask for (an earlier run's) must not reach the summary
        drop_stale(representations_dir(Path(out)), set(names) | set(failures))
        return str(summarize(Path(out), cfg.eval, failures=failures, seed=cfg.seed))


def resolve_config(config: ExperimentConfig | str | dict | None, **overrides: Any) -> ExperimentConfig:
    """The flow's `config` parameter (model, YAML path, dict or None) plus top-level overrides."""
    if config is None or isinstance(config, str):
        base = load_config(config)
    elif isinstance(config, dict):
        base = validate_config(config)
    else:
        base = config
    return base.with_overrides(**overrides)


def default_out(cfg: ExperimentConfig) -> Path:
    """`runs/<dataset>` under the working directory (the checkout, for deployment runs)."""
    return Path("runs") / cfg.data.dataset.replace(":", "_").replace("/", "_")






@flow(name=FLOW_NAME, task_runner=ThreadPoolTaskRunner(max_workers=TASK_WORKERS), log_prints=True)
def pretrain_and_probe(
    config: ExperimentConfig | str | None = None,
    dataset: str | None = None,
    variants: list[str] | str | None = None,
    epochs: int | None = None,
    latent_dim: int | None = None,
    out: str | None = None,
    seeds: list[int] | str | None = None,
    executor: Literal["threads", "ray"] | None = None,
    ray_address: str | None = None,
) -> State:
    """Pretrain every configured variant, extract features, evaluate them against baselines, report.

    Args:
        config: The experiment: an ExperimentConfig, a path to its YAML file, or none for configs/default.yaml.
        dataset: Data set overriding data.dataset: digits, dsprites, dsprites:N, idx:DIR or a .parquet, .csv,
            .npy or .npz file.
        variants: Variants to train, overriding models.variants: a list or a comma-separated string.
        epochs: Cap on training epochs, overriding train.epochs.
        latent_dim: Representation width K, overriding models.latent_dim.
        out: Run directory; runs/<dataset> under the working directory when not given. With the ray executor,
            storage every node of the cluster sees at the same path.
        seeds: Pretraining seeds, overriding train.seeds: a list or a comma-separated string. With more than one,
            every variant trains once per seed, named <variant>@seed=<s>, and the summary adds each variant's
            mean over the seeds with a 95% interval over them.
        executor: Where the task runs execute, overriding orchestration.executor: threads (of the flow run's
            process) or ray (a Ray cluster through prefect-ray; MLflow must then be a tracking server).
        ray_address: The Ray cluster's head as HOST:PORT, overriding orchestration.ray_address; else RAY_ADDRESS.
    """
    CLOCK.reset()
    cfg = resolve_config(config, dataset=dataset, variants=variants, epochs=epochs, latent_dim=latent_dim)
    cfg = cfg.with_seeds(seeds).with_orchestration(executor=executor, ray_address=ray_address)
    out_dir = Path(out or default_out(cfg)).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    # one run per folder, deployments too (`ae-repr run` holds the lock already: re-entrant); holding it, whatever
    # the folder's previous run left unfinished was killed, and is marked so
    with exclusive_lock(out_dir, "flow run"):
        settle_flow_run(out_dir, _flow_run()["id"])
        if torn := remove_torn_writes(out_dir):
            log.info("removed %d temporary files of writes a killed run left unfinished", len(torn))
        info = prepare_data(cfg, str(out_dir))
        with CLOCK.phase("tracking"):
            recorder = Recorder.start(cfg, out_dir, info, example_rows(data_for(cfg, out_dir))[0], flow_run=_flow_run())
        try:
            with running_on(cfg, out_dir, threads_per_task()) as ex:
                return _run(cfg, out_dir, recorder, ex)
        finally:
            recorder.abandon()  # a no-op after `finish`; ends the runs as FAILED when the flow body raised


def _run(cfg: ExperimentConfig, out_dir: Path, recorder: Recorder, ex: Executor) -> State:
    """The flow's body, with its recorder open."""
    logger = get_run_logger()
    members = grid_members(cfg)  # each variant once per pretraining seed (once, under its own name, without a grid)
    with CLOCK.phase("tracking"):
        runs = {m.name: recorder.start_variant(m.variant, name=m.name, seed=m.grid_seed) for m in members}

    # a deleted or never-written output is recomputed (and re-cached), never served stale from the cache
    trained = {m.name: _train(m.variant, m.cfg, out_dir, ex.train_logger(recorder, m.name),
                              m.name if m.in_grid else None, run_name=f"train-{m.name}") for m in members}
    # the sweep's models train with the first pretraining seed only
    sweep = {b: _train("beta_vae", members[0].cfg.with_beta(b), out_dir, None, f"beta_sweep/beta_{b:g}")
             for b in beta_sweep(cfg)}
    extracted = {m.name: _extract(m, out_dir, trained[m.name], runs[m.name]) for m in members}
    evaluated: dict[str, PrefectFuture] = {}
    failures: dict[str, str] = {}
    for v, fut in extracted.items():  # v: a member's name (its variant's, without a grid)
        fut.wait()
        if fut.state.is_completed():
            cached = [what for what, f in (("trained model", trained[v]), ("features", fut)) if f.state.name == "Cached"]
            if cached:
                logger.info("%s: %s served from the cache (same config, data and version)", v, " and ".join(cached))
            evaluated[v] = _evaluate(v, fut.result(), cfg, out_dir, ex.eval_logger(recorder, v))
        else:
            failures[v] = _reason(trained[v]) or _reason(fut) or fut.state.name
            logger.error("%s failed: %s", v, failures[v])
    learned = [extracted[v].result() for v in evaluated]
    if learned:
        baselines = baselines_task(cfg, str(out_dir), learned)
        for path in baselines:
            name = Path(path).stem
            evaluated[name] = _evaluate(name, path, cfg, out_dir, None)
        if cfg.eval.applications:
            missing = not (representations_dir(out_dir) / f"{BASELINES_NAME}.parquet").is_file()
            evaluated[BASELINES_NAME] = application_baselines_task.with_options(refresh_cache=missing).submit(
                BASELINES_NAME, learned[0], cfg, str(out_dir))
        if sweep:
            evaluated[SWEEP_NAME] = beta_sweep_task.submit(cfg, str(out_dir), learned[0], dict(sweep))
    for name, fut in evaluated.items():
        fut.wait()
        if not fut.state.is_completed():
            failures[name] = _reason(fut) or "evaluation failed"
            logger.error("evaluation of %s failed: %s", name, failures[name])
    # drawn after training and evaluation: beside them, their Python work held the GIL against training
    # one seed's figures per variant: the first seed's
    first = pretraining_seeds(cfg)[0]
    plots = [plots_task.submit(m.variant, cfg, str(out_dir), trained[m.name].result(), extracted[m.name].result(),
                               m.name if m.in_grid else None)
             for m in members if m.seed == first and m.name in evaluated and m.name not in failures]
    for fut in plots:
        fut.wait()
    summary = summarize_task(cfg, str(out_dir), [n for n in evaluated if n not in failures], failures)
    with CLOCK.phase("tracking"):
        if learned:
            recorder.log_results(failures)
        recorder.finish(failures)
    _artifacts(out_dir, recorder, failures)
    ex.collect(CLOCK, out_dir)
    timings = {**CLOCK.summary(), "executor": ex.name}
    write_json(out_dir / TIMINGS, timings)
    logger.info("summary: %s; report: %s; time per phase: %s", summary, out_dir / "report.md",
                ", ".join(f"{k} {v['busy_s']:.1f}s" for k, v in timings["phases"].items()))
    if not learned:
        return Failed(message=f"every variant failed: {failures}")
    if failures:
        return Failed(message="failed: " + "; ".join(f"{k}: {v}" for k, v in failures.items()))
    return Completed(message=str(summary), data=str(summary))


def planned_tasks(cfg: ExperimentConfig) -> list[str]:
    """The task runs a flow run over `cfg` submits when nothing fails, by name (what progress counts to)."""
    members, sweep, first = grid_members(cfg), beta_sweep(cfg), pretraining_seeds(cfg)[0]
    names = [m.name for m in members]
    return ["prepare-data", *(f"train-{n}" for n in names), *("train-beta_vae" for _ in sweep),
            *(f"extract-{n}" for n in names), "baselines",
            *(f"evaluate-{name}" for name in (*names, *cfg.eval.baselines)),
            *([f"evaluate-{BASELINES_NAME}"] if cfg.eval.applications else []), *(["beta-sweep"] if sweep else []),
            *(f"plots-{m.variant}" for m in members if m.seed == first), "summarize"]


def _train(variant: str, cfg: ExperimentConfig, out_dir: Path, log_fn: EpochLog | None,
           name: str | None = None, run_name: str | None = None) -> PrefectFuture:
    """Submit one training task (retrained when its model file is missing, never served stale from the cache)."""
    missing = not (out_dir / "models" / (name or variant) / WEIGHTS).is_file()
    named = {"task_run_name": run_name} if run_name else {}
    return train_task.with_options(timeout_seconds=cfg.train.timeout_s, refresh_cache=missing, **named).submit(
        variant, cfg, str(out_dir), log_fn, name)


def _extract(m: Member, out_dir: Path, trained: PrefectFuture, run_id: str | None) -> PrefectFuture:
    """Submit one member's extraction to `features/<name>.parquet` (recomputed when the file is missing)."""
    missing = not (out_dir / "features" / f"{m.name}.parquet").is_file()
    meta = {"mlflow_run_id": run_id} if run_id else {}
    if m.in_grid:
        meta["seed"] = str(m.seed)
    return extract_task.with_options(refresh_cache=missing, task_run_name=f"extract-{m.name}").submit(
        m.variant, m.cfg, str(out_dir), trained, meta or None, m.name if m.in_grid else None)




def _evaluate(name: str, feature_path: str, cfg: ExperimentConfig, out_dir: Path,
              log_fn: EvalLog | None) -> PrefectFuture:
    """Submit one representation's evaluation (recomputed when its results file is missing)."""
    missing = not (representations_dir(out_dir) / f"{name}.parquet").is_file()
    return evaluate_task.with_options(refresh_cache=missing).submit(name, feature_path, cfg, str(out_dir), log_fn)


def _reason(fut: PrefectFuture) -> str | None:
    """The failure message of a future's final state, if it failed."""
    state = fut.state
    if state.is_completed() or not state.is_final():
        return None
    try:
        state.result(raise_on_failure=True)
    except Exception as e:
        return f"{e.__class__.__name__}: {e}"
    return state.message


def headline_markdown(report: Path, failures: dict[str, str]) -> str:
    """The report's headline table, notes and failures (its plots are files, left out)."""
    text = report.read_text() if report.is_file() else "# Evaluation report\n\nNo report written."
    sections = text.split("\n## ")
    keep = [sections[0]] + [s for s in sections[1:] if not s.startswith("Plots")]
    md = "\n## ".join(keep).strip()
    if failures and "## Failed" not in md:
        md += "\n\n## Failed\n\n" + "\n".join(f"- **{k}**: {v}" for k, v in sorted(failures.items()))
    return md


def _flow_run() -> dict[str, str | None]:
    """The current Prefect flow run's id, name and deployment (None outside a flow run)."""
    try:
        from prefect.runtime import deployment, flow_run

        return {"id": flow_run.id, "name": flow_run.name, "deployment": deployment.name}
    except Exception:  # tracking must not depend on Prefect's runtime being there
        return {"id": None, "name": None, "deployment": None}


def _artifacts(out_dir: Path, recorder: Recorder, failures: dict[str, str]) -> None:
    """Prefect artifacts: the report's headline table and a link to the MLflow parent run."""
    create_markdown_artifact(markdown=headline_markdown(out_dir / "report.md", failures), key="headline-results",
                             description=f"pretrain-and-probe results in {out_dir}")
    if recorder.parent_url:
        create_link_artifact(link=recorder.parent_url, link_text="MLflow parent run", key="mlflow-run")
