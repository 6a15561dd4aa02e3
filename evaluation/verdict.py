"""Who leads a column once intervals are counted, and the short verdict that opens the report.

A representation wins a column only when its 95% interval lies clear of every other ranked
representation's interval (no overlap); otherwise those whose intervals overlap the best's are tied
with it. Non-overlap is a conservative test (two intervals that overlap a little can still differ),
chosen because it needs only the summary's own columns. A column where some ranked row has no
interval declares no winner. Accuracy is "at chance" when no representation's interval lies above
the majority-class rate (task `chance`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pandas as pd

from .inputs import BASELINE_NAMES
from .probe import CHANCE_NAME
from .results import CI_PRETRAINING_SEEDS


@dataclass(frozen=True)
class Standing:
    """The best representation of one column by point estimate, and who its interval does not separate from."""

    best: str
    value: float
    lo: float  # NaN when the best has no interval
    hi: float
    tied: tuple[str, ...]  # the others whose interval overlaps the best's, best value first
    complete: bool  # every ranked representation has an interval
    n_ranked: int

    @property
    def winner(self) -> str | None:
        """The best, when its interval separates from every other ranked representation's."""
        return self.best if self.complete and self.n_ranked > 1 and not self.tied else None


@dataclass(frozen=True)
class RunFacts:
    """What the verdict says about the run besides its numbers."""

    dataset: str | None = None  # the data set spec, as recorded in the feature files
    latent_dim: int | None = None  # the learned representations' width K
    input_dim: int | None = None  # the flattened input width D


def column_bounds(results: pd.DataFrame, task: str, metric: str, k: int | None = None) -> pd.DataFrame:
    """`value`, `lo`, `hi` (NaN where absent) per representation of one summary column."""
    sel = (results["task"] == task) & (results["metric"] == metric)
    sel &= results["k"].isna() if k is None else (results["k"] == k).fillna(False)
    rows = results[sel].drop_duplicates("representation").set_index("representation")
    return pd.DataFrame(
        {
            "value": rows["value"].astype(float),
            "lo": rows["ci_low"].astype("Float64").astype(float),
            "hi": rows["ci_high"].astype("Float64").astype(float),
        }
    )


def standing(bounds: pd.DataFrame, *, higher_is_better: bool = True) -> Standing | None:
    """The standing of the ranked rows of `column_bounds` (None when there are none)."""
    bounds = bounds.dropna(subset=["value"])
    if bounds.empty:
        return None
    order = bounds["value"].sort_values(ascending=not higher_is_better, kind="stable").index
    best = bounds.loc[order[0]]
    complete = bool(bounds[["lo", "hi"]].notna().all().all())
    others = bounds.loc[order[1:]]
    if complete:
        tied = others[(others["lo"] <= best["hi"]) & (best["lo"] <= others["hi"])].index
    else:
        tied = others.index  # without intervals nothing is separated
    return Standing(
        str(order[0]), float(best["value"]), float(best["lo"]), float(best["hi"]),
        tuple(map(str, tied)), complete, len(bounds),
    )


def at_chance(bounds: pd.DataFrame, chance: float | None) -> bool:
    """No representation's interval (its value where it has none) lies above the chance level."""
    if chance is None or bounds.empty:
        return False
    floor = bounds["lo"].fillna(bounds["value"])
    return bool((floor <= chance).all())


def chance_accuracy(results: pd.DataFrame) -> float | None:
    """The majority-class test accuracy of the summary's `chance` rows, if there are any."""
    rows = results[(results["task"] == "chance") & (results["metric"] == "accuracy")]
    return float(rows["value"].iloc[0]) if len(rows) else None


def bottleneck_warning(facts: RunFacts) -> str | None:
    """A warning when the latent width is at or above the input width (then no representation compresses)."""
    k, d = facts.latent_dim, facts.input_dim
    if k is None or d is None or k < d:
        return None
    return (
        f"Warning: the latent width K={k} is at or above the input width {d}, so no representation here is a "
        f"bottleneck: PCA with K >= {d} components keeps every direction (its reconstruction error is ~0) and an "
        f"autoencoder can learn the identity. Choose a latent width below {d} to compare compressions."
    )


