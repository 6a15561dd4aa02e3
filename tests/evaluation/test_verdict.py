"""The verdict and the report's winners on constructed summaries: bold only beyond the intervals, ties, chance."""

from __future__ import annotations

import pandas as pd
import pytest

from ae_repr.config import EvalConfig
from evaluation.report import write_report
from evaluation.results import result_frame, result_row
from evaluation.verdict import RunFacts, bottleneck_warning, column_bounds, standing, verdict

CFG = EvalConfig(knn_k=(5,), fewshot_k=(5,))


def _summary(probe: dict[str, tuple[float, float, float]], chance: float | None = None) -> pd.DataFrame:
    """Linear-probe accuracy rows {name: (value, lo, hi)}, and a chance row."""
    rows = [
        result_row(name, "linear_probe", "accuracy", v, n_seeds=1000, ci_low=lo, ci_high=hi, ci_method="test_bootstrap")
        for name, (v, lo, hi) in probe.items()
    ]
    if chance is not None:
        rows.append(result_row("majority_class", "chance", "accuracy", chance, n_seeds=1000, ci_low=chance - 0.05,
                               ci_high=chance + 0.05, ci_method="test_bootstrap"))
    return result_frame(rows)


DIGITS = RunFacts("digits", 16, 64)


def _probe_row(report: str, name: str) -> str:
    return next(line for line in report.splitlines() if line.startswith(f"| {name} |"))


def test_a_separated_winner_is_named_and_bold(tmp_path):
    s = _summary({"dae": (0.96, 0.95, 0.97), "ae": (0.90, 0.88, 0.92), "pca": (0.85, 0.83, 0.87),
                  "raw": (0.93, 0.91, 0.94)}, chance=0.10)
    text = verdict(s, DIGITS)
    assert text.startswith("On digits (K=16), dae is best by linear-probe test accuracy at 0.960 [0.950, 0.970], "
                           "ahead of every other representation beyond the intervals.")
    assert "dae and ae beat every baseline of width K beyond the intervals (best: pca (0.850 [0.830, 0.870]))" in text
    assert "chance level" not in text and "Chance (always the most frequent train class) is 0.100." in text
    report = write_report(tmp_path / "report.md", s, CFG, verdict=text).read_text()
    assert report.splitlines()[2] == f"**Verdict.** {text}"
    assert _probe_row(report, "dae").startswith("| dae | **0.960 [0.950, 0.970]** |")
    assert "**" not in _probe_row(report, "raw") and "**" not in _probe_row(report, "ae")
    assert _probe_row(report, "*winner*").startswith("| *winner* | **dae** |")


def test_overlapping_intervals_are_a_tie_and_nothing_is_bold(tmp_path):
    s = _summary({"dae": (0.96, 0.95, 0.97), "ae": (0.90, 0.88, 0.92), "pca": (0.94, 0.92, 0.955),
                  "raw": (0.955, 0.94, 0.965)}, chance=0.10)
    text = verdict(s, DIGITS)
    assert "dae is best by linear-probe test accuracy at 0.960 [0.950, 0.970], tied with raw and pca." in text
    assert "No learned representation beats pca (0.940 [0.920, 0.955]) by more than its interval." in text
    report = write_report(tmp_path / "report.md", s, CFG, verdict=text).read_text()
    assert "**0.960" not in report
    assert _probe_row(report, "*winner*").startswith("| *winner* | tie: dae, raw, pca |")


def test_a_baseline_ahead_of_every_learned_representation(tmp_path):
    s = _summary({"vae": (0.80, 0.77, 0.83), "pca": (0.90, 0.88, 0.92)})
    text = verdict(s, DIGITS)
    assert text.startswith("On digits (K=16), pca is best by linear-probe test accuracy at 0.900 [0.880, 0.920], "
                           "ahead of every other representation")
    assert "The best learned representation, vae, is at 0.800 [0.770, 0.830]." in text
    assert "Every learned representation falls short of pca (0.900 [0.880, 0.920]) beyond the intervals." in text


