"""The `ae-repr` command line: run, train, extract, evaluate, compare, log-run."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

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
    p.add_argument("--epochs", type=int, metavar="N", help="training epochs (overrides train.epochs)")
    p.add_argument("--latent-dim", type=int, metavar="K", help="representation width (overrides models.latent_dim)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI's argument parser."""
    from .config import ALL_VARIANTS

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
    p.add_argument("--variants", metavar="a,b,..", help=f"comma-separated subset of: {','.join(ALL_VARIANTS)}")
    p.add_argument("--out", metavar="DIR", help="run directory (default: runs/<dataset>)")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    _common(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("train", help="train one variant; writes DIR/models/V/",
                       description="Train one variant on the train split. Re-running the same command after a "
                       "crash resumes from the last completed epoch.")
    p.add_argument("--variant", required=True, metavar="V", help=f"one of: {', '.join(ALL_VARIANTS)}")
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
    _common(p)
    p.set_defaults(func=_cmd_evaluate)
    return top


def _out_dir(path: str, created: list[Path]) -> Path:
    """Check --out is a writable folder (creating it if needed, remembered for clean-up on failure)."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {path}: exists and is not a folder")
    parent = next(p for p in (out, *out.parents) if p.exists())
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--out {path}: {parent} is not writable")
    if not out.exists():
        out.mkdir(parents=True)
        created.append(out)
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
    from .config import ALL_VARIANTS
    from .train import train_variant

    if args.variant not in ALL_VARIANTS:
        raise UserError(f"--variant {args.variant!r}: unknown; choose from {', '.join(ALL_VARIANTS)}")
    cfg = _load_cfg(args).with_overrides(variants=[args.variant])
    data = _load_data(cfg)
    out = _out_dir(args.out, created)
    res = train_variant(args.variant, data, cfg, out / "models" / args.variant)
    if res.skipped:
        print(f"{args.variant}: already trained with this config: {res.model_dir}")
    else:
        last = res.history[-1] if res.history else {}
        print(f"{args.variant}: trained {len(res.history)} epochs, val loss {last.get('val/loss', float('nan')):.4g}"
              f" -> {res.model_dir}")
    return 0


def _cmd_extract(args: argparse.Namespace, created: list[Path]) -> int:
    from .checkpoint import load_model
    from .data import load_dataset
    from .features import extract_features

    if args.batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {args.batch_size}")
    loaded = load_model(args.model)
    spec = args.dataset or loaded.meta.get("dataset", "digits")
    split = loaded.meta.get("split", {})  # the split the model was trained with, so features line up with it
    data = load_dataset(spec, test_fraction=split.get("test_fraction", 0.25), seed=split.get("seed", 0))
    out = _out_dir(args.out, created)
    path = extract_features(args.model, data, out / "features" / f"{loaded.variant}.parquet", batch_size=args.batch_size)
    print(f"{loaded.variant}: {len(data)} rows x {loaded.model.latent_dim} features -> {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace, created: list[Path]) -> int:
    from evaluation import evaluate_dir

    from .config import load_config

    cfg = load_config(args.config)
    features = Path(args.features)
    if not features.is_dir():
        raise UserError(f"--features {args.features}: not a folder")
    out = _out_dir(args.out, created)
    summary = evaluate_dir(features, out, cfg.eval, seed=cfg.seed)
    print(f"summary: {summary}\nreport:  {out / 'report.md'}")
    return 0


def _cmd_run(args: argparse.Namespace, created: list[Path]) -> int:
    cfg = _load_cfg(args)
    if args.no_tracking:
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"enabled": False})})
    out = _out_dir(args.out or os.path.join("runs", cfg.data.dataset.replace(":", "_").replace("/", "_")), created)
    from flows.pretrain_and_probe import run_local

    return run_local(cfg, out)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ae-repr` console script."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(message)s")
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
        if args.debug:
            raise
        for path in created:  # leave nothing half-written behind
            shutil.rmtree(path, ignore_errors=True)
        if isinstance(e, UserError):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        print(f"{PROG}: failed: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
