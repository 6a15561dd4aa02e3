"""Bad input through the real CLI (DESIGN section 5): exit code 2, one line on stderr naming the bad input,
no traceback, and nothing half-written.

Each case builds its inputs in its own folder and names the output folder the command would create;
all cases run once per module, a few at a time, and each test then checks one outcome. A command runs as a
forked child of a fork server that has imported the CLI's libraries once (a fresh process spends seconds on
imports; see forkserver.py), except SUBPROCESS_CASES, which run the installed `ae-repr` console script.
"""

from __future__ import annotations

import gzip
import struct
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from forkserver import CommandRunner
from reliability_helpers import (
    CLI,
    ROOT,
    Trained,
    assert_one_line_error,
    cli_env,
    describe,
    digits_features,
    files_under,
    run_cli,
    write_config,
)

# run as real `ae-repr` processes (the console script's own start-up and exit), the others in a fork server
SUBPROCESS_CASES = ("data-missing-file", "config-invalid-yaml", "run-missing-data")


@dataclass
class Case:
    """A command line, what its error line must name, and the folders it must leave as they were."""

    args: list[str]
    names: tuple[str, ...]  # every one must appear in the error line
    out: Path | None  # the --out folder the command would create: must not exist afterwards
    watch: tuple[Path, ...] = ()  # existing folders that must gain no files
    before: dict[Path, set[Path]] = field(default_factory=dict)


@dataclass(frozen=True)
class Ctx:
    dir: Path  # this case's own folder
    tiny: Path  # the small config
    trained: Trained


Builder = Callable[[Ctx], Case]
CASES: dict[str, Builder] = {}


def case(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        assert name not in CASES
        CASES[name] = fn
        return fn

    return register


def train_on(ctx: Ctx, dataset: str | Path, *names: str, variant: str = "ae") -> Case:
    """`train` on a bad data set: the error must name `names` (by default the data set itself)."""
    out = ctx.dir / "out"
    args = ["train", "--variant", variant, "--config", str(ctx.tiny), "--dataset", str(dataset), "--out", str(out)]
    return Case(args, names or (str(dataset),), out)


def train_with_config(ctx: Ctx, extra: dict, *names: str, variant: str = "ae") -> Case:
    """`train` with a config file holding `extra`: the error must name the file and `names`."""
    cfg = write_config(ctx.dir / "bad.yaml", extra)
    out = ctx.dir / "out"
    args = ["train", "--variant", variant, "--config", str(cfg), "--dataset", "digits", "--out", str(out)]
    return Case(args, (str(cfg), *names), out)


def frame_file(path: Path, df: pd.DataFrame) -> Path:
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def table(n: int = 40, **cols: object) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "label": np.arange(n) % 2})
    for k, v in cols.items():
        df[k] = v
    return df


# ---------------------------------------------------------------------------------------------- data


@case("data-missing-file")
def _(ctx: Ctx) -> Case:
    return train_on(ctx, ctx.dir / "nope.parquet")


@case("data-corrupt-parquet")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "corrupt.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file" * 10)
    return train_on(ctx, path)


@case("data-no-feature-columns")
def _(ctx: Ctx) -> Case:
    df = pd.DataFrame({"label": np.arange(40) % 2, "split": ["train"] * 30 + ["test"] * 10})
    return train_on(ctx, frame_file(ctx.dir / "nofeatures.parquet", df))


@case("data-non-numeric-column")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "text.csv", table(colour=["red", "green"] * 20))
    return train_on(ctx, path, str(path), "colour")


@case("data-nan")
def _(ctx: Ctx) -> Case:
    df = table()
    df.loc[7, "b"] = np.nan
    path = frame_file(ctx.dir / "nan.parquet", df)
    return train_on(ctx, path, str(path), "'b'")


@case("data-inf")
def _(ctx: Ctx) -> Case:
    df = table()
    df.loc[3, "a"] = np.inf
    path = frame_file(ctx.dir / "inf.csv", df)
    return train_on(ctx, path, str(path), "'a'")


@case("data-inf-npy")
def _(ctx: Ctx) -> Case:
    x = np.ones((40, 5), dtype=np.float32)
    x[2, 3] = -np.inf
    path = ctx.dir / "inf.npy"
    np.save(path, x)
    return train_on(ctx, path)


@case("data-non-integer-labels")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "labels.parquet", table(label=np.arange(40) * 0.5))
    return train_on(ctx, path, str(path), "label")


