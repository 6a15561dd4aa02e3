"""The `ae-repr` command line: run, train, extract, evaluate, compare, log-run.

The one module of the library allowed to import everything (the flows, Prefect, MLflow): it also prints
what a run produced.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from .errors import UserError

if TYPE_CHECKING:  # imported lazily at run time: the CLI starts fast
    from .config import ExperimentConfig

PROG = "ae-repr"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # SUPPRESS on subcommands, so `ae-repr --debug train ...` is not reset by the subcommand's default
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="show tracebacks and debug logging")


def _data_opts(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--dataset",
        required=required,
        metavar="D",
        help="digits (default) | dsprites | dsprites:N | idx:DIR | a .parquet/.csv/.npy/.npz file",
    )


def _train_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("--epochs", type=int, metavar="N", help="cap on training epochs (overrides train.epochs; training "
                   "stops earlier when the validation objective plateaus or at train.max_steps)")
    p.add_argument("--latent-dim", type=int, metavar="K", help="representation width (overrides models.latent_dim)")


def application_names() -> tuple[str, ...]:
    """The application tasks `eval.applications` accepts, in the config's order."""
    from typing import get_args

    from .config import EvalConfig

    item = get_args(EvalConfig.model_fields["applications"].annotation)[0]  # tuple[Literal[...], ...]
    return get_args(item)


