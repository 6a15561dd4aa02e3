"""`ae-repr compare`: variants x headline metrics of recent flow runs, read back from MLflow."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ae_repr.errors import UserError

from . import record as rec
from .store import check_reachable, display_uri, tracking_uri, ui_view_url


@dataclass(frozen=True)
class Comparison:
    """Variants x headline metrics across recent flow runs, and where the UI shows the same."""

    table: pd.DataFrame
    ui_url: str | None


def compare_runs(experiment: str, last: int = 5) -> Comparison:
    """Variants x headline metrics of the last `last` parent runs of an experiment, read back with search_runs."""
    import mlflow

    if last <= 0:
        raise UserError(f"--last must be > 0, got {last}")
    uri = tracking_uri()
    check_reachable(uri, 10.0)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise UserError(f"no MLflow experiment named {experiment!r} at {display_uri(uri)}")
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{rec.KIND_TAG}` = '{rec.PARENT_KIND}'",
                                 order_by=["attributes.start_time DESC"], max_results=last + 20)
    # a live attempt that `log-run` re-uploaded is not a run of its own
    parents = [p for p in parents if "ae_repr.superseded_by" not in p.data.tags][:last]
    rows: list[dict[str, Any]] = []
    for p in parents:
        children = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{p.info.run_id}'",
                                      max_results=1000)
        for c in sorted(children, key=lambda r: r.data.tags.get("variant", "")):
            rows.append({
                "run": p.info.run_name, "started": pd.Timestamp(p.info.start_time, unit="ms").floor("s"),
                "variant": c.data.tags.get("variant", c.info.run_name), "status": c.info.status,
                "parent_run_id": p.info.run_id, "run_id": c.info.run_id, **c.data.metrics,
            })
    frame = pd.DataFrame(rows)
    url = ui_view_url(uri, exp.experiment_id)
    if frame.empty:
        return Comparison(frame, url)
    keep = [m for m in rec.HEADLINE_METRICS if m in frame.columns and frame[m].notna().any()]
    if not keep:  # another evaluation protocol: show every eval metric there is
        keep = sorted(c for c in frame.columns if c.startswith("eval/"))
    return Comparison(frame[["run", "started", "variant", "status", *keep, "parent_run_id", "run_id"]], url)


def format_table(frame: pd.DataFrame) -> str:
    """A compare table as terminal text (rich when installed), metrics to 4 digits, ids left out."""
    shown = frame.drop(columns=["parent_run_id", "run_id"], errors="ignore")
    cells = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
    headers = [c.removeprefix("eval/") for c in shown.columns]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
        lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
        return "\n".join(lines)
    table = Table(show_lines=False)
    for i, h in enumerate(headers):
        table.add_column(h, justify="right" if i >= 4 else "left", no_wrap=True, min_width=len(h))
    for r in cells:
        table.add_row(*r)
    console = Console(width=10_000, record=True, color_system=None, file=io.StringIO())  # the table sets the width
    console.print(table)
    return console.export_text().rstrip()


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return "" if np.isnan(v) else f"{v:.4f}"
    if isinstance(v, pd.Timestamp):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)

