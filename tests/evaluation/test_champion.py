"""The champion decision's statistics: McNemar's exact test, the validation split, the paired probe test."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from eval_synth import write_ff

from ae_repr.config import EvalConfig
from ae_repr.io import read_features
from evaluation.champion import compare_with_champion, mcnemar_exact, paired_probe_test, validation_rows

CFG = EvalConfig(probe_c_grid=(0.1, 1.0), probe_folds=3)


def _upper_tail(b: int, n: int) -> float:
    """P(X >= b) for X ~ Binomial(n, 1/2), by counting."""
    return sum(math.comb(n, k) for k in range(b, n + 1)) / 2**n


def _pairs(b: int, c: int, both: int, neither: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row correctness of two models with the given discordant and concordant counts."""
    new = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    old = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    return new, old


@pytest.mark.parametrize(("b", "c"), [(12, 3), (3, 12), (5, 5), (9, 0), (1, 0), (40, 22)])
def test_mcnemar_exact_one_sided_p_values(b, c):
    new, old = _pairs(b, c, both=100, neither=7)
    test = mcnemar_exact(new, old, alpha=0.05)
    assert (test.new_only, test.champion_only, test.val_rows) == (b, c, b + c + 107)
    assert test.p_value == pytest.approx(_upper_tail(b, b + c), rel=1e-12)
    assert test.new_val_accuracy == pytest.approx((b + 100) / (b + c + 107))
    assert test.champion_val_accuracy == pytest.approx((c + 100) / (b + c + 107))
    assert test.better is (_upper_tail(b, b + c) <= 0.05)


def test_mcnemar_exact_known_values_and_edges():
    assert mcnemar_exact(*_pairs(12, 3, 0, 0)).p_value == pytest.approx(576 / 32768)  # (C(15,12..15)) / 2^15
    assert mcnemar_exact(*_pairs(12, 3, 0, 0)).better
    assert mcnemar_exact(*_pairs(12, 3, 0, 0), alpha=0.01).better is False
    # 0.5 percentage points better on 450 rows (the old margin rule promoted this): p far above 0.05
    small = mcnemar_exact(*_pairs(14, 12, 380, 44))
    assert small.new_val_accuracy - small.champion_val_accuracy == pytest.approx(2 / 450)
    assert small.p_value == pytest.approx(_upper_tail(14, 26)) and small.p_value > 0.3 and not small.better
    same = mcnemar_exact(*_pairs(0, 0, 30, 5))  # identical predictions: nothing to test
    assert same.p_value == 1.0 and not same.better
    with pytest.raises(ValueError, match="equal 1-D"):
        mcnemar_exact(np.ones(3, bool), np.ones(4, bool))


def test_validation_rows_are_a_stratified_seeded_part_of_train(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "a.parquet", synth, synth.x[:, :4]))
    fit, val = validation_rows(ff, 0.2, seed=0)
    train = np.flatnonzero(synth.train)
    assert not np.intersect1d(fit, val).size and np.array_equal(np.sort(np.concatenate([fit, val])), train)
    for c in np.unique(synth.y):  # 45 train rows per class: 9 of them validate
        assert (synth.y[val] == c).sum() == round(0.2 * (synth.y[train] == c).sum()) == 9
    again_fit, again_val = validation_rows(ff, 0.2, seed=0)
    assert np.array_equal(again_val, val) and np.array_equal(again_fit, fit)
    assert not np.array_equal(np.sort(validation_rows(ff, 0.2, seed=1)[1]), np.sort(val))


def test_paired_probe_test_prefers_the_informative_code(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "a.parquet", synth, synth.x[:, :4]))
    noise = np.random.default_rng(0).normal(size=(len(synth.y), 4)).astype(np.float32)
    good = synth.x[:, :4]
    better = paired_probe_test(good, noise, ff, CFG)
    assert better.val_rows == 36 and better.better and better.p_value < 1e-4
    assert better.new_val_accuracy > 0.8 and better.champion_val_accuracy < 0.5
    assert better.new_only - better.champion_only == round(
        (better.new_val_accuracy - better.champion_val_accuracy) * better.val_rows)
    worse = paired_probe_test(noise, good, ff, CFG)
    assert not worse.better and worse.p_value > 0.99
    tie = paired_probe_test(good, good.copy(), ff, CFG)
    assert (tie.new_only, tie.champion_only, tie.p_value) == (0, 0, 1.0)


