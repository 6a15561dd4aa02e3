"""Path-in/path-out entry points: baselines, one representation's evaluation, the summary, and all of it.

The Prefect flow calls `write_baselines` once, `evaluate_representation` per feature file (in
parallel, each writing `representations_dir(out)/<name>.parquet` and `<name>.map.parquet`), then
`summarize` once. `evaluate_dir` does the same in one process (`ae-repr evaluate`).

`summarize` also scores chance (task `chance`, representation `majority_class`) from one labelled
feature file of the run, adds a seed grid's aggregate rows (each variant's mean over its `<variant>@seed=<s>`
members, `evaluation.seeds`), and writes `verdict.md`: the short verdict that opens `report.md`
(`evaluation.verdict`), which the flow also puts into its Prefect artifact and MLflow parent run.

Metric callback: `log` receives `{"eval/<task>/<metric>": value}` after each task (few-shot rows as
`eval/<task>/<metric>_k<k>`); `evaluate_dir` prefixes each key with `<representation>/`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from ae_repr.checkpoint import DESCRIPTION, load_model
from ae_repr.config import EvalConfig, TrainConfig
from ae_repr.errors import UserError
from ae_repr.io import META_PREFIX, FeatureFile, atomic_path, read_json, write_table
from ae_repr.memory import release_free_memory

from .app_plots import application_plots
from .applications import (
    APPLICATIONS,
    BASELINES_NAME,
    PICTURES_SUFFIX,
    application_baselines,
    applications_for,
    read_pictures,
    write_pictures,
)
from .baselines import write_baselines
from .context import TaskOutput, make_context
from .fewshot import fewshot_frozen, usable_k
from .finetune import arm_protocol, fewshot_finetune, fewshot_scratch
from .inputs import (
    BASELINE_NAMES,
    dataset_of,
    is_learned,
    label_problem,
    load_feature_dir,
    load_feature_file,
    model_dir,
)
from .plots import embed_2d, plot_fewshot, plot_latent_maps
from .probe import chance, knn, linear_probe
from .rate_distortion import rate_distortion
from .reduction import reduction
from .report import representation_order, write_report
from .results import concat_results, read_results, result_frame, write_results
from .seeds import first_seed_names, with_seed_aggregates, without_seed_rows
from .training import training_record
from .variant_plots import feature_file_plots
from .verdict import RunFacts, bottleneck_warning, verdict

logger = logging.getLogger(__name__)

LogFn = Callable[[dict[str, float]], None]
TASKS = ("linear_probe", "knn", "fewshot_frozen", "fewshot_finetune", "fewshot_scratch", "reduction")
MAP_SUFFIX = ".map.parquet"
SWEEP_NAME = "beta_sweep"  # the result file of `evaluate_beta_sweep`
VERDICT = "verdict.md"


class EvaluationFailed(RuntimeError):
    """Some representations failed at run time; the summary and report were still written."""


def representations_dir(out: Path) -> Path:
    """Where per-representation result tables live under a run directory."""
    return Path(out) / "eval" / "representations"


def metric_dict(frame: pd.DataFrame) -> dict[str, float]:
    """Result rows as flat metric names for a tracking callback."""
    out = {}
    for r in frame.itertuples(index=False):
        key = f"eval/{r.task}/{r.metric}" + ("" if pd.isna(r.k) else f"_k{int(r.k)}")
        out[key] = float(r.value)
    return out


RunFn = Callable[[str, Callable[[], pd.DataFrame]], None]


def _runner(name: str, frames: list[pd.DataFrame], log: LogFn | None) -> RunFn:
    """`run(task, fn)`: time one task of `name`, keep its rows in `frames`, log them and pass them to `log`."""

    def run(task: str, fn: Callable[[], pd.DataFrame]) -> None:
        start = time.perf_counter()
        logger.debug("%s: %s started", name, task, extra={"eval_task": task})  # `eval_task`: for progress displays
        frame = fn()
        release_free_memory()  # what the task freed: a task beside it in another thread would stack on its peak
        frames.append(frame)
        logger.info("%s: %s done in %.2fs (%d rows)", name, task, time.perf_counter() - start, len(frame),
                    extra={"eval_task": task})
        if log is not None and len(frame):
            log(metric_dict(frame))

    return run


def evaluate_representation(
    feature_path: Path, cfg: EvalConfig, *, eval_dir: Path, seed: int = 0, log: LogFn | None = None
) -> Path:
    """Run every applicable task on one feature file; write `eval_dir/<name>.parquet` (tidy rows) and its 2-D map."""
    ff = load_feature_file(feature_path)
    eval_dir = Path(eval_dir)
    frames: list[pd.DataFrame] = []
    notes: list[str] = []
    run = _runner(ff.name, frames, log)
    has_model = is_learned(ff) and _has_model(ff)
    problem = label_problem(ff)
    if problem:
        notes.append(f"{ff.name}: linear_probe, knn and few-shot tasks not run: {problem}.")
        logger.warning("%s: label tasks skipped: %s", ff.name, problem)
    else:
        run("linear_probe", lambda: linear_probe(ff, cfg, seed=seed))
        run("knn", lambda: knn(ff, cfg, seed=seed))
        _, skipped, smallest = usable_k(ff, cfg)
        if skipped:
            ks = ", ".join(map(str, skipped))
            notes.append(
                f"{ff.name}: few-shot k = {ks} skipped (the smallest train class has {smallest} examples)."
            )
        run("fewshot_frozen", lambda: fewshot_frozen(ff, cfg, seed=seed))
        if cfg.fewshot_finetune and is_learned(ff):
            if has_model:
                run("fewshot_finetune", lambda: fewshot_finetune(ff, cfg, seed=seed))
                run("fewshot_scratch", lambda: fewshot_scratch(ff, cfg, seed=seed))
                notes.append(f"{ff.name}: {arm_protocol(ff, cfg)}")
            else:
                notes.append(
                    f"{ff.name}: fewshot_finetune/fewshot_scratch not run: no model directory ({ff.meta.get('model_dir', 'no model_dir')})."
                )
    run("reduction", lambda: reduction(ff, cfg, seed=seed))
    if has_model:
        record, note = training_record(ff.name, model_dir(ff))
        run("training", lambda: record)
        notes.append(note)
    needs_model = [t for t in cfg.applications if APPLICATIONS[t][0]]
    if needs_model and is_learned(ff) and not has_model:
        notes.append(f"{ff.name}: {', '.join(needs_model)} not run: they need the model, and there is none.")
    loaded = load_model(model_dir(ff)) if cfg.applications and has_model else None
    train_cfg = TrainConfig.model_validate(loaded.meta.get("train_config", {})) if loaded else None
    tasks = applications_for(
        ff, cfg, loaded=loaded, train_cfg=train_cfg, seed=seed, work_dir=eval_dir.parent / "work" / ff.name
    )
    pictures = _run_applications(tasks, run, notes)
    write_pictures(eval_dir / f"{ff.name}{PICTURES_SUFFIX}", pictures)
    _write_map(ff, cfg, eval_dir, seed)
    return write_results(eval_dir / f"{ff.name}.parquet", concat_results(frames), notes=notes)


def _run_applications(
    tasks: list[tuple[str, Callable[[], TaskOutput]]], run: RunFn, notes: list[str]
) -> dict[str, np.ndarray]:
    """Run application tasks through `run` (timing, logging, rows); collect their pictures and notes."""
    pictures: dict[str, np.ndarray] = {}

    def rows_of(thunk: Callable[[], TaskOutput]) -> pd.DataFrame:
        out = thunk()
        pictures.update(out.pictures)
        notes.extend(out.notes)
        return out.frame

    for task, thunk in tasks:
        run(task, partial(rows_of, thunk))
    return pictures


def evaluate_application_baselines(
    feature_path: Path, cfg: EvalConfig, *, eval_dir: Path, seed: int = 0, log: LogFn | None = None
) -> Path | None:
    """The model-free references of the application tasks (PCA, IsolationForest, mean image, real data)
    at the width of `feature_path`'s representation; writes `eval_dir/application_baselines.parquet`."""
    ff = load_feature_file(feature_path)
    eval_dir = Path(eval_dir)
    path = eval_dir / f"{BASELINES_NAME}.parquet"
    tasks = application_baselines(ff, cfg, k=len(ff.z_columns), seed=seed)
    if not tasks:
        path.unlink(missing_ok=True)
        write_pictures(eval_dir / f"{BASELINES_NAME}{PICTURES_SUFFIX}", {})
        return None
    frames: list[pd.DataFrame] = []
    notes: list[str] = []
    pictures = _run_applications(tasks, _runner(BASELINES_NAME, frames, log), notes)
    write_pictures(eval_dir / f"{BASELINES_NAME}{PICTURES_SUFFIX}", pictures)
    return write_results(path, concat_results(frames), notes=notes)