@case("data-too-few-rows")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "tiny.parquet", table(n=2).drop(columns="label"))
    return train_on(ctx, path, str(path), "too few rows")


@case("data-single-class")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "oneclass.csv", table(label=np.zeros(40, dtype=int)))
    return train_on(ctx, path, str(path), "same label", "2 classes")


@case("data-one-row-per-class")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "singletons.parquet", table(label=np.arange(40)))
    return train_on(ctx, path, str(path), "single row", "per class")


@case("data-header-only-csv")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "header.csv"
    path.write_text("a,b,label\n")
    return train_on(ctx, path, str(path), "no rows")


@case("data-duplicate-columns-csv")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "dup.csv"
    df = table()
    df.columns = ["a", "a", "label"]
    df.to_csv(path, index=False)
    return train_on(ctx, path, str(path), "duplicate column", "'a'")


@case("data-duplicate-columns-parquet")
def _(ctx: Ctx) -> Case:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = ctx.dir / "dup.parquet"
    df = table()
    pq.write_table(pa.Table.from_arrays([pa.array(df[c]) for c in df], names=["b", "b", "label"]), path)
    return train_on(ctx, path, str(path), "duplicate column", "'b'")


@case("data-beyond-float32")
def _(ctx: Ctx) -> Case:
    df = table()
    df.loc[5, "b"] = 1e39
    path = frame_file(ctx.dir / "huge.parquet", df)
    return train_on(ctx, path, str(path), "'b'", "float32", "row 5")


@case("data-beyond-float32-npy")
def _(ctx: Ctx) -> Case:
    x = np.ones((40, 5))
    x[2, 3] = -1e40
    path = ctx.dir / "huge.npy"
    np.save(path, x)
    return train_on(ctx, path, str(path), "float32", "(2, 3)")


@case("data-truncated-parquet")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "cut.parquet", table(n=400))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return train_on(ctx, path, str(path), "Parquet")


@case("data-truncated-npz")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "cut.npz"
    np.savez(path, x=np.ones((400, 5)), y=np.arange(400) % 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return train_on(ctx, path)


@case("data-truncated-csv")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "cut.csv", table(n=400))
    text = path.read_text()
    path.write_text(text[: len(text) // 2].rsplit(",", 1)[0])  # cut inside a row: its last fields are missing
    return train_on(ctx, path, str(path), "missing")


@case("data-truncated-npy")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "cut.npy"
    np.save(path, np.ones((400, 5)))
    path.write_bytes(path.read_bytes()[:3000])
    return train_on(ctx, path)


@case("data-empty-npy")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "empty.npy"
    path.write_bytes(b"")  # created, nothing written yet
    return train_on(ctx, path, str(path), "empty .npy file (0 bytes)", "still being written")


@case("data-empty-parquet")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "empty.parquet"
    path.write_bytes(b"")
    return train_on(ctx, path, str(path), "empty Parquet file (0 bytes)")


@case("data-npy-cut-in-its-header")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "cut.npy"
    np.save(path, np.ones((400, 5)))
    path.write_bytes(path.read_bytes()[:40])
    return train_on(ctx, path, str(path), "header")


def _too_wide(ctx: Ctx) -> tuple[Path, Path]:
    """A valid .npy of 40 x 200,000 float32 (written sparse: 32 MB that take no disk) and a config whose hidden
    width makes the model far larger than any machine's memory (~6e11 parameters): refused from the header."""
    path = ctx.dir / "wide.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(40, 200_000)).flush()
    cfg = write_config(ctx.dir / "wide.yaml", {"models": {"overrides": {"ae": {"hidden": [1_000_000]}}}})
    return path, cfg


@case("data-too-wide-for-memory")
def _(ctx: Ctx) -> Case:
    path, cfg = _too_wide(ctx)
    out = ctx.dir / "out"
    return Case(["train", "--variant", "ae", "--config", str(cfg), "--dataset", str(path), "--out", str(out)],
                (str(path), "40 x 200000 features would need about", "GiB available", "more memory"), out)


@case("run-data-too-wide-for-memory")
def _(ctx: Ctx) -> Case:
    path, cfg = _too_wide(ctx)
    out = ctx.dir / "out"
    return Case(["run", "--config", str(cfg), "--variants", "ae", "--dataset", str(path), "--no-tracking",
                 "--out", str(out)], (str(path), "would need about", "GiB available"), out)


@case("data-single-class-npz")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "oneclass.npz"
    np.savez(path, x=np.random.default_rng(0).normal(size=(40, 5)), y=np.full(40, 3))
    return train_on(ctx, path, str(path), "same label (3)")


@case("data-npy-pickled-objects")
def _(ctx: Ctx) -> Case:
    path = ctx.dir / "objects.npy"
    np.save(path, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True)
    return train_on(ctx, path)


@case("data-unknown-spec")
def _(ctx: Ctx) -> Case:
    return train_on(ctx, "mnist-please", "mnist-please")


@case("data-dsprites-0")
def _(ctx: Ctx) -> Case:
    return train_on(ctx, "dsprites:0", "dsprites:0")


def _idx_images(n: int = 20) -> bytes:
    body = np.arange(n * 8 * 8, dtype=np.uint8).tobytes()
    return bytes([0, 0, 0x08, 3]) + struct.pack(">3I", n, 8, 8) + body


@case("idx-wrong-magic")
def _(ctx: Ctx) -> Case:
    folder = ctx.dir / "idx"
    folder.mkdir()
    path = folder / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + _idx_images()[2:])
    return train_on(ctx, f"idx:{folder}", str(path), "magic")


@case("idx-truncated-body")
def _(ctx: Ctx) -> Case:
    folder = ctx.dir / "idx"
    folder.mkdir()
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_images()[:-100]))
    return train_on(ctx, f"idx:{folder}", str(path), "truncated")