def parse_applications(value: str) -> tuple[str, ...]:
    """`--applications`: a comma list of application tasks, or `none`; an unknown name is a usage error."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if [n.lower() for n in names] == ["none"]:
        return ()
    if "none" in (n.lower() for n in names):
        raise argparse.ArgumentTypeError(f"{value}: none stands alone, not beside tasks")
    known = application_names()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{','.join(unknown) or repr(value)}: not an application task; choose "
                                         f"from {','.join(known)} or none")
    return tuple(dict.fromkeys(names))  # in the given order, each once


def _applications_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--applications", type=parse_applications, metavar="a,b,..|none",
                   help="application tasks to run, overriding eval.applications: a comma list of anomaly, "
                   "inpainting, generation, augmentation, rate_distortion, disentanglement, or none")


def _executor_opts(p: argparse.ArgumentParser) -> None:
    from .config import EXECUTORS

    p.add_argument("--executor", choices=EXECUTORS, help="where the task runs execute, overriding "
                   "orchestration.executor: threads (default, in this process) or ray (a Ray cluster; MLflow must "
                   "be a tracking server, the run folder on storage every node sees)")
    p.add_argument("--ray-address", metavar="HOST:PORT", help="the Ray cluster's head, overriding "
                   "orchestration.ray_address (else RAY_ADDRESS, else a local Ray for the run)")


def with_applications(cfg: ExperimentConfig, applications: tuple[str, ...] | None) -> ExperimentConfig:
    """`cfg` with `eval.applications` replaced when --applications was given."""
    if applications is None:
        return cfg
    from .config import ExperimentConfig

    d = cfg.model_dump()
    d["eval"]["applications"] = applications
    return ExperimentConfig.model_validate(d)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    from .variants import variant_names

    names = variant_names()  # built-ins and installed plug-ins
    top = _Parser(prog=PROG, description="Pretrain autoencoder variants, extract their features, measure them.")
    _common(top, top=True)
    sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("run", help="the whole pretrain-and-probe flow in-process",
                       description="Run the pretrain-and-probe flow: train every variant, extract features, "
                       "compute baselines and every evaluation, write summary.parquet and report.md, track in MLflow. "
                       "Uses an ephemeral Prefect API unless PREFECT_API_URL is set; MLflow at MLFLOW_TRACKING_URI, "
                       "else a local SQLite store.")
    _train_opts(p)
    _data_opts(p)
    p.add_argument("--variants", metavar="a,b,..", help=f"comma-separated subset of: {','.join(names)}")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<dataset>)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument("--seeds", metavar="s,t,..", help="pretraining seeds, overriding train.seeds: with more than one, "
                   "every variant trains once per seed (as <variant>@seed=<s>) and the report shows the mean over "
                   "seeds with its 95%% interval")
    _applications_opt(p)
    _executor_opts(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress display and no informational lines; warnings, errors and the outputs remain")
    _common(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="train one variant; writes DIR/models/V/",
                       description="Train one variant on the train split. Re-running the same command after a "
                       "crash resumes from the last completed epoch.")
    p.add_argument("--variant", required=True, metavar="V", help=f"one of: {', '.join(names)}")
    _data_opts(p)
    _train_opts(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; the model goes to DIR/models/V/")
    _common(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("extract", help="write a trained encoder's features to DIR/features/V.parquet",
                       description="Encode every row (train and test) of a data set with a trained model.")
    p.add_argument("--model", required=True, metavar="DIR/models/V", help="a model directory written by train")
    _data_opts(p)
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; writes DIR/features/V.parquet")
    p.add_argument("--batch-size", type=int, default=4096, metavar="B", help="inference batch size (default 4096)")
    _common(p)
    p.set_defaults(func=_cmd_extract)

    p = sub.add_parser("evaluate", help="baselines, probes, few-shot, reduction; summary and report",
                       description="Evaluate every feature file in a folder: writes baselines to the same folder, "
                       "DIR/eval/, DIR/summary.parquet, DIR/report.md and DIR/plots/.")
    p.add_argument("--features", required=True, metavar="DIR/features", help="folder of feature Parquet files")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory for eval/, summary, report, plots")
    p.add_argument("--config", metavar="FILE", help="experiment YAML whose eval section is used")
    _applications_opt(p)
    _common(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("compare", help="variants and baselines x headline metrics across recent runs, from MLflow",
                       description="Read the last N pretrain-and-probe runs back from MLflow (MLFLOW_TRACKING_URI, "
                       "else the local SQLite store) and print one row per variant or baseline and run with its data "
                       "set and headline metrics, each with its 95% interval where one was logged.")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: pretrain-and-probe)")
    p.add_argument("--last", type=int, default=5, metavar="N", help="how many recent flow runs (default 5)")
    p.add_argument("--dataset", metavar="D", help="only runs on this data set (as given to --dataset)")
    p.add_argument("--wide", action="store_true", help="every column, even where the terminal is narrower")
    p.add_argument("--format", choices=("table", "csv"), default="table",
                   help="table (default) or csv: the table with every number and run id as CSV on stdout")
    p.add_argument("--csv", metavar="FILE", help="also write the table (with run ids) as CSV")
    _common(p)
    p.set_defaults(func=_cmd_compare)

    p = sub.add_parser("report", help="write DIR/report.md and DIR/verdict.md again from DIR/summary.parquet",
                       description="Re-render a run directory's report.md and verdict.md from its summary.parquet, "
                       "result notes and plots, with the eval settings of its config.json (else --config, else the "
                       "defaults). Nothing is evaluated again.")
    p.add_argument("dir", metavar="DIR", help="a run directory holding summary.parquet")
    p.add_argument("--config", metavar="FILE", help="experiment YAML for a DIR without config.json")
    _common(p)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("log-run", help="upload a finished run directory to MLflow",
                       description="Upload a run directory written by `ae-repr run` (tracking off, or MLflow down "
                       "mid-run: see OUT/tracking_pending.json) with everything a live run records: parent and "
                       "variant runs, params, per-epoch and eval metrics, plots, features and registered models.")
    p.add_argument("out", metavar="OUT", help="the run directory (holds config.json, models/, summary.parquet)")
    p.add_argument("--experiment", metavar="NAME", help="MLflow experiment (default: the run's tracking.experiment)")
    _common(p)
    p.set_defaults(func=_cmd_log_run)
    return top


def _out_dir(path: str, created: list[Path]) -> Path:
    """Check --out is a writable folder (creating it if needed, remembered for clean-up on failure)."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(f"--out {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: {parent} is not writable")
    try:
        if not out.exists():
            # remember the topmost folder this creates, so a failure removes every level of it
            created.append(out if parent == out.parent else next(p for p in out.parents if p.parent == parent))
            out.mkdir(parents=True)
        tempfile.TemporaryFile(dir=out).close()  # root passes os.access on read-only places like /proc
    except OSError as e:
        raise UserError(f"--out {path}: cannot write there ({e.strerror or e.__class__.__name__})") from None
    return out


def _load_cfg(args: argparse.Namespace):  # -> ExperimentConfig
    from .config import load_config

    cfg = load_config(args.config)
    return cfg.with_overrides(
        dataset=getattr(args, "dataset", None),
        variants=getattr(args, "variants", None),
        epochs=getattr(args, "epochs", None),
        latent_dim=getattr(args, "latent_dim", None),
    )


def _load_data(cfg):  # -> Dataset
    from .data import load_dataset

    return load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed)