def _has_model(ff: FeatureFile) -> bool:
    mdir = model_dir(ff)
    if mdir is None or not mdir.is_dir():
        logger.warning("%s: model directory %s not found; end-to-end few-shot arms skipped", ff.name, mdir)
        return False
    return True


def _write_map(ff: FeatureFile, cfg: EvalConfig, eval_dir: Path, seed: int) -> None:
    path = eval_dir / f"{ff.name}{MAP_SUFFIX}"
    start = time.perf_counter()
    coords = embed_2d(ff, cfg, seed=seed)
    if coords is None:
        path.unlink(missing_ok=True)  # a map from an earlier run would be stale
        return
    write_table(path, coords)
    logger.info(
        "%s: 2-D map (%s, %d rows) in %.2fs",
        ff.name,
        cfg.map_method,
        len(coords),
        time.perf_counter() - start,
    )


def evaluate_beta_sweep(
    feature_path: Path, cfg: EvalConfig, model_dirs: dict[float, Path], *, eval_dir: Path, seed: int = 0
) -> Path:
    """Rate and distortion of beta_vae models trained at several betas, as representations
    `beta_vae@beta=<b>` in `eval_dir/beta_sweep.parquet` (the rows and splits of `feature_path`)."""
    ff = load_feature_file(feature_path)
    frames, notes, trained = [], [], []
    for beta, mdir in sorted(model_dirs.items()):
        loaded = load_model(mdir)
        ctx = replace(make_context(ff, cfg, loaded=loaded, seed=seed), name=f"beta_vae@beta={beta:g}")
        out = rate_distortion(ctx)
        frames.append(out.frame)
        notes += out.notes
        trained.append(f"beta {beta:g}: {loaded.meta.get('steps')} steps, stopped on {loaded.meta.get('stopped_on')}")
    notes.append(f"beta sweep: each beta_vae@beta=<b> trained within eval.rd_budget = {cfg.rd_budget:g} of "
                 f"train.max_steps on the same plateau rule ({'; '.join(trained)}).")
    return write_results(Path(eval_dir) / f"{SWEEP_NAME}.parquet", concat_results(frames), notes=notes)