def interval_text(value: float, lo: float, hi: float, fmt: str = ".3f") -> str:
    """`value [lo, hi]`, or `value (no interval)`."""
    if math.isnan(lo) or math.isnan(hi):
        return f"{value:{fmt}} (no interval)"
    return f"{value:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def _names(names: list[str] | tuple[str, ...]) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _dataset_name(spec: str | None) -> str:
    if not spec:
        return "this data"
    return os.path.basename(spec.rstrip("/\\")) if ("/" in spec or "\\" in spec) else spec


def verdict(results: pd.DataFrame, facts: RunFacts) -> str:
    """A short paragraph from the numbers: the best representation by linear-probe accuracy with its interval,
    whether it separates from the others and from the baselines, chance level, and a bottleneck warning."""
    head = f"On {_dataset_name(facts.dataset)}" + (f" (K={facts.latent_dim})" if facts.latent_dim else "")
    acc = column_bounds(results, "linear_probe", "accuracy")
    acc = acc.loc[[n != CHANCE_NAME and "@" not in n for n in acc.index]]  # per-seed rows: their aggregate competes
    st = standing(acc)
    if st is None:
        sentences = [f"{head} no representation has a linear-probe accuracy (the data has no usable labels), "
                     "so none is ranked; see the reduction and application tables."]
    else:
        sentences = [_lead(head, st), *_seed_note(results, acc), *_learned_vs_baselines(acc, st)]
        chance = chance_accuracy(results)
        if at_chance(acc, chance):
            sentences.append(
                f"That is chance level: no representation's interval lies above the majority-class rate {chance:.3f} "
                "(always predicting the most frequent train class), so none of them predicts these labels."
            )
        elif chance is not None:
            sentences.append(f"Chance (always the most frequent train class) is {chance:.3f}.")
    warning = bottleneck_warning(facts)
    if warning:
        sentences.append(warning)
    return " ".join(sentences)


def _lead(head: str, st: Standing) -> str:
    text = f"{head}, {st.best} is best by linear-probe test accuracy at {interval_text(st.value, st.lo, st.hi)}"
    if st.n_ranked == 1:
        return text + "."
    if not st.complete:
        return text + ", but not every representation has an interval, so no ranking is claimed."
    if st.tied:
        return text + f", tied with {_names(st.tied)}."
    return text + ", ahead of every other representation beyond the intervals."


def _seed_note(results: pd.DataFrame, acc: pd.DataFrame) -> list[str]:
    """With a seed grid: the learned numbers are means over pretraining seeds, their intervals over the seeds."""
    rows = results[(results["task"] == "linear_probe") & (results["metric"] == "accuracy")
                   & (results["ci_method"] == CI_PRETRAINING_SEEDS).fillna(False) & results["representation"].isin(acc.index)]
    if rows.empty:
        return []
    n = int(rows["n_seeds"].max())
    return [f"Learned representations are scored as the mean over {n} pretraining seeds, with the interval over "
            "the seeds."]


def _learned_vs_baselines(acc: pd.DataFrame, st: Standing) -> list[str]:
    """How the learned representations compare with the baselines (PCA and the other width-K ones before raw)."""
    learned = [n for n in acc.index if n not in BASELINE_NAMES]
    baselines = [n for n in acc.index if n in BASELINE_NAMES]
    if not learned or not baselines or not st.complete:
        return []
    out = []
    best_learned = acc.loc[learned, "value"].idxmax()
    if st.best != best_learned:
        row = acc.loc[best_learned]
        out.append(f"The best learned representation, {best_learned}, is at {interval_text(*row)}.")
    reference = [b for b in baselines if b != "raw"] or baselines  # raw is not a width-K representation
    bb = acc.loc[reference, "value"].idxmax()
    bb_text = f"{bb} ({interval_text(*acc.loc[bb])})"
    beating = [n for n in learned if acc.at[n, "lo"] > acc.loc[reference, "hi"].max()]
    if beating:
        verb = "beats" if len(beating) == 1 else "beat"
        whom = "every baseline of width K" if reference != ["raw"] else "the raw input"
        out.append(f"{_names(beating)} {verb} {whom} beyond the intervals (best: {bb_text}).")
    elif acc.at[bb, "lo"] > acc.loc[learned, "hi"].max():
        out.append(f"Every learned representation falls short of {bb_text} beyond the intervals.")
    else:
        out.append(f"No learned representation beats {bb_text} by more than its interval.")
    return out
