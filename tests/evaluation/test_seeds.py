"""Seed grids in the results: the aggregate rows (mean, n_seeds, Student-t interval over seeds), the names of a
grid's members, and the report and verdict ranking the aggregates instead of the per-seed rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ae_repr.config import EvalConfig, ExperimentConfig
from ae_repr.seeds import grid_members, pretraining_seeds, seed_name, split_seed_name
from evaluation.report import write_report
from evaluation.results import CI_PRETRAINING_SEEDS, result_frame, result_row
from evaluation.seeds import first_seed_names, representative_member, seed_aggregates, with_seed_aggregates
from evaluation.verdict import RunFacts, verdict

CFG = EvalConfig(knn_k=(5,), fewshot_k=(5,))


def _boot(name: str, task: str, metric: str, value: float, k: int | None = None, half: float = 0.005) -> dict:
    """A per-representation row with a narrow test-row bootstrap interval."""
    return result_row(name, task, metric, value, k=k, n_seeds=1000, ci_low=value - half, ci_high=value + half,
                      ci_method="test_bootstrap")


def _grid(probe: dict[str, list[float]], baselines: dict[str, float] | None = None) -> pd.DataFrame:
    """Linear-probe rows of `<variant>@seed=<s>` for each variant's seeds 0.., plus baseline rows."""
    rows = [_boot(seed_name(v, s), "linear_probe", "accuracy", x) for v, xs in probe.items() for s, x in enumerate(xs)]
    rows += [_boot(b, "linear_probe", "accuracy", x) for b, x in (baselines or {}).items()]
    return result_frame(rows)