# ---------------------------------------------------------------------------------------------- variant, hyperparameters


@case("unknown-variant")
def _(ctx: Ctx) -> Case:
    return train_on(ctx, "digits", "--variant", "nope", variant="nope")


@case("run-unknown-variant")
def _(ctx: Ctx) -> Case:
    out = ctx.dir / "out"
    return Case(["run", "--config", str(ctx.tiny), "--variants", "ae,hvae", "--no-tracking", "--out", str(out)],
                ("--variants", "hvae"), out)


def _run(ctx: Ctx, *extra: str) -> tuple[list[str], Path]:
    out = ctx.dir / "out"
    return ["run", "--config", str(ctx.tiny), "--variants", "ae", "--out", str(out), *extra], out


@case("run-seeds-repeated")
def _(ctx: Ctx) -> Case:
    args, out = _run(ctx, "--no-tracking", "--seeds", "0,1,0")
    return Case(args, ("--seeds 0,1,0", "twice"), out)


@case("run-seeds-negative")
def _(ctx: Ctx) -> Case:
    args, out = _run(ctx, "--no-tracking", "--seeds", "-1")
    return Case(args, ("--seeds", "negative"), out)


@case("run-ray-unreachable")
def _(ctx: Ctx) -> Case:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args, out = _run(ctx, "--no-tracking", "--executor", "ray", "--ray-address", f"127.0.0.1:{port}")
    return Case(args, (f"127.0.0.1:{port}", "unreachable"), out)


@case("run-ray-with-a-local-mlflow-store")
def _(ctx: Ctx) -> Case:
    tracked = write_config(ctx.dir / "tracked.yaml", {"tracking": {"enabled": True}})  # the local SQLite store
    out = ctx.dir / "out"
    args = ["run", "--config", str(tracked), "--variants", "ae", "--out", str(out), "--executor", "ray",
            "--ray-address", "127.0.0.1:6379"]
    return Case(args, ("--executor ray", "tracking server"), out)


@case("config-latent-dim-0")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"models": {"latent_dim": 0}}, "latent_dim")


@case("config-epochs-negative")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"train": {"epochs": -1}}, "epochs")


@case("config-beta-negative")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"models": {"overrides": {"beta_vae": {"beta": -0.5}}}}, "overrides.beta_vae.beta",
                             variant="beta_vae")


@case("config-codebook-size-1")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"models": {"overrides": {"vq_vae": {"codebook_size": 1}}}}, "overrides.vq_vae.codebook_size",
                             variant="vq_vae")


@case("config-corruption-above-1")
def _(ctx: Ctx) -> Case:
    extra = {"models": {"overrides": {"dae": {"corruption": {"kind": "masking", "level": 1.5}}}}}
    return train_with_config(ctx, extra, "overrides.dae.corruption", variant="dae")


@case("config-batch-size-0")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"train": {"batch_size": 0}}, "batch_size")