def summarize(
    out: Path,
    cfg: EvalConfig,
    *,
    failures: dict[str, str] | None = None,
    eval_dir: Path | None = None,
    features_dir: Path | None = None,
    seed: int = 0,
) -> Path:
    """Gather per-representation results into `out/eval/<task>.parquet`, `out/summary.parquet`, plots,
    `out/verdict.md` and `out/report.md` (feature files, for chance and the verdict's facts: `out/features`)."""
    out = Path(out)
    eval_dir = Path(eval_dir) if eval_dir is not None else representations_dir(out)
    features_dir = Path(features_dir) if features_dir is not None else out / "features"
    failures = dict(failures or {})
    paths = (
        sorted(p for p in eval_dir.glob("*.parquet") if not p.name.endswith(MAP_SUFFIX))
        if eval_dir.is_dir()
        else []
    )
    frames, notes, maps = [], [], {}
    names = []
    for p in paths:
        if p.stem in failures:  # a result file from an earlier run must not stand in for a failed one
            continue
        names.append(p.stem)
        frame, file_notes = read_results(p)
        frames.append(frame)
        notes += file_notes
        map_path = eval_dir / f"{p.stem}{MAP_SUFFIX}"
        if map_path.is_file():
            maps[p.stem] = pd.read_parquet(map_path)
    facts, reference = run_facts(features_dir, names)
    if reference is not None and label_problem(reference) is None:
        frames.append(chance(reference, cfg, seed=seed))
    results = concat_results(frames)
    # a failed representation has no rows, even where another file (the application baselines) scored it
    results = results[~results["representation"].isin(list(failures))]
    results = _sorted(with_seed_aggregates(results))  # a seed grid's variants: their means over the seeds
    for task in sorted(set(TASKS) | set(results["task"])):
        task_path = out / "eval" / f"{task}.parquet"
        rows = results[results["task"] == task]
        if len(rows):
            write_results(task_path, rows)
        else:
            task_path.unlink(missing_ok=True)
    summary = write_results(out / "summary.parquet", results)
    plots = []
    shown = first_seed_names(names)  # a seed grid's figures: of each variant's first seed (its means: the tables)
    headline = without_seed_rows(results)
    for name, draw in (
        ("latent_maps.png", lambda p: plot_latent_maps({n: m for n, m in maps.items() if n in shown}, p)),
        ("fewshot.png", lambda p: plot_fewshot(headline, p)),
    ):
        made = draw(out / "plots" / name)
        if made is None:
            (out / "plots" / name).unlink(missing_ok=True)
        else:
            plots.append(made)
    pictures = read_pictures(
        [eval_dir / f"{n}{PICTURES_SUFFIX}" for n in shown if (eval_dir / f"{n}{PICTURES_SUFFIX}").is_file()]
    )
    plots += application_plots(pictures, headline, out / "plots", betas=model_betas(features_dir, shown))
    plots += [p for n in names for p in sorted((out / "plots" / n).glob("*.png"))]  # each variant's own figures
    warning = bottleneck_warning(facts)
    if warning:
        logger.warning("%s", warning)
    _write_verdict_and_report(out, results, cfg, facts, plots=plots, notes=notes, failures=failures)
    logger.info("summary: %d rows from %d representations -> %s", len(results), len(frames), summary)
    return summary