def _cmd_train(args: argparse.Namespace, created: list[Path]) -> int:
    from .train import train_variant
    from .variants import variant_names

    if args.variant not in variant_names():
        raise UserError(f"--variant {args.variant!r}: unknown; choose from {', '.join(variant_names())}")
    cfg = _load_cfg(args).with_overrides(variants=[args.variant])
    from .memory import check_dataset_fits

    sized = check_dataset_fits(cfg)  # from the data's headers: a run that cannot fit writes nothing
    out = _out_dir(args.out, created)
    data = _load_data(cfg)
    if sized is None:  # headers that do not tell the size (a CSV file): from the data, before training
        check_dataset_fits(cfg, data=data)
    res = train_variant(args.variant, data, cfg, out / "models" / args.variant)
    if res.skipped:
        print(f"{args.variant}: already trained with this config: {res.model_dir}")
    else:
        from .checkpoint import DESCRIPTION
        from .io import read_json

        meta = read_json(res.model_dir / DESCRIPTION)
        best = ", ".join(f"{k} {v:.4g}" for k, v in meta["best_val"].items() if k in ("elbo", "recon"))
        print(f"{args.variant}: trained {meta['steps']} steps ({meta['epochs_run']} epochs), stopped on "
              f"{meta['stopped_on']}; kept epoch {meta['best_epoch']} (validation {best or 'n/a'}) -> {res.model_dir}")
    return 0