@case("config-unknown-key")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"train": {"epocs": 3}}, "epocs")


@case("config-unknown-override-key")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"models": {"overrides": {"vae": {"betta": 2.0}}}}, "overrides.vae.betta",
                             variant="vae")


@case("config-override-of-an-unselected-variant")
def _(ctx: Ctx) -> Case:
    # variants: [ae] only, but a broken override for vq_vae is still a broken config file
    extra = {"models": {"variants": ["ae"], "overrides": {"vq_vae": {"codebook_size": 0}}}}
    return train_with_config(ctx, extra, "overrides.vq_vae.codebook_size")


@case("config-wrong-type")
def _(ctx: Ctx) -> Case:
    return train_with_config(ctx, {"train": {"lr": "fast"}}, "lr")


@case("config-invalid-yaml")
def _(ctx: Ctx) -> Case:
    cfg = ctx.dir / "broken.yaml"
    cfg.write_text("train:\n  epochs: [1, 2\n  lr: 0.1\n")
    out = ctx.dir / "out"
    return Case(["train", "--variant", "ae", "--config", str(cfg), "--dataset", "digits", "--out", str(out)],
                (str(cfg), "YAML"), out)


@case("config-missing-file")
def _(ctx: Ctx) -> Case:
    cfg = ctx.dir / "absent.yaml"
    out = ctx.dir / "out"
    return Case(["train", "--variant", "ae", "--config", str(cfg), "--dataset", "digits", "--out", str(out)],
                (str(cfg),), out)


@case("flag-latent-dim-0")
def _(ctx: Ctx) -> Case:
    case_ = train_on(ctx, "digits", "--latent-dim 0")
    case_.args += ["--latent-dim", "0"]
    return case_


@case("flag-epochs-negative")
def _(ctx: Ctx) -> Case:
    case_ = train_on(ctx, "digits", "--epochs -3")
    case_.args += ["--epochs", "-3"]
    return case_


@case("flag-epochs-not-a-number")
def _(ctx: Ctx) -> Case:
    case_ = train_on(ctx, "digits", "--epochs")
    case_.args += ["--epochs", "ten"]
    return case_


@case("flag-extract-batch-size-0")
def _(ctx: Ctx) -> Case:
    out = ctx.dir / "out"
    return Case(["extract", "--model", str(ctx.trained.model_dir), "--dataset", "digits", "--out", str(out),
                 "--batch-size", "0"], ("--batch-size",), out, watch=(ctx.trained.model_dir,))


# ---------------------------------------------------------------------------------------------- --out


@case("out-is-a-file")
def _(ctx: Ctx) -> Case:
    target = ctx.dir / "afile"
    target.write_text("keep me")
    case_ = train_on(ctx, "digits", str(target))
    case_.args[-1] = str(target)
    case_.out = None
    case_.watch = (ctx.dir,)
    return case_


@case("out-parent-is-a-file")
def _(ctx: Ctx) -> Case:
    target = ctx.dir / "afile"
    target.write_text("keep me")
    case_ = train_on(ctx, "digits", str(target / "sub"))
    case_.args[-1] = str(target / "sub")
    case_.out = None
    case_.watch = (ctx.dir,)
    return case_


@case("out-nested-new-folders-removed")
def _(ctx: Ctx) -> Case:
    # the command creates new/deeper/out, then fails on the data: every level it created goes
    case_ = train_on(ctx, ctx.dir / "missing.npz")
    case_.args[-1] = str(ctx.dir / "new" / "deeper" / "out")
    case_.out = ctx.dir / "new"
    return case_


@case("out-unwritable-new")
def _(ctx: Ctx) -> Case:
    # root ignores permission bits; /proc refuses new entries to everyone
    target = "/proc/ae-repr-reliability/out"
    case_ = train_on(ctx, "digits", target)
    case_.args[-1] = target
    case_.out = Path(target)
    return case_


@case("out-unwritable-existing")
def _(ctx: Ctx) -> Case:
    target = "/proc/sys"  # an existing folder nobody, root included, can create files in
    case_ = train_on(ctx, "digits", target)
    case_.args[-1] = target
    case_.out = None
    return case_


@case("run-out-is-a-file")
def _(ctx: Ctx) -> Case:
    target = ctx.dir / "afile"
    target.write_text("keep me")
    return Case(["run", "--config", str(ctx.tiny), "--variants", "ae", "--no-tracking", "--out", str(target)],
                (str(target),), None, watch=(ctx.dir,))


