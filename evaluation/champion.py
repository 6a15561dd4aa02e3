"""Whether a retrained encoder is better than the champion: a paired test on a validation split.

Both representations of the same rows get the linear-probe head (`probe.fit_frozen_head`, C chosen by
stratified CV as in the linear probe) fitted on the train split minus a validation part, and are scored
on that validation part; the test split is never looked at, so it stays untouched for reporting. The
validation part is carved from the train rows, stratified by label and seeded (`stratified_split`, the
data's own split rule, over the rows in sample_id order): every run over the same data picks the same
rows. The two heads' per-row correctness goes into McNemar's exact test: of the discordant rows (one
head right, the other wrong), the number the new head gets right is Binomial(b + c, 1/2) when both are
equally good, and the one-sided p-value is P(X >= b). The new model is promoted only when p <= alpha.

What a decision reports beside p: each head's validation accuracy with its 95% Wilson interval, and the
margin (new minus champion accuracy, (b - c) / n) with a 95% interval conditional on the b + c discordant
rows, as the test is: the Clopper-Pearson interval of the new head's share b / (b + c) of them, mapped
through (2 share - 1)(b + c) / n. The one-sided test at alpha = 0.05 rejects exactly when the one-sided
95% lower bound of that share exceeds 1/2, so this two-sided interval can still reach 0 for
0.025 < p <= 0.05.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.stats import binomtest

from ae_repr.config import EvalConfig
from ae_repr.data.dataset import stratified_split
from ae_repr.io import FeatureFile

from .inputs import dataset_of, labels, split_mask
from .probe import cv_rows, fit_frozen_head

log = logging.getLogger(__name__)
CONFIDENCE = 0.95  # of the intervals a decision reports (as evaluation.intervals)


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact one-sided test of a new model against the champion on the same validation rows."""

    val_rows: int  # validation rows both models were scored on
    new_val_accuracy: float
    champion_val_accuracy: float
    new_only: int  # rows the new model gets right and the champion wrong (b)
    champion_only: int  # rows the champion gets right and the new model wrong (c)
    p_value: float  # P(X >= b), X ~ Binomial(b + c, 1/2); 1 when no row is discordant
    alpha: float

    @property
    def better(self) -> bool:
        """The new model is significantly better at level alpha."""
        return self.p_value <= self.alpha

    @property
    def margin(self) -> float:
        """New minus champion validation accuracy: (b - c) / rows."""
        return (self.new_only - self.champion_only) / self.val_rows if self.val_rows else 0.0

    def margin_interval(self) -> tuple[float, float]:
        """The margin's 95% interval given the discordant rows: Clopper-Pearson on b / (b + c), as (2 s - 1)(b + c) / n."""
        discordant = self.new_only + self.champion_only
        if not discordant:
            return 0.0, 0.0
        share = binomtest(self.new_only, discordant).proportion_ci(CONFIDENCE, method="exact")
        scale = discordant / self.val_rows
        return (2 * share.low - 1) * scale, (2 * share.high - 1) * scale

    def accuracy_interval(self, accuracy: float) -> tuple[float, float]:
        """The 95% Wilson interval of a validation accuracy over the `val_rows` rows."""
        if not self.val_rows:
            return float("nan"), float("nan")
        ci = binomtest(round(accuracy * self.val_rows), self.val_rows).proportion_ci(CONFIDENCE, method="wilson")
        return float(ci.low), float(ci.high)

    def describe(self) -> str:
        """One line: accuracies and the margin with their intervals, discordant counts, p-value against alpha."""
        relation = "<=" if self.better else ">"

        def acc(a: float) -> str:
            lo, hi = self.accuracy_interval(a)
            return f"{a:.4f} [{lo:.4f}, {hi:.4f}]"

        lo, hi = self.margin_interval()
        return (f"validation accuracy new {acc(self.new_val_accuracy)} vs champion {acc(self.champion_val_accuracy)} "
                f"on {self.val_rows} rows, margin {self.margin:+.4f} [{lo:+.4f}, {hi:+.4f}] (95% intervals); "
                f"discordant {self.new_only} new-only vs {self.champion_only} champion-only correct, McNemar exact "
                f"one-sided p = {self.p_value:.4g} {relation} alpha {self.alpha:g}")

    def as_dict(self) -> dict[str, float | int]:
        """The numbers by field name, the margin, and each interval as `<name>/ci_low`, `<name>/ci_high`."""
        out: dict[str, float | int] = {**asdict(self), "margin": self.margin}
        bounds = {"new_val_accuracy": self.accuracy_interval(self.new_val_accuracy),
                  "champion_val_accuracy": self.accuracy_interval(self.champion_val_accuracy),
                  "margin": self.margin_interval()}
        for name, (lo, hi) in bounds.items():
            out[f"{name}/ci_low"], out[f"{name}/ci_high"] = float(lo), float(hi)
        return out