def _cmd_extract(args: argparse.Namespace, created: list[Path]) -> int:
    from .checkpoint import load_model
    from .data import load_dataset
    from .features import extract_features

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
    loaded = load_model(args.model)
    out = _out_dir(args.out, created)
    spec = args.dataset or loaded.meta.get("dataset", "digits")
    split = loaded.meta.get("split", {})  # the split the model was trained with, so features line up with it
    data = load_dataset(spec, test_fraction=split.get("test_fraction", 0.25), seed=split.get("seed", 0))
    path = extract_features(args.model, data, out / "features" / f"{loaded.variant}.parquet", batch_size=args.batch_size)
    print(f"{loaded.variant}: {len(data)} rows x {loaded.model.latent_dim} features -> {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace, created: list[Path]) -> int:
    from evaluation import evaluate_dir

    from .config import load_config

    cfg = with_applications(load_config(args.config), args.applications)
    features = Path(args.features)
    if not features.is_dir():
        raise UserError(f"--features {args.features}: not a folder")
    out = _out_dir(args.out, created)
    summary = evaluate_dir(features, out, cfg.eval, seed=cfg.seed)
    print(f"summary: {summary}\nreport:  {out / 'report.md'}")
    return 0


def _check_dataset(spec: str) -> None:
    """Reject a data set spec that names nothing, without loading it (no temporary API is booted for it)."""
    from .data import parse_dataset_spec
    from .errors import DataError

    parsed = parse_dataset_spec(spec)
    if parsed.path is not None and not parsed.path.exists():
        raise DataError(f"{parsed.path}: {'no such directory' if parsed.kind == 'idx' else 'no such file'}")


def _cmd_run(args: argparse.Namespace, created: list[Path]) -> int:
    cfg = with_applications(_load_cfg(args), args.applications).with_seeds(args.seeds)
    cfg = cfg.with_orchestration(executor=args.executor, ray_address=args.ray_address)
    _check_dataset(cfg.data.dataset)
    from flows.early_api import api_booting

    with api_booting() as api_ready:  # the temporary Prefect API boots while the checks below import and load
        return _checked_run(args, cfg, created, api_ready)


def _checked_run(args: argparse.Namespace, cfg: ExperimentConfig, created: list[Path],
                 api_ready: Callable[[], None]) -> int:
    from flows.plan import trainings_at_once

    from .memory import check_dataset_fits

    # from the data's headers: a run that cannot fit is refused before any folder or training
    sized = check_dataset_fits(cfg, variants_at_once=trainings_at_once(cfg))
    if args.no_tracking:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    ray = cfg.orchestration.executor == "ray"
    if ray:  # a local MLflow store or an unreachable cluster fails now, before any folder or training
        from flows import executor

        executor.check_tracking(cfg)
        executor.connect(executor.ray_address(cfg))
    if cfg.tracking.enabled:  # an unreachable MLflow fails now, before any folder or training
        from flows.tracking import preflight

        preflight(cfg)
    out = _out_dir(args.out or os.path.join("runs", cfg.data.dataset.replace(":", "_").replace("/", "_")), created)
    from .io import exclusive_lock

    with exclusive_lock(out):
        from flows.pretrain_and_probe import data_for

        data = data_for(cfg)  # bad data fails here, in one line, before the flow starts (the flow reuses this load)
        if sized is None:  # headers that do not tell the size (a CSV file): from the data
            check_dataset_fits(cfg, data=data, variants_at_once=trainings_at_once(cfg))
        api_ready()
        if ray:  # every node must see the run folder, reach the Prefect API and run this code
            executor.check_start(cfg, out)
        return run_local(cfg, out, progress="off" if args.quiet else "live" if sys.stdout.isatty() else "plain",
                         debug=args.debug, launched=args.launched)


def run_local(cfg: ExperimentConfig, out: Path, progress: Literal["live", "plain", "off"] = "plain",
              debug: bool = False, launched: float | None = None) -> int:
    """`ae-repr run`: the flow in-process with its progress (`live`, `plain` or `off`), then where its outputs are;
    returns the exit code. `launched` (epoch seconds): when the command started, where its start-up is counted from."""
    from flows.pretrain_and_probe import TIMINGS, planned_tasks, pretrain_and_probe
    from flows.progress_log import showing_progress

    started = time.time() if launched is None else launched
    (out / TIMINGS).unlink(missing_ok=True)
    with showing_progress(planned_tasks(cfg), epochs=cfg.train.epochs, max_steps=cfg.train.max_steps,
                          mode=progress, keep_all=debug):
        state = pretrain_and_probe(config=cfg, out=str(out), return_state=True)
    report = out / "report.md"
    print()
    if report.is_file():
        print(f"report:  {report}")
    if (out / "summary.parquet").is_file():
        print(f"summary: {out / 'summary.parquet'}")
    if (line := timing_line(out / TIMINGS, started)) is not None:
        print(line)
    print(mlflow_hint(cfg, out))
    if state.is_completed():
        return 0
    print(f"ae-repr: run finished with failures: {state.message}")
    return 1


def mlflow_hint(cfg: ExperimentConfig, out: Path) -> str:
    """Where to look at the run in MLflow: the parent run's address or the command that opens the UI."""
    if not cfg.tracking.enabled:
        return "MLflow:  tracking disabled"
    from flows.tracking import RECORD, display_uri, tracking_uri

    from .io import read_json

    url = read_json(out / RECORD).get("parent_url") if (out / RECORD).is_file() else None
    uri = display_uri(tracking_uri())
    lines = []
    if uri.startswith(("http://", "https://")):
        lines.append(f"MLflow:  {url or uri}")
    else:
        lines.append(f"MLflow:  {uri}; open the UI with\n"
                     f"         mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        if url:
            lines.append(f"         then {url}")
    return "\n".join(lines)


def timing_line(path: Path, started: float) -> str | None:
    """One line: start-up (from `started` until the flow body ran) and busy seconds per phase, from the run's
    timings file."""
    from .io import read_json

    if not path.is_file():
        return None
    t = read_json(path)
    order = ["data", "training", "extraction", "evaluation", "plots", "tracking"]
    names = sorted(t["phases"], key=lambda k: order.index(k) if k in order else len(order))
    phases = ", ".join(f"{k} {t['phases'][k]['busy_s']:.1f}s" for k in names)
    return (f"time:    start-up {t['flow_started'] - started:.1f}s, flow {t['flow_s']:.1f}s; "
            f"task time (threads run side by side): {phases}")


def _cmd_compare(args: argparse.Namespace, created: list[Path]) -> int:
    from .config import TrackingConfig
    from .io import atomic_path

    if args.last <= 0:
        raise UserError(f"--last must be > 0, got {args.last}")
    csv = Path(args.csv).expanduser().resolve() if args.csv else None
    if csv is not None and (csv.is_dir() or not csv.parent.is_dir() or not os.access(csv.parent, os.W_OK)):
        raise UserError(f"--csv {args.csv}: not a writable file path")
    from flows.tracking import compare_runs, format_table

    experiment = args.experiment or TrackingConfig().experiment
    result = compare_runs(experiment, args.last, dataset=args.dataset)
    to_csv = args.format == "csv"  # stdout then holds the CSV alone; the other lines go to stderr
    say = (lambda line: print(line, file=sys.stderr)) if to_csv else print
    if result.table.empty:
        on = f" on data set {args.dataset!r}" if args.dataset else ""
        say(f"no pretrain-and-probe runs{on} in MLflow experiment {experiment!r}")
        return 0
    if to_csv:
        result.table.to_csv(sys.stdout, index=False)
    else:
        print(format_table(result.table, width=None if args.wide else shutil.get_terminal_size().columns))
    if csv is not None:
        with atomic_path(csv) as tmp:
            result.table.to_csv(tmp, index=False)
        say(f"csv:     {csv}")
    if result.ui_url:
        say(f"mlflow:  {result.ui_url}")
    return 0


def _cmd_report(args: argparse.Namespace, created: list[Path]) -> int:
    from .config import load_config, validate_config
    from .io import read_json

    out = Path(args.dir).expanduser()
    summary = out / "summary.parquet"
    if not summary.is_file():
        raise UserError(f"{args.dir}: no summary.parquet there; not a run directory")
    if not os.access(out, os.W_OK):
        raise UserError(f"{args.dir}: not writable")
    try:
        import pyarrow.parquet as pq

        pq.read_schema(summary)
        cfg = (validate_config(read_json(out / "config.json"), source=str(out / "config.json"))
               if (out / "config.json").is_file() else load_config(args.config))
    except (OSError, ValueError) as e:
        raise UserError(f"{args.dir}: cannot read its run files ({e.__class__.__name__}: {e})") from None
    from evaluation import rerender_report

    report = rerender_report(out, cfg.eval)
    print(f"report:  {report}")
    return 0


def _cmd_log_run(args: argparse.Namespace, created: list[Path]) -> int:
    from flows.tracking import replay

    up = replay(args.out, experiment=args.experiment)
    print(f"uploaded {args.out}: parent run {up.parent_id}, {len(up.runs)} variant runs")
    if up.url:
        print(f"mlflow:  {up.url}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ae-repr` console script."""
    launched = time.time()  # a run's start-up is counted from here (imports and the temporary API included)
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    args.launched = launched
    # progress (INFO) to stdout, problems (WARNING and up) to stderr: a failure's stderr is its error line
    quiet = getattr(args, "quiet", False)
    info = logging.StreamHandler(sys.stdout)
    info.addFilter(lambda record: record.levelno < logging.WARNING)
    # DEBUG records (progress events among them) are shown with --debug only; --quiet keeps problems only
    info.setLevel(logging.DEBUG if args.debug else logging.WARNING if quiet else logging.INFO)
    problems = logging.StreamHandler(sys.stderr)
    problems.setLevel(logging.WARNING)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s",
                        handlers=[info, problems])
    for name in ("ae_repr", "evaluation", "flows"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.debug else logging.INFO)
    created: list[Path] = []
    func: Callable[[argparse.Namespace, list[Path]], int] = args.func
    try:
        return func(args, created)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        for path in created:  # leave nothing half-written behind, with or without --debug
            shutil.rmtree(path, ignore_errors=True)
        if args.debug:
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")  # one line; --debug has all
        if isinstance(e, UserError):
            print(f"{PROG}: error: {first}", file=sys.stderr)
            return 2
        print(f"{PROG}: failed: {e.__class__.__name__}: {first}", file=sys.stderr)
        return 1


def console() -> None:
    """The `ae-repr` console script: `main`, then exit without the garbage collector's final passes.

    At interpreter teardown the collector walks every object torch, Prefect and MLflow created: 1.5 to 3 s
    after a run on 2 cores. Frozen objects are skipped; exit handlers still run, files are already closed.
    """
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