def _write_verdict_and_report(
    out: Path, results: pd.DataFrame, cfg: EvalConfig, facts: RunFacts, *, plots: list[Path], notes: list[str],
    failures: dict[str, str],
) -> Path:
    """`out/verdict.md` and `out/report.md` from the results; returns the report's path."""
    text = verdict(results, facts)
    with atomic_path(out / VERDICT) as tmp:
        tmp.write_text(text + "\n")
    logger.info("verdict: %s", text)
    return write_report(out / "report.md", results, cfg, plots=plots, notes=_grouped(notes), failures=failures,
                        verdict=text)


def rerender_report(out: Path, cfg: EvalConfig) -> Path:
    """Write `out/verdict.md` and `out/report.md` again from `out/summary.parquet`, the notes of `out`'s result
    files and the plots already drawn; nothing is evaluated or drawn. Returns the report's path."""
    out = Path(out)
    results, _ = read_results(out / "summary.parquet")
    eval_dir = representations_dir(out)
    # the result files summarize read its notes from, in its order; those of representations not in the summary
    # (failed) are left out
    shown = set(results["representation"])
    paths = [p for p in sorted(eval_dir.glob("*.parquet")) if not p.name.endswith(MAP_SUFFIX)
             and (p.stem in shown or p.stem in (BASELINES_NAME, SWEEP_NAME))] if eval_dir.is_dir() else []
    names = [p.stem for p in paths]
    notes = [n for p in paths for n in read_results(p)[1]]
    plots = sorted((out / "plots").glob("*.png")) + [
        p for name in names for p in sorted((out / "plots" / name).glob("*.png"))
    ]
    facts, _ = run_facts(out / "features", names)
    return _write_verdict_and_report(out, results, cfg, facts, plots=plots, notes=notes, failures={})


def run_facts(features_dir: Path, names: list[str]) -> tuple[RunFacts, FeatureFile | None]:
    """The data set, latent width K and input width D of a run's feature files, and one of them to score chance on
    (learned where there is one; never `raw`, the widest, unless it is alone). Only that one is read in full."""
    widths: dict[str, tuple[int, bool]] = {}  # name -> (z columns, learned)
    for name in names:
        path = Path(features_dir) / f"{name}.parquet"
        try:
            schema = pq.read_schema(path)
        except (OSError, ValueError):  # missing or not Parquet: not a feature file of this run
            continue
        meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        variant = meta.get(f"{META_PREFIX}variant", name)
        learned = f"{META_PREFIX}model_dir" in meta or variant not in BASELINE_NAMES
        widths[name] = (sum(c.startswith("z_") for c in schema.names), learned)
    order = sorted(widths, key=lambda n: (not widths[n][1], n == "raw"))
    reference = None
    for name in order:
        try:
            reference = load_feature_file(Path(features_dir) / f"{name}.parquet")
            break
        except UserError:
            continue
    if reference is None:
        return RunFacts(), None
    learned_k = [k for k, learned in widths.values() if learned]
    input_dim = widths["raw"][0] if "raw" in widths and not widths["raw"][1] else _input_dim(reference)
    return RunFacts(reference.meta.get("dataset"), learned_k[0] if learned_k else None, input_dim), reference


def model_betas(features_dir: Path, names: list[str]) -> dict[str, float]:
    """{variant: beta} of the feature files `names` whose model has a `beta`, read from the model's own
    `config.json` (what it was trained with, the run's overrides applied); a seed grid's members share theirs."""
    betas: dict[str, float] = {}
    for name in names:
        path = Path(features_dir) / f"{name}.parquet"
        try:
            meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
        except (OSError, ValueError):  # missing or not Parquet: not a feature file of this run
            continue
        rel = meta.get(f"{META_PREFIX}model_dir")
        if not rel:
            continue
        try:
            beta = read_json(path.parent / rel / DESCRIPTION).get("model_config", {}).get("beta")
            if beta is not None:
                betas[meta.get(f"{META_PREFIX}variant", name)] = float(beta)
        except (OSError, ValueError, TypeError, AttributeError):  # no readable model description: beta unknown
            continue
    return betas


