"""MLflow tracking of pretrain-and-probe runs, one job per module.

- `store`: the tracking URI, whether the store answers (the preflight), the UI's addresses;
- `writer`: the background thread every MLflow write goes through, with retries and back-off;
- `session`: one store and experiment, and the run writes queued on the writer;
- `models`: an encoder exported as an MLflow model, registered, the first version the champion;
- `record`: what a run records (params, tags, metrics, artifacts), from the config and run directory;
- `lifecycle`: the recording of one run, driven live by the flow or replayed by `ae-repr log-run`;
- `compare`: `ae-repr compare`, variants x headline metrics read back from MLflow.

Nothing here imports Prefect or the flow: the flow hands its data rows and its run's identity in.
"""

from __future__ import annotations

from .compare import Comparison, compare_runs, format_table
from .lifecycle import PENDING, RECORD, Recorder, Upload, example_rows, replay
from .models import CHAMPION, registered_name
from .store import display_uri, preflight, tracking_uri

__all__ = [
    "CHAMPION",
    "PENDING",
    "RECORD",
    "Comparison",
    "Recorder",
    "Upload",
    "compare_runs",
    "display_uri",
    "example_rows",
    "format_table",
    "preflight",
    "registered_name",
    "replay",
    "tracking_uri",
]
