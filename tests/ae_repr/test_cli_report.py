"""`ae-repr report DIR`: report.md and verdict.md written again from a run directory's files, nothing recomputed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ae_repr.cli import main
from ae_repr.config import ExperimentConfig
from evaluation.results import result_frame, result_row, write_results


def _run_dir(root: Path) -> Path:
    out = root / "run"
    rows = [
        result_row("ae", "linear_probe", "accuracy", 0.9581, ci_low=0.9383, ci_high=0.9762, ci_method="test_bootstrap"),
        result_row("raw", "linear_probe", "accuracy", 0.7012, ci_low=0.6503, ci_high=0.7498, ci_method="test_bootstrap"),
    ]
    write_results(out / "summary.parquet", result_frame(rows))
    # the notes live in the per-representation result files, the figures in plots/: both are only read
    write_results(out / "eval" / "representations" / "ae.parquet", result_frame(rows[:1]),
                  notes=["ae: a note from the evaluation"])
    (out / "plots" / "ae").mkdir(parents=True)
    (out / "plots" / "ae" / "latent_hist.png").write_bytes(b"\x89PNG")
    (out / "config.json").write_text(json.dumps(ExperimentConfig().model_dump(mode="json")))
    return out


def test_report_rerenders_from_the_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from evaluation import representations_dir

    out = _run_dir(tmp_path)
    assert representations_dir(out) == out / "eval" / "representations"  # where the test put the result file
    before = (out / "summary.parquet").read_bytes()
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    verdict = (out / "verdict.md").read_text().strip()
    assert "0.958" in report and "0.701" in report  # the summary's numbers, not recomputed ones
    assert verdict and verdict.split()[0] in report
    assert "ae: a note from the evaluation" in report
    assert "(plots/ae/latent_hist.png)" in report
    assert (out / "summary.parquet").read_bytes() == before
    assert not (out / "features").exists()  # nothing evaluated: no baselines or features written
    assert str(out / "report.md") in capsys.readouterr().out


@pytest.mark.parametrize("broken", ["missing", "no_summary", "bad_summary", "bad_config"])
def test_report_bad_dir_is_one_line_and_exit_2(broken: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = _run_dir(tmp_path)
    if broken == "missing":
        out = tmp_path / "nope"
    elif broken == "no_summary":
        (out / "summary.parquet").unlink()
    elif broken == "bad_summary":
        (out / "summary.parquet").write_text("not parquet")
    else:
        (out / "config.json").write_text('{"eval": {"nonsense": 1}}')
    (out / "report.md").unlink(missing_ok=True)
    assert main(["report", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ae-repr: error:"), err
    assert not (out / "report.md").exists()