def _input_dim(ff: FeatureFile) -> int | None:
    """The flattened input width of the data set behind `ff`, or None when it cannot be loaded."""
    try:
        ds, _ = dataset_of(ff)
    except (UserError, OSError, ValueError):
        return None
    return int(np.prod(ds.x.shape[1:]))


def _grouped(notes: list[str]) -> list[str]:
    """'a: why' and 'b: why' become 'a, b: why' (a label-free data set gives every file the same note)."""
    by_text: dict[str, list[str]] = {}
    for note in notes:
        name, sep, text = note.partition(": ")
        by_text.setdefault(text if sep else note, []).append(name if sep else "")
    return [
        f"{', '.join(n for n in names if n)}: {text}" if any(names) else text
        for text, names in by_text.items()
    ]


def _sorted(results: pd.DataFrame) -> pd.DataFrame:
    """Representations in report order, tasks in TASKS order; rows within a task keep the task's own order."""
    order = {n: i for i, n in enumerate(representation_order(list(results["representation"].unique())))}
    task_order = {t: i for i, t in enumerate(TASKS)}
    key = pd.DataFrame(
        {
            "r": results["representation"].map(order),
            "t": results["task"].map(lambda t: task_order.get(t, len(TASKS))),
            "task": results["task"],
        }
    )
    return result_frame(results.loc[key.sort_values(["r", "t", "task"], kind="stable").index])


def evaluate_dir(
    features_dir: Path, out: Path, cfg: EvalConfig, *, seed: int = 0, log: LogFn | None = None
) -> Path:
    """Write baselines, evaluate every feature file, then summarize; returns `out/summary.parquet`."""
    features_dir, out = Path(features_dir), Path(out)
    write_baselines(features_dir, cfg, seed=seed)
    files = load_feature_dir(features_dir)
    for ff in files:  # a corrupt model should fail now, before any output, not halfway through
        mdir = model_dir(ff)
        if mdir is not None and mdir.is_dir():
            load_model(mdir)
    eval_dir = representations_dir(out)
    drop_stale(eval_dir, {ff.name for ff in files} | {BASELINES_NAME, SWEEP_NAME})
    failures: dict[str, str] = {}
    start = time.perf_counter()
    for ff in files:
        (eval_dir / f"{ff.name}.parquet").unlink(missing_ok=True)
        cb = None if log is None else _prefixed(log, ff.name)
        try:
            evaluate_representation(ff.path, cfg, eval_dir=eval_dir, seed=seed, log=cb)
        except UserError:
            raise
        except Exception as e:  # one broken representation must not hide the others' results
            logger.exception("%s: evaluation failed", ff.name)
            failures[ff.name] = f"{type(e).__name__}: {e}"
    # the model-free references only make sense beside a model to compare with
    with_model = [ff for ff in files if is_learned(ff) and (m := model_dir(ff)) is not None and m.is_dir()]
    for ff in with_model:
        try:
            feature_file_plots(ff, out / "plots" / ff.name)
        except Exception as e:  # a figure must not cost the run its results
            logger.warning("%s: plots failed: %s: %s", ff.name, type(e).__name__, e)
    if with_model and cfg.applications:
        try:
            evaluate_application_baselines(with_model[0].path, cfg, eval_dir=eval_dir, seed=seed)
        except UserError:
            raise
        except Exception as e:
            logger.exception("application baselines failed")
            failures[BASELINES_NAME] = f"{type(e).__name__}: {e}"
    summary = summarize(out, cfg, failures=failures, eval_dir=eval_dir, features_dir=features_dir, seed=seed)
    logger.info("evaluated %d representations in %.1fs", len(files), time.perf_counter() - start)
    if failures:
        raise EvaluationFailed(
            f"evaluation failed for {', '.join(sorted(failures))} (see {out / 'report.md'})"
        )
    return summary


def drop_stale(eval_dir: Path, keep: set[str]) -> None:
    """Remove per-representation files (results, maps, pictures) of representations not in `keep`."""
    for path in eval_dir.glob("*.*") if eval_dir.is_dir() else ():
        if path.is_file() and path.name.split(".", 1)[0] not in keep:
            path.unlink()


def _prefixed(log: LogFn, name: str) -> LogFn:
    return lambda metrics: log({f"{name}/{k}": v for k, v in metrics.items()})
