"""`ae-repr compare`: variants and baselines x headline metrics of recent flow runs, read back from MLflow."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ae_repr.errors import UserError

from . import record as rec
from .store import check_reachable, display_uri, tracking_uri, ui_view_url

IDS = ("parent_run_id", "run_id")  # in the CSV, not on the terminal
# which columns a narrow terminal keeps first: the representation, its data set, the linear probe, then the rest
_PRIORITY = ("representation", "dataset", rec.HEADLINE_METRICS[0], "kind")


@dataclass(frozen=True)
class Comparison:
    """Representations x headline metrics across recent flow runs, and where the UI shows the same."""

    table: pd.DataFrame
    ui_url: str | None


def compare_runs(experiment: str, last: int = 5, dataset: str | None = None) -> Comparison:
    """Variants and baselines x headline metrics (with `<metric>/ci_low`, `<metric>/ci_high` where logged) of the
    last `last` parent runs of an experiment, on `dataset` only when given, read back with search_runs."""
    import mlflow

    if last <= 0:
        raise UserError(f"--last must be > 0, got {last}")
    if dataset is not None and "'" in dataset:
        raise UserError(f"--dataset {dataset}: a name with a quote cannot be searched for")
    uri = tracking_uri()
    check_reachable(uri, 10.0)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at {display_uri(uri)}")
    query = f"tags.`{rec.KIND_TAG}` = '{rec.PARENT_KIND}'" + (f" and tags.dataset = '{dataset}'" if dataset else "")
    parents = client.search_runs([exp.experiment_id], filter_string=query,
                                 order_by=["attributes.start_time DESC"], max_results=last + 20)
    # a live attempt that `log-run` re-uploaded is not a run of its own
    parents = [p for p in parents if "ae_repr.superseded_by" not in p.data.tags][:last]
    rows: list[dict[str, Any]] = []
    for p in parents:
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{p.info.run_id}'",
                                      max_results=1000)
        run = {"run": p.info.run_name, "started": pd.Timestamp(p.info.start_time, unit="ms").floor("s"),
               "dataset": p.data.tags.get("dataset") or p.data.params.get("data.dataset", "")}
        # a baseline's own child run (runs recorded before them: none) stands for its numbers on the parent
        baseline_runs = {c.data.tags.get("representation"): c.info.run_id for c in children
                         if c.data.tags.get(rec.KIND_TAG) == rec.BASELINE_KIND}
        variants = sorted((c for c in children if c.data.tags.get(rec.KIND_TAG) != rec.BASELINE_KIND),
                          key=lambda r: r.data.tags.get("variant", ""))
        for c in variants:
            if "seed" in c.data.tags:  # one pretraining seed of a grid: its variant's aggregate row stands for it
                continue
            rows.append({**run, "representation": c.data.tags.get("variant", c.info.run_name), "kind": "variant",
                         "status": c.info.status, "parent_run_id": p.info.run_id, "run_id": c.info.run_id,
                         **c.data.metrics})
        for name, (n_seeds, metrics) in sorted(aggregates(p.data.metrics).items()):
            # the seeds' runs' statuses other than FINISHED (a failed seed shows), else FINISHED
            status = {c.info.status for c in variants if c.data.tags.get("variant") == name} - {"FINISHED"}
            rows.append({**run, "representation": name, "kind": f"variant, {n_seeds} seeds",
                         "status": ", ".join(sorted(status)) or "FINISHED", "parent_run_id": p.info.run_id,
                         "run_id": p.info.run_id, **metrics})
        learned = {c.data.tags.get("variant", c.info.run_name) for c in variants}
        for name, metrics in sorted(baselines(p.data.metrics, learned).items()):
            rows.append({**run, "representation": name, "kind": "baseline", "status": p.info.status,
                         "parent_run_id": p.info.run_id, "run_id": baseline_runs.get(name, p.info.run_id),
                         **metrics})
    frame = pd.DataFrame(rows)
    url = ui_view_url(uri, exp.experiment_id)
    if frame.empty:
        return Comparison(frame, url)
    keep = [m for m in rec.HEADLINE_METRICS if m in frame.columns and frame[m].notna().any()]
    if not keep:  # another evaluation protocol: show every eval metric there is
        keep = sorted(c for c in frame.columns if c.startswith("eval/") and rec.interval_of(c)[1] is None)
    metrics = [c for m in keep for c in (m, *(f"{m}/{b}" for b in rec.INTERVAL)) if c in frame.columns]
    head = ["run", "started", "dataset", "representation", "kind", "status"]
    return Comparison(frame[[*head, *metrics, *IDS]], url)


def aggregates(metrics: Mapping[str, float]) -> dict[str, tuple[int, dict[str, float]]]:
    """Seed-grid variant -> (seeds, its aggregate `eval/...` numbers: means over seeds, intervals over seeds),
    from a parent run's metrics."""
    out: dict[str, tuple[int, dict[str, float]]] = {}
    for key, value in metrics.items():
        if key.startswith(rec.AGGREGATE_PREFIX):
            name, _, metric = key.removeprefix(rec.AGGREGATE_PREFIX).partition("/")
            numbers = out.setdefault(name, (0, {}))[1]
            if metric == rec.N_SEEDS:
                out[name] = (int(value), numbers)
            else:
                numbers[f"eval/{metric}"] = value
    return out