def mcnemar_exact(new_correct: np.ndarray, champion_correct: np.ndarray, alpha: float = 0.05) -> PairedTest:
    """One-sided McNemar exact test that the new model's per-row correctness beats the champion's."""
    new_correct, champion_correct = np.asarray(new_correct, bool), np.asarray(champion_correct, bool)
    if new_correct.shape != champion_correct.shape or new_correct.ndim != 1:
        raise ValueError(f"paired correctness needs two equal 1-D arrays, got {new_correct.shape} "
                         f"and {champion_correct.shape}")
    b = int((new_correct & ~champion_correct).sum())
    c = int((~new_correct & champion_correct).sum())
    p = binomtest(b, b + c, 0.5, alternative="greater").pvalue if b + c else 1.0
    return PairedTest(len(new_correct), float(new_correct.mean()), float(champion_correct.mean()), b, c, float(p),
                      alpha)


def validation_rows(ff: FeatureFile, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (fit, validation) carved from `ff`'s train split, stratified by label and seeded."""
    train = np.flatnonzero(split_mask(ff, "train"))
    train = train[np.argsort(ff.frame["sample_id"].to_numpy()[train], kind="stable")]  # the same rows every run
    y = labels(ff)[train] if ff.has_labels else None
    carved = stratified_split(len(train), y, fraction, seed)
    return train[carved == "train"], train[carved == "test"]


def encode_raw(encoder: torch.nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Raw rows through a servable encoder (raw inputs in, representation out) in batches, (N, K) float32."""
    # a registered encoder is saved in eval mode, and a reloaded exported graph refuses `.eval()`
    device = next(iter(encoder.parameters()), torch.empty(0)).device
    with torch.inference_mode():
        # float32 rows, as the registered signature takes them (the data may be stored as uint8)
        parts = [encoder(torch.from_numpy(np.ascontiguousarray(x[s : s + batch_size], dtype=np.float32)).to(device))
                 .float().cpu() for s in range(0, len(x), batch_size)]
    return torch.cat(parts).numpy()


def paired_probe_test(
    z_new: np.ndarray, z_champion: np.ndarray, ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0
) -> PairedTest:
    """Linear-probe heads on both representations of `ff`'s rows, fitted and compared on a validation split."""
    if not ff.has_labels:
        raise ValueError(f"{ff.name}: the feature file has no labels to compare the models on")
    if len(z_new) != len(ff.frame) or len(z_champion) != len(ff.frame):
        raise ValueError(f"{ff.name}: {len(z_new)} and {len(z_champion)} code rows for {len(ff.frame)} file rows")
    fit, val = validation_rows(ff, cfg.promotion_val_fraction, seed)
    y = labels(ff)
    # as the linear probe: no C search when a class has fewer than two fit rows
    Cs = cfg.probe_c_grid if np.unique(y[fit], return_counts=True)[1].min() >= 2 else (cfg.fewshot_c,)
    correct = []
    for z in (z_new, z_champion):
        head = fit_frozen_head(z[fit], y[fit], Cs=Cs, folds=cfg.probe_folds, seed=seed, cv_max_rows=cv_rows(cfg, z.shape[1]))
        correct.append(head.predict(z[val]) == y[val])
    test = mcnemar_exact(*correct, alpha=cfg.promotion_alpha)
    log.info("%s: %s", ff.name, test.describe())
    return test


def compare_with_champion(ff: FeatureFile, champion: torch.nn.Module, cfg: EvalConfig, *, seed: int = 0) -> PairedTest:
    """The paired validation test of `ff`'s codes against the champion encoder's codes of the same raw rows."""
    ds, pos = dataset_of(ff)
    return paired_probe_test(ff.z, encode_raw(champion, ds.x[pos]), ff, cfg, seed=seed)