def test_compare_with_champion_encodes_the_raw_rows(tmp_path, synth):
    ff = read_features(write_ff(tmp_path / "a.parquet", synth, synth.x[:, :4]))

    class FirstColumns(torch.nn.Module):
        """Raw rows -> columns 4..7 (a stand-in for a registered encoder)."""

        def __init__(self) -> None:
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, 4:8] + self.unused

    got = compare_with_champion(ff, FirstColumns(), CFG)
    assert got == paired_probe_test(synth.x[:, :4], synth.x[:, 4:8], ff, CFG)


def _wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval, from its formula."""
    p = k / n
    mid, half = (p + z**2 / (2 * n)) / (1 + z**2 / n), z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return mid - half, mid + half


@pytest.mark.parametrize(("b", "c", "both", "neither"), [(12, 3, 100, 7), (14, 12, 380, 44), (0, 5, 40, 2), (9, 0, 0, 0)])
def test_paired_test_reports_accuracies_and_margin_with_intervals(b, c, both, neither):
    from scipy.stats import beta

    t = mcnemar_exact(*_pairs(b, c, both, neither))
    n, d = b + c + both + neither, b + c
    assert t.margin == pytest.approx((b - c) / n)
    for acc, k in ((t.new_val_accuracy, b + both), (t.champion_val_accuracy, c + both)):
        assert t.accuracy_interval(acc) == pytest.approx(_wilson(k, n))
    # Clopper-Pearson on the new model's share of the discordant rows, from beta quantiles
    lo = beta.ppf(0.025, b, d - b + 1) if b else 0.0
    hi = beta.ppf(0.975, b + 1, d - b) if b < d else 1.0
    assert t.margin_interval() == pytest.approx(((2 * lo - 1) * d / n, (2 * hi - 1) * d / n))
    low, high = t.margin_interval()
    assert low <= t.margin <= high
    # the two-sided 95% interval clears 0 exactly when the one-sided test rejects at 0.025
    assert (low > 0) is (t.p_value <= 0.025)
    numbers = t.as_dict()
    assert (numbers["margin/ci_low"], numbers["margin/ci_high"]) == pytest.approx((low, high))
    assert numbers["new_val_accuracy/ci_low"] == pytest.approx(_wilson(b + both, n)[0])
    assert f"margin {t.margin:+.4f} [{low:+.4f}, {high:+.4f}]" in t.describe()
    lo_new, hi_new = _wilson(b + both, n)
    assert f"new {t.new_val_accuracy:.4f} [{lo_new:.4f}, {hi_new:.4f}]" in t.describe()


def test_the_raw_rows_behind_features_follow_a_changed_data_file(tmp_path):
    """A data file rewritten in the same process (a retrain on changed data) is read again, not served stale."""
    from types import SimpleNamespace

    import pandas as pd

    from ae_repr.data import load_dataset
    from evaluation.inputs import dataset_of

    path = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    seen = []
    for _ in range(2):
        np.savez(path, x=rng.normal(size=(40, 3)).astype(np.float32), y=np.arange(40) % 2)
        ds = load_dataset(str(path))
        ff = SimpleNamespace(meta={"dataset": str(path), "dataset_sha256": ds.sha256}, path=tmp_path / "f.parquet",
                             frame=pd.DataFrame({"sample_id": ds.sample_id}))
        got, pos = dataset_of(ff)
        assert got.sha256 == ds.sha256
        np.testing.assert_array_equal(got.x[pos], ds.x)
        seen.append(got.sha256)
    assert seen[0] != seen[1]