def baselines(metrics: Mapping[str, float], learned: set[str]) -> dict[str, dict[str, float]]:
    """Baseline name -> its `eval/...` numbers, from a parent run's metrics."""
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith(rec.BASELINE_PREFIX):
            name, _, metric = key.removeprefix(rec.BASELINE_PREFIX).partition("/")
            out.setdefault(name, {})[f"eval/{metric}"] = value
    # runs recorded before the `baseline/` metrics carry each baseline's linear probe alone
    for key, value in metrics.items():
        name, _, metric = key.partition("/")
        if metric == rec.HEADLINE and name not in learned and name not in out and "@" not in name:
            out[name] = {rec.HEADLINE_METRICS[0]: value}
    return out


def format_table(frame: pd.DataFrame, width: int | None = None) -> str:
    """A compare table as terminal text (rich when installed): a number with its interval as `0.958 [0.938, 0.976]`,
    else to 4 digits; ids left out. With `width`, the columns that do not fit are left out, and a last line
    says which."""
    columns = [c for c in frame.columns if c not in IDS and rec.interval_of(c)[1] is None]
    cells = {c: [_cell(frame, i, c) for i in range(len(frame))] for c in columns}
    headers = {c: c.removeprefix("eval/") for c in columns}
    shown = list(columns)
    if width is not None:
        shown = []
        for c in sorted(columns, key=_priority):  # the most wanted first; a column that does not fit is skipped
            trial = [x for x in columns if x in shown or x == c]
            if not shown or max(map(len, _render(trial, headers, cells).splitlines())) <= width:
                shown.append(c)
        shown = [c for c in columns if c in shown]
    text = _render(shown, headers, cells)
    left_out = [headers[c] for c in columns if c not in shown]
    if left_out:
        text += (f"\n{len(left_out)} column{'s' if len(left_out) > 1 else ''} left out to fit {width} characters: "
                 f"{', '.join(left_out)} (--wide shows all, --format csv every number)")
    return text


def _priority(column: str) -> int:
    return _PRIORITY.index(column) if column in _PRIORITY else len(_PRIORITY) + (
        0 if column.startswith(("eval/", "val/")) else 1)


def _render(columns: Sequence[str], headers: Mapping[str, str], cells: Mapping[str, list[str]]) -> str:
    names = [headers[c] for c in columns]
    rows = list(zip(*(cells[c] for c in columns), strict=True)) if columns else []
    numeric = [c.startswith(("eval/", "val/")) for c in columns]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(names)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(names, widths, strict=True))]
        lines += ["  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True))
                  for r in rows]
        return "\n".join(line.rstrip() for line in lines)
    table = Table(show_lines=False)
    for h, num in zip(names, numeric, strict=True):
        table.add_column(h, justify="right" if num else "left", no_wrap=True, min_width=len(h))
    for r in rows:
        table.add_row(*r)
    console = Console(width=10_000, record=True, color_system=None, file=io.StringIO())  # the table sets the width
    console.print(table)
    return console.export_text().rstrip()


def _cell(frame: pd.DataFrame, i: int, column: str) -> str:
    v = frame[column].iloc[i]
    lo, hi = (frame[f"{column}/{b}"].iloc[i] if f"{column}/{b}" in frame.columns else np.nan for b in rec.INTERVAL)
    if isinstance(v, float):
        if np.isnan(v):
            return ""
        return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if np.isfinite([lo, hi]).all() else f"{v:.4f}"
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)