@case("run-missing-data")
def _(ctx: Ctx) -> Case:
    out = ctx.dir / "out"
    data = ctx.dir / "missing.csv"
    return Case(["run", "--config", str(ctx.tiny), "--variants", "ae", "--dataset", str(data), "--no-tracking",
                 "--out", str(out)], (str(data),), out)


# ---------------------------------------------------------------------------------------------- extract


@case("extract-missing-model")
def _(ctx: Ctx) -> Case:
    out = ctx.dir / "out"
    model = ctx.dir / "models" / "vae"
    return Case(["extract", "--model", str(model), "--dataset", "digits", "--out", str(out)], (str(model),), out)


@case("extract-tampered-weights")
def _(ctx: Ctx) -> Case:
    model = ctx.trained.copy(ctx.dir / "model")
    raw = bytearray((model / "model.pt").read_bytes())
    raw[-200] ^= 0xFF  # one flipped byte
    (model / "model.pt").write_bytes(bytes(raw))
    out = ctx.dir / "out"
    return Case(["extract", "--model", str(model), "--dataset", "digits", "--out", str(out)],
                ("model.pt", "checksum"), out, watch=(model,))


@case("extract-garbage-description")
def _(ctx: Ctx) -> Case:
    model = ctx.trained.copy(ctx.dir / "model")
    (model / "config.json").write_text("{not json")
    out = ctx.dir / "out"
    return Case(["extract", "--model", str(model), "--dataset", "digits", "--out", str(out)],
                ("config.json",), out, watch=(model,))


@case("extract-wrong-data-shape")
def _(ctx: Ctx) -> Case:
    path = frame_file(ctx.dir / "table.parquet", table())
    out = ctx.dir / "out"
    return Case(["extract", "--model", str(ctx.trained.model_dir), "--dataset", str(path), "--out", str(out)],
                (str(path), "shape"), out, watch=(ctx.trained.model_dir,))


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate(ctx: Ctx, features: Path, *names: str) -> Case:
    out = ctx.dir / "out"
    return Case(["evaluate", "--features", str(features), "--out", str(out), "--config", str(ctx.tiny)],
                names, out, watch=(features,))


@case("evaluate-missing-required-column")
def _(ctx: Ctx) -> Case:
    feats = ctx.dir / "features"
    digits_features(feats / "ae.parquet")
    bad = digits_features(feats / "vae.parquet", drop=("split",))
    return evaluate(ctx, feats, str(bad), "split")


@case("evaluate-row-ids-disagree")
def _(ctx: Ctx) -> Case:
    feats = ctx.dir / "features"
    digits_features(feats / "ae.parquet")
    bad = digits_features(feats / "vae.parquet", sample_id=np.arange(300) + 1000)
    return evaluate(ctx, feats, str(bad), "sample_id")


@case("evaluate-latent-widths-differ")
def _(ctx: Ctx) -> Case:
    feats = ctx.dir / "features"
    digits_features(feats / "ae.parquet", k=4)
    digits_features(feats / "vae.parquet", k=6)
    return evaluate(ctx, feats, str(feats), "width", "ae=4", "vae=6")


@case("evaluate-corrupt-feature-file")
def _(ctx: Ctx) -> Case:
    feats = ctx.dir / "features"
    digits_features(feats / "ae.parquet")
    bad = feats / "vae.parquet"
    bad.write_bytes(b"garbage" * 100)
    return evaluate(ctx, feats, str(bad))


@case("evaluate-bad-config")
def _(ctx: Ctx) -> Case:
    feats = ctx.dir / "features"
    digits_features(feats / "ae.parquet")
    cfg = write_config(ctx.dir / "bad.yaml", {"eval": {"fewshot_seeds": 1}})
    case_ = evaluate(ctx, feats, str(cfg), "fewshot_seeds")
    case_.args[-1] = str(cfg)
    return case_


# ---------------------------------------------------------------------------------------------- running them


@pytest.fixture(scope="module")
def cli() -> Iterator[CommandRunner]:
    """`ae-repr` commands as forked children of one process that imported the CLI's libraries once."""
    runner = CommandRunner(cli_env(), ROOT, jobs=3, cli=CLI)
    if not runner.forking:
        import warnings

        warnings.warn(f"bad-input commands run as subprocesses: {runner.why_not}", stacklevel=1)
    yield runner
    runner.close()