def test_random_labels_read_as_a_tie_at_chance(tmp_path):
    """The reported case: ae's 0.200 was bold as the best; with four random labels it is chance."""
    s = _summary({"ae": (0.200, 0.13, 0.28), "raw": (0.19, 0.12, 0.27), "pca": (0.18, 0.11, 0.26)}, chance=0.26)
    text = verdict(s, RunFacts("table.parquet", 16, 10))
    assert "ae is best by linear-probe test accuracy at 0.200 [0.130, 0.280], tied with raw and pca." in text
    assert "That is chance level" in text and "majority-class rate 0.260" in text
    report = write_report(tmp_path / "report.md", s, CFG, verdict=text).read_text()
    assert "**0.200" not in report
    assert _probe_row(report, "*winner*").startswith("| *winner* | tie at chance |")


def test_a_separated_best_below_chance_is_not_bold(tmp_path):
    s = _summary({"ae": (0.30, 0.25, 0.35), "pca": (0.10, 0.05, 0.15)}, chance=0.40)
    assert "chance level" in verdict(s, DIGITS)
    report = write_report(tmp_path / "report.md", s, CFG).read_text()
    assert "**" not in _probe_row(report, "ae")


def test_numbers_without_intervals_claim_no_winner(tmp_path):
    s = result_frame([result_row("ae", "linear_probe", "accuracy", 0.9), result_row("pca", "linear_probe", "accuracy", 0.5)])
    text = verdict(s, DIGITS)
    assert "ae is best by linear-probe test accuracy at 0.900 (no interval), but not every representation has an " \
           "interval, so no ranking is claimed." in text
    report = write_report(tmp_path / "report.md", s, CFG).read_text()
    assert "**" not in _probe_row(report, "ae")
    assert _probe_row(report, "*winner*").startswith("| *winner* | no interval |")


def test_lower_is_better_columns_pick_the_lowest():
    s = result_frame([
        result_row(n, "reduction", "recon_mse", v, ci_low=v - 0.01, ci_high=v + 0.01, ci_method="test_bootstrap")
        for n, v in {"ae": 0.10, "pca": 0.30, "vae": 0.12}.items()
    ])
    st = standing(column_bounds(s, "reduction", "recon_mse"), higher_is_better=False)
    assert st is not None and st.best == "ae" and st.tied == ("vae",) and st.winner is None


def test_bottleneck_warning_when_the_latent_is_as_wide_as_the_input():
    s = _summary({"ae": (0.9, 0.88, 0.92), "pca": (0.8, 0.78, 0.82)})
    for k, d in ((16, 10), (10, 10)):
        facts = RunFacts("table.parquet", k, d)
        assert bottleneck_warning(facts) is not None
        assert f"the latent width K={k} is at or above the input width {d}" in verdict(s, facts)
    assert bottleneck_warning(RunFacts("digits", 16, 64)) is None
    assert "bottleneck" not in verdict(s, RunFacts("digits", 16, 64))
    assert "bottleneck" not in verdict(s, RunFacts("digits", 16, None))


def test_without_labels_the_verdict_says_so():
    s = result_frame([result_row("ae", "reduction", "trustworthiness", 0.9)])
    assert "no representation has a linear-probe accuracy" in verdict(s, RunFacts("/data/x.npy", 8, 100))
    assert verdict(s, RunFacts("/data/x.npy", 8, 100)).startswith("On x.npy (K=8) ")


@pytest.mark.parametrize("name", ["ae@seed=0"])
def test_per_seed_rows_do_not_compete(name):
    s = _summary({"ae": (0.9, 0.88, 0.92), name: (0.99, 0.985, 0.995), "pca": (0.8, 0.78, 0.82)})
    assert verdict(s, DIGITS).startswith("On digits (K=16), ae is best")
