"""Few-shot classification: k labelled train examples per class, several seeds, mean and a 95% Student-t interval.

Episodes: for each k in `EvalConfig.fewshot_k` and seed s in 0..fewshot_seeds-1, k train rows per
class are drawn without replacement with `numpy.random.default_rng([seed, s, k])` from the train rows
ordered by sample_id, so every representation of a data set sees the same examples. A k larger than
the smallest train class is skipped with a warning. Each arm reports test `accuracy` per k as one row:
`value` = mean over seeds, `n_seeds`, and `ci_low`/`ci_high` = mean -/+ t(0.975, n-1) * sd / sqrt(n)
(`ci_method` `fewshot_episodes`).

`fewshot_frozen` fits the same logistic head as the linear probe (`fit_frozen_head`) with the fixed
C = `EvalConfig.fewshot_c` (k*C rows are too few to cross-validate) on the frozen features.
The end-to-end arms (`fewshot_finetune`, `fewshot_scratch`) live in `evaluation.finetune`; they start from
the same head on their encoder's encodings of the shots (`shots_head`). A learned representation's heads
are kept for them: the fine-tune arm's encoder is the one that wrote the features, so where its encodings
are the same bits (the batch size can change the last bits of a convolution) the frozen arm's head is reused.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.metrics import accuracy_score
from sklearn.pipeline import Pipeline

from ae_repr.config import EvalConfig
from ae_repr.io import FeatureFile

from .inputs import SharedResults, digest, is_learned, labels, split_mask
from .probe import fit_frozen_head
from .results import CI_FEWSHOT_EPISODES, result_frame, result_row

log = logging.getLogger(__name__)


def t_interval(values: np.ndarray | list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean and two-sided Student-t confidence interval of the mean."""
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if len(v) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return mean, mean - half, mean + half


def usable_k(
    ff: FeatureFile, cfg: EvalConfig, *, task: str | None = None
) -> tuple[list[int], list[int], int]:
    """The few-shot k values that fit every train class, those skipped, and the smallest class size.

    With `task` given, each skipped k is logged as a warning naming the task.
    """
    smallest = int(ff.frame.loc[split_mask(ff, "train"), "label"].value_counts().min())
    ok = [k for k in cfg.fewshot_k if k <= smallest]
    skipped = [k for k in cfg.fewshot_k if k > smallest]
    for k in skipped if task else ():
        log.warning(
            "%s: %s k=%d skipped: the smallest train class has %d examples", ff.name, task, k, smallest
        )
    return ok, skipped, smallest


def fewshot_episodes(ff: FeatureFile, k: int, n_seeds: int, *, seed: int = 0) -> list[np.ndarray]:
    """Row positions of k train examples per class, one array per seed (k must fit every class)."""
    rows = np.flatnonzero(split_mask(ff, "train"))
    rows = rows[np.argsort(ff.frame["sample_id"].to_numpy()[rows], kind="stable")]
    y = labels(ff)[rows]
    classes = np.unique(y)
    episodes = []
    for s in range(n_seeds):
        rng = np.random.default_rng([seed, s, k])
        episodes.append(np.concatenate([rng.choice(rows[y == c], k, replace=False) for c in classes]))
    return episodes


def fewshot_row(representation: str, task: str, k: int, accuracies: list[float]) -> dict:
    """The summary row of one arm at one k: mean accuracy over seeds with its t interval."""
    mean, lo, hi = t_interval(accuracies)
    return result_row(
        representation, task, "accuracy", mean, k=k, n_seeds=len(accuracies), ci_low=lo, ci_high=hi,
        ci_method=CI_FEWSHOT_EPISODES,
    )


_SHOT_HEADS: SharedResults[Pipeline] = SharedResults()


def shots_head(z: np.ndarray, y: np.ndarray, cfg: EvalConfig, *, keep: bool = True) -> Pipeline:
    """The logistic head (C = fewshot_c) on one episode's shot encodings `z`; with `keep`, fitted once per process
    for the same encodings and labels. No CV and one C: the fit draws nothing at random, so no seed enters it."""
    def fit() -> Pipeline:
        head = fit_frozen_head(z, y, Cs=(cfg.fewshot_c,), folds=0)
        assert isinstance(head, Pipeline)
        return head

    return _SHOT_HEADS.get(digest(z, y, np.asarray(cfg.fewshot_c)).hex(), fit) if keep else fit()


def fewshot_frozen(ff: FeatureFile, cfg: EvalConfig, *, seed: int = 0) -> pd.DataFrame:
    """Few-shot test accuracy of a logistic head on the frozen features, per k, over seeds."""
    z, y, te = ff.z, labels(ff), split_mask(ff, "test")
    keep = is_learned(ff)  # the fine-tune arm starts from these heads; a baseline's (raw: 4096 wide) have no reader
    rows = []
    for k in usable_k(ff, cfg, task="fewshot_frozen")[0]:
        accs = []
        for shots in fewshot_episodes(ff, k, cfg.fewshot_seeds, seed=seed):
            head = shots_head(z[shots], y[shots], cfg, keep=keep)
            accs.append(accuracy_score(y[te], head.predict(z[te])))
        rows.append(fewshot_row(ff.name, "fewshot_frozen", k, accs))
    return result_frame(rows)
