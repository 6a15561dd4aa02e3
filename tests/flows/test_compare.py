"""`ae-repr compare` against a real SQLite store filled the way a run records itself (flows.tracking.record)."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from ae_repr.cli import main
from evaluation.results import result_frame, result_row
from flows.tracking import record as rec

EXPERIMENT = "pretrain-and-probe"
VARIANTS = ("ae", "vae")


def _summary(shift: float = 0.0) -> pd.DataFrame:
    def probe(name: str, v: float, lo: float | None = None, hi: float | None = None) -> dict:
        return result_row(name, "linear_probe", "accuracy", v + shift, ci_low=None if lo is None else lo + shift,
                          ci_high=None if hi is None else hi + shift, ci_method="test_bootstrap" if lo else None)

    return result_frame([
        probe("ae", 0.9581, 0.9383, 0.9762), probe("vae", 0.9, 0.88, 0.92), probe("raw", 0.7012, 0.6503, 0.7498),
        probe("pca", 0.8), probe("ae@seed=0", 0.95, 0.93, 0.97),
        result_row("raw", "knn", "accuracy_5nn", 0.66), result_row("raw", "knn", "accuracy_1nn", 0.6),
        result_row("pca", "reduction", "trustworthiness", 0.97),
        result_row("chance", "chance", "accuracy", 0.1, ci_low=0.08, ci_high=0.12),
    ])


def _record(client: MlflowClient, exp_id: str, dataset: str, summary: pd.DataFrame, *, old: bool = False) -> str:
    """One flow run as the flow logs it: parent (headline numbers, baselines) and one child per variant."""
    parent = client.create_run(exp_id, tags={rec.KIND_TAG: rec.PARENT_KIND, "dataset": dataset},
                               run_name=f"run-{dataset}")
    metrics, _ = rec.headline_metrics(summary, VARIANTS)
    if old:  # recorded before the parent carried the baselines' numbers
        metrics = {k: v for k, v in metrics.items() if not k.startswith(rec.BASELINE_PREFIX)}
    for k, v in metrics.items():
        if "@" not in k:  # (the record drops per-seed names itself; tested above)
            client.log_metric(parent.info.run_id, k, v)
    for variant in VARIANTS:
        child = client.create_run(exp_id, tags={"mlflow.parentRunId": parent.info.run_id, rec.KIND_TAG: "variant",
                                                "variant": variant}, run_name=variant)
        for k, v in rec.eval_metrics(summary, variant).items():
            client.log_metric(child.info.run_id, k, v)
        client.set_terminated(child.info.run_id)
    for name in [] if old else rec.baseline_names(summary, VARIANTS):  # and one child per baseline
        child = client.create_run(exp_id, tags=rec.baseline_tags(parent.info.run_id, name, {"dataset": dataset},
                                                                 "unknown"), run_name=rec.baseline_run_name(name))
        for k, v in rec.eval_metrics(summary, name).items():
            client.log_metric(child.info.run_id, k, v)
        client.set_terminated(child.info.run_id)
    client.set_terminated(parent.info.run_id)
    return parent.info.run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('compare') / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = client.create_experiment(EXPERIMENT)
    _record(client, exp_id, "digits", _summary())
    _record(client, exp_id, "dsprites:2000", _summary(-0.1))
    return uri


def test_parent_records_the_baselines_headline_numbers_with_intervals() -> None:
    metrics, tags = rec.headline_metrics(_summary(), VARIANTS)
    assert metrics["baseline/raw/linear_probe_accuracy"] == pytest.approx(0.7012)
    assert metrics["baseline/raw/linear_probe_accuracy/ci_low"] == pytest.approx(0.6503)
    assert metrics["baseline/raw/linear_probe_accuracy/ci_high"] == pytest.approx(0.7498)
    assert metrics["baseline/raw/knn_accuracy_5nn"] == pytest.approx(0.66)
    assert "baseline/raw/knn_accuracy_1nn" not in metrics  # headline numbers only
    assert metrics["baseline/pca/reduction_trustworthiness"] == pytest.approx(0.97)
    assert "baseline/pca/linear_probe_accuracy/ci_low" not in metrics  # no interval in the summary, none made up
    named = {k.split("/")[1] for k in metrics if k.startswith("baseline/")}
    assert named == {"raw", "pca"}  # not the variants, their seeds or chance
    assert not any("@" in k for k in metrics)  # `ae@seed=0` is no MLflow name: it would fail the parent's write
    assert tags["best_variant"] == "ae"
    child = rec.eval_metrics(_summary(), "ae")
    assert child["eval/linear_probe_accuracy/ci_low"] == pytest.approx(0.9383)


def test_compare_lists_baselines_beside_variants_with_dataset_and_intervals(store: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.tracking import compare_runs, format_table

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    table = compare_runs(EXPERIMENT, 5).table
    assert len(table) == 8  # a baseline's own child run is no variant, and no second row
    digits = table[table["dataset"] == "digits"].set_index("representation")
    assert set(digits.index) == {"ae", "vae", "raw", "pca"}
    assert digits.loc["raw", "kind"] == "baseline" and digits.loc["ae", "kind"] == "variant"
    raw_run = MlflowClient(store).get_run(digits.loc["raw", "run_id"])  # the row links the baseline's run
    assert raw_run.info.run_name == "raw (baseline)" and raw_run.data.tags[rec.KIND_TAG] == rec.BASELINE_KIND
    assert digits.loc["raw", "eval/linear_probe_accuracy"] == pytest.approx(0.7012)
    assert digits.loc["ae", "eval/linear_probe_accuracy/ci_high"] == pytest.approx(0.9762)
    text = format_table(table)
    ae_line = next(line for line in text.splitlines() if " ae " in line and "digits" in line)
    assert "0.958 [0.938, 0.976]" in ae_line
    pca_line = next(line for line in text.splitlines() if " pca " in line and "digits" in line)
    assert "0.8000" in pca_line  # no interval logged: the number alone
    only = compare_runs(EXPERIMENT, 5, dataset="dsprites:2000").table
    assert set(only["dataset"]) == {"dsprites:2000"} and len(only) == 4
    assert only.set_index("representation").loc["raw", "eval/linear_probe_accuracy"] == pytest.approx(0.6012)


def test_compare_reads_baselines_of_runs_recorded_before_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.tracking import compare_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    _record(client, client.create_experiment(EXPERIMENT), "digits", _summary(), old=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    table = compare_runs(EXPERIMENT, 5).table.set_index("representation")
    assert table.loc["raw", "kind"] == "baseline"
    assert table.loc["raw", "eval/linear_probe_accuracy"] == pytest.approx(0.7012)


def test_format_table_fits_the_width_and_says_what_it_left_out(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.tracking import compare_runs, format_table

    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    table = compare_runs(EXPERIMENT, 5).table
    wide = format_table(table)
    assert max(map(len, wide.splitlines())) > 70
    narrow = format_table(table, width=70).splitlines()
    *body, note = narrow
    assert max(map(len, body)) <= 70
    left = int(note.split()[0])
    assert left >= 1 and "left out" in note and "--wide" in note
    header = body[1] if body[0].startswith("┏") else body[0]
    assert "representation" in header and "linear_probe_accuracy" in header  # the most wanted columns stay
    shown = sum(h.strip() != "" for h in header.replace("┃", "│").split("│"))
    full = wide.splitlines()[1] if wide.startswith("┏") else wide.splitlines()[0]
    assert shown + left == sum(h.strip() != "" for h in full.replace("┃", "│").split("│"))


def test_cli_compare_dataset_filter_csv_on_stdout_and_wide(store: str, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["compare", "--dataset", "digits", "--format", "csv"]) == 0
    out = capsys.readouterr().out
    table = pd.read_csv(io.StringIO(out))  # stdout is the CSV alone
    assert set(table["dataset"]) == {"digits"} and set(table["representation"]) == {"ae", "vae", "raw", "pca"}
    assert {"eval/linear_probe_accuracy/ci_low", "eval/linear_probe_accuracy/ci_high", "run_id"} <= set(table.columns)
    assert main(["compare"]) == 0
    narrow = capsys.readouterr().out
    assert "left out" in narrow
    assert main(["compare", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "left out" not in wide and "0.958 [0.938, 0.976]" in wide
    assert main(["compare", "--dataset", "nosuch"]) == 0
    assert "no pretrain-and-probe runs on data set 'nosuch'" in capsys.readouterr().out