def _independent(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval through scipy's own interval function (not the code under test's formula)."""
    v = np.asarray(values)
    lo, hi = stats.t.interval(0.95, df=len(v) - 1, loc=v.mean(), scale=stats.sem(v))
    return float(v.mean()), float(lo), float(hi)


def test_names_round_trip_and_only_seed_names_parse():
    assert seed_name("beta_vae", 12) == "beta_vae@seed=12"
    assert split_seed_name("beta_vae@seed=12") == ("beta_vae", 12)
    for other in ("beta_vae", "beta_vae@beta=0.5", "pca", "ae@seed=", "ae@seed=x"):
        assert split_seed_name(other) == (other, None)


def test_members_one_per_variant_and_seed_and_plain_names_without_a_grid():
    cfg = ExperimentConfig().with_overrides(variants=["ae", "vae"])
    plain = grid_members(cfg)
    assert [(m.name, m.seed, m.grid_seed) for m in plain] == [("ae", 0, None), ("vae", 0, None)]
    assert all(m.cfg is cfg for m in plain)  # without a grid a model trains with the config as it is
    grid = grid_members(cfg.with_seeds("2,0"))
    assert pretraining_seeds(cfg.with_seeds("2,0")) == (0, 2)  # ascending: the same seeds are the same grid
    assert [m.name for m in grid] == ["ae@seed=0", "ae@seed=2", "vae@seed=0", "vae@seed=2"]
    assert [(m.cfg.seed, m.cfg.train.seeds) for m in grid[:2]] == [(0, None), (2, None)]
    assert grid[1].cfg.data == cfg.data  # the split stays data.split_seed
    # a single explicit seed: the plain name, trained with that seed
    (one,) = grid_members(cfg.with_overrides(variants=["ae"]).with_seeds([5]))
    assert (one.name, one.cfg.seed, one.grid_seed) == ("ae", 5, None)


def test_aggregate_is_the_mean_with_a_t_interval_over_seeds():
    probe = {"ae": [0.90, 0.92, 0.97], "vae": [0.80, 0.85, 0.81]}
    results = _grid(probe, baselines={"pca": 0.88})
    knn = [_boot(seed_name("ae", s), "knn", "accuracy_5nn", x) for s, x in enumerate([0.7, 0.75, 0.8])]
    fewshot = [result_row(seed_name("ae", s), "fewshot_frozen", "accuracy", x, k=5, n_seeds=5, ci_low=x - 0.1,
                          ci_high=x + 0.1, ci_method="fewshot_episodes") for s, x in enumerate([0.5, 0.6, 0.55])]
    results = result_frame(pd.concat([results, result_frame(knn + fewshot)]))
    agg = seed_aggregates(results).set_index(["representation", "task", "metric"])
    assert len(agg) == 4  # ae x (probe, knn, few-shot k=5), vae x probe; nothing for the baseline
    for (name, task, metric), values in [(("ae", "linear_probe", "accuracy"), probe["ae"]),
                                         (("vae", "linear_probe", "accuracy"), probe["vae"]),
                                         (("ae", "knn", "accuracy_5nn"), [0.7, 0.75, 0.8]),
                                         (("ae", "fewshot_frozen", "accuracy"), [0.5, 0.6, 0.55])]:
        row = agg.loc[(name, task, metric)]
        mean, lo, hi = _independent(values)
        assert row["value"] == pytest.approx(mean) and row["n_seeds"] == 3
        assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        assert row["ci_method"] == CI_PRETRAINING_SEEDS
    assert agg.loc[("ae", "fewshot_frozen", "accuracy"), "k"] == 5 and pd.isna(agg.loc[("ae", "knn", "accuracy_5nn"), "k"])
    # by hand: mean 0.93, sd 0.0360555, t(0.975, 2) = 4.302653 -> half width 0.0895665
    ae = agg.loc[("ae", "linear_probe", "accuracy")]
    assert (ae["ci_low"], ae["ci_high"]) == (pytest.approx(0.93 - 0.0895665, abs=1e-6),
                                             pytest.approx(0.93 + 0.0895665, abs=1e-6))


def test_missing_seeds_and_non_finite_values_count_out():
    results = _grid({"ae": [0.9, 0.94], "vae": [0.8]})
    nan = result_frame([result_row(seed_name("ae", 2), "linear_probe", "accuracy", float("nan"))])
    agg = seed_aggregates(result_frame(pd.concat([results, nan]))).set_index("representation")
    assert agg.loc["ae", "n_seeds"] == 2 and agg.loc["ae", "value"] == pytest.approx(0.92)
    # one seed left: its value, no interval
    assert agg.loc["vae", "n_seeds"] == 1 and agg.loc["vae", "value"] == pytest.approx(0.8)
    assert pd.isna(agg.loc["vae", "ci_low"]) and pd.isna(agg.loc["vae", "ci_method"])


def test_rows_sharing_a_key_pair_by_position():
    rows = [result_row(seed_name("ae", s), "inpainting", "mse_masked", x) for s, xs in enumerate([(1.0, 10.0), (3.0, 30.0)])
            for x in xs]
    agg = seed_aggregates(result_frame(rows))
    assert list(agg["value"]) == [2.0, 20.0]


def test_without_a_grid_nothing_is_added():
    results = result_frame([_boot("ae", "linear_probe", "accuracy", 0.9), _boot("pca", "linear_probe", "accuracy", 0.8),
                            _boot("beta_vae@beta=4", "rate_distortion", "rate", 3.0)])
    assert seed_aggregates(results).empty
    pd.testing.assert_frame_equal(with_seed_aggregates(results), results)


def test_first_seed_names_keep_one_member_per_variant():
    names = ["ae@seed=2", "ae@seed=10", "pca", "vae@seed=3", "vae@seed=1", "application_baselines"]
    assert first_seed_names(names) == ["ae@seed=2", "pca", "vae@seed=1", "application_baselines"]


def test_verdict_and_report_rank_the_aggregates_on_the_seed_intervals(tmp_path):
    # each seed's own bootstrap interval is narrow: per seed, ae@seed=2 (0.99) would stand clear of every other
    # row; over seeds, ae's interval is wide and overlaps vae's, so ae and vae tie
    results = with_seed_aggregates(_grid({"ae": [0.90, 0.95, 0.99], "vae": [0.93, 0.94, 0.945]}, {"pca": 0.70}))
    text = verdict(results, RunFacts("digits", 16, 64))
    mean, lo, hi = _independent([0.90, 0.95, 0.99])
    assert text.startswith(f"On digits (K=16), ae is best by linear-probe test accuracy at {mean:.3f} "
                           f"[{lo:.3f}, {hi:.3f}], tied with vae.")
    assert "mean over 3 pretraining seeds" in text
    report = write_report(tmp_path / "report.md", results, CFG, verdict=text).read_text()
    rows = [line.split(" |")[0].removeprefix("| ") for line in report.splitlines() if line.startswith("| ")]
    assert rows[1:4] == ["ae", "vae", "pca"] and not any("@seed=" in r for r in rows)
    assert f"| ae | {mean:.3f} [{lo:.3f}, {hi:.3f}] |" in report
    assert "mean over the 3 seeds" in report and "over pretraining seeds" in report
    assert "tie: ae, vae" in report  # the probe column's winner row: no bold, the aggregates tie


def test_report_without_a_grid_says_nothing_of_seeds(tmp_path):
    results = result_frame([_boot("ae", "linear_probe", "accuracy", 0.9), _boot("pca", "linear_probe", "accuracy", 0.8)])
    report = write_report(tmp_path / "report.md", results, CFG).read_text()
    text = verdict(results, RunFacts("digits", 16, 64))
    assert "Seed grid" not in report and "pretraining seeds" not in text


def test_the_representative_seed_is_the_one_nearest_the_mean():
    # ae: mean 0.93; seed 1 (0.92) is nearer than seed 0 (0.90) or seed 2 (0.97)
    results = with_seed_aggregates(_grid({"ae": [0.90, 0.92, 0.97], "vae": [0.80, 0.90]}, {"pca": 0.7}))
    assert representative_member(results, "ae") == "ae@seed=1"
    assert representative_member(results, "vae") == "vae@seed=0"  # equally near: the smaller seed
    assert representative_member(results, "pca") == "pca"  # no grid: itself
    # without labels there is no probe: the first seed
    no_probe = result_frame([result_row(seed_name("ae", s), "reduction", "recon_mse", 0.1) for s in (3, 1)])
    assert representative_member(no_probe, "ae") == "ae@seed=1"