@pytest.fixture(scope="module")
def outcomes(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, trained: Trained, cli: CommandRunner
) -> dict[str, tuple[Case, subprocess.CompletedProcess]]:
    """Build the selected cases' inputs, then run all their commands, a few at a time."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_bad_input" and hasattr(item, "callspec")}
    base = tmp_path_factory.mktemp("bad_input")
    tiny = write_config(base / "tiny.yaml")
    cases: dict[str, Case] = {}
    for name, build in CASES.items():
        if name not in selected:
            continue
        folder = base / name
        folder.mkdir()
        c = build(Ctx(folder, tiny, trained))
        c.before = {w: files_under(w) for w in c.watch}
        cases[name] = c
    with ThreadPoolExecutor(max_workers=len(SUBPROCESS_CASES)) as pool:  # beside the forked ones
        futures = {name: pool.submit(run_cli, *c.args, timeout=240) for name, c in cases.items()
                   if name in SUBPROCESS_CASES}
        done = cli.run_many({name: (c.args, None) for name, c in cases.items() if name not in SUBPROCESS_CASES})
        done.update({name: fut.result() for name, fut in futures.items()})
    return {name: (cases[name], done[name]) for name in cases}


def test_enough_cases() -> None:
    assert len(CASES) >= 60
    assert set(SUBPROCESS_CASES) <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, outcomes: dict[str, tuple[Case, subprocess.CompletedProcess]]) -> None:
    c, res = outcomes[name]
    assert_one_line_error(res, 2, *c.names)
    assert res.stderr.lstrip().startswith("ae-repr"), describe(res)
    if c.out is not None:
        assert not c.out.exists(), f"{c.out} was left behind\n{describe(res)}"
    for folder, before in c.before.items():
        assert files_under(folder) == before, f"files were added to {folder}: {files_under(folder) - before}"


# ---------------------------------------------------------------------------------------------- labels missing: not an error


@pytest.mark.parametrize("how", ["empty-label-column", "no-label-column"])
def test_evaluate_without_labels_skips_label_tasks(how: str, tmp_path: Path, cli: CommandRunner) -> None:
    """Features without labels: `evaluate` succeeds, runs the label-free tasks, and the report says why it skipped."""
    import pyarrow.parquet as pq

    feats = tmp_path / "features"
    drop = ("label",) if how == "no-label-column" else ()
    digits_features(feats / "ae.parquet", labels=False, drop=drop)
    digits_features(feats / "vae.parquet", labels=False, drop=drop)
    cfg = write_config(tmp_path / "eval.yaml", {"eval": {"baselines": []}})
    out = tmp_path / "out"
    res = cli.run("evaluate", "--features", feats, "--out", out, "--config", cfg, timeout=240)
    assert res.returncode == 0, describe(res)
    assert "Traceback" not in res.stderr, describe(res)
    assert "label" in res.stderr + res.stdout, "no message about the skipped label tasks"
    summary = pq.read_table(out / "summary.parquet").to_pandas()
    assert set(summary["representation"]) == {"ae", "vae"}
    assert "reduction" in set(summary["task"]), "the label-free tasks must still run"
    assert not {"linear_probe", "knn", "fewshot_frozen"} & set(summary["task"])
    report = (out / "report.md").read_text()
    assert "no labels" in report and "linear_probe" in report, report


def test_failed_command_keeps_an_existing_out_folder(tmp_path: Path, cli: CommandRunner) -> None:
    """A bad-input failure removes only what the command created: an existing --out and its files stay."""
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "models" / "keep.txt").write_text("earlier work")
    res = cli.run("train", "--variant", "ae", "--dataset", tmp_path / "missing.parquet", "--out", out)
    assert_one_line_error(res, 2, "missing.parquet")
    assert files_under(out) == {out / "models", out / "models" / "keep.txt"}


def test_debug_shows_the_traceback(tmp_path: Path, cli: CommandRunner) -> None:
    """--debug is the one way to get a traceback (the test above would pass on a CLI that never prints one)."""
    res = cli.run("--debug", "train", "--variant", "ae", "--dataset", tmp_path / "missing.parquet",
                  "--out", tmp_path / "out")
    assert res.returncode != 0 and "Traceback" in res.stderr, describe(res)
    assert not (tmp_path / "out").exists(), "a failed --debug command left its output folder behind"
