"""The recording of one run in MLflow: a parent run, one child run per variant and per baseline, and their end.

One sequence serves both callers. Live tracking drives it from the flow as the work happens
(per-epoch and evaluation metrics stream through the callbacks); `ae-repr log-run OUT` replays it
from a finished run directory (`replay`), so an upload records what a live run records.

The Python-heavy part (exporting and registering each encoder, uploading files) waits for
`log_results`, after training and evaluation: run beside them, it held the GIL against their many short
native calls and slowed them by far more than its own CPU time. When the store goes down mid-run the
run completes on disk and `<out>/tracking_pending.json` says what was not logged. With tracking
disabled every method is a no-op.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ae_repr.config import ExperimentConfig, TrackingConfig, validate_config
from ae_repr.data import Dataset
from ae_repr.errors import UserError
from ae_repr.io import read_json, write_json
from ae_repr.seeds import grid_members

from . import record as rec
from .remote import RunLog, epoch_items, logged_epochs
from .session import Session
from .store import check_reachable, display_uri, tracking_uri

log = logging.getLogger(__name__)

PENDING = "tracking_pending.json"  # what a live run could not log, for `ae-repr log-run`
RECORD = "tracking.json"  # where the run is recorded: store, experiment, parent run and its address
EXAMPLE_ROWS = 8


def example_rows(data: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    """A few raw test rows (the models' input example) and the data set's identity."""
    idx = data.test_idx[:EXAMPLE_ROWS] if len(data.test_idx) else np.arange(min(len(data), EXAMPLE_ROWS))
    info = {"dataset": data.name, "sha256": data.sha256, "rows": len(data), "shape": list(data.shape)}
    return data.x[idx].astype(np.float32), info


class Recorder:
    """A run's handle on MLflow (or on nothing, when tracking is disabled)."""

    def __init__(self, cfg: ExperimentConfig, out_dir: Path, info: Mapping[str, Any], example: np.ndarray, *,
                 flow_run: Mapping[str, str | None] | None = None, settings: TrackingConfig | None = None) -> None:
        self.cfg = cfg
        self.settings = settings or cfg.tracking
        self.out_dir = out_dir
        self.info = dict(info)
        self.example = example
        self.flow_run = dict(flow_run or {})
        self.parent_id: str | None = None
        self.parent_url: str | None = None
        self.runs: dict[str, str | None] = {}  # variant (a seed grid: `<variant>@seed=<s>`) -> child run id
        self.grid: dict[str, tuple[str, int]] = {}  # a seed grid's member name -> (variant, seed)
        self.baseline_runs: dict[str, str | None] = {}  # baseline -> child run id (made with the results)
        self._session: Session | None = None
        self._commit = "unknown"
        self._lock = threading.Lock()
        self._epochs: dict[str, int] = {}  # run id -> last epoch streamed live
        self._eval_logged: dict[str, dict[str, float]] = {}  # run id -> eval metrics streamed live
        self._remote: set[str] = set()  # run ids whose epochs another process streamed (RunLog)
        self._finished = False
        self._live = False

    @property
    def enabled(self) -> bool:
        """True while a tracking store is open."""
        return self._session is not None

    @classmethod
    def start(cls, cfg: ExperimentConfig, out_dir: Path, info: Mapping[str, Any], example: np.ndarray,
              flow_run: Mapping[str, str | None] | None = None) -> Recorder:
        """A live recorder: the parent run opened when tracking is enabled; UserError if MLflow is down."""
        recorder = cls(cfg, out_dir, info, example, flow_run=flow_run)
        previous = read_json(out_dir / RECORD) if (out_dir / RECORD).is_file() else {}
        if cfg.tracking.enabled:  # the record is replaced once the previous run, if killed, is settled
            recorder.open(previous=previous.get("parent_run_id"))
            recorder._live = True
            atexit.register(recorder.abandon)  # a crash of the whole process still ends the runs
        else:
            (out_dir / RECORD).unlink(missing_ok=True)  # an earlier run's record does not describe this one
        return recorder

    def settle_killed(self, previous: str | None) -> None:
        """The folder's previous parent run, if still RUNNING, was killed (this run holds the folder's lock):
        end it and its RUNNING children as KILLED, and tag this run's parent with its id."""
        if self._session is None or self.parent_id is None or not previous or previous == self.parent_id:
            return
        client = self._session.client
        try:
            old = client.get_run(previous)
            if old.info.status != "RUNNING":
                return
            children = client.search_runs([old.info.experiment_id],
                                          f"tags.`mlflow.parentRunId` = '{previous}' and attributes.status = 'RUNNING'")
            for run in (*children, old):
                client.set_tag(run.info.run_id, "failure_reason", f"killed: found unfinished by run {self.parent_id}")
                client.set_terminated(run.info.run_id, "KILLED")
        except Exception as e:  # another store, or a run deleted since: nothing to settle here
            log.info("MLflow: the folder's previous run %s could not be settled: %s: %s", previous,
                     type(e).__name__, e)
            return
        self._session.log_tags(self.parent_id, {rec.RERUN_TAG: previous})
        log.warning("MLflow: run %s and %d child runs never ended (killed); marked KILLED", previous, len(children))

    def open(self, extra_tags: Mapping[str, str | None] | None = None, previous: str | None = None) -> None:
        """Reach the store, create the parent run with its tags, params and data set input; settle the folder's
        `previous` parent run if it was killed (`settle_killed`)."""
        started = time.perf_counter()
        uri = tracking_uri()
        check_reachable(uri, self.settings.connect_timeout_s)
        self._session = session = Session(uri, self.settings.experiment, self.settings)
        self._commit = rec.git_commit()
        tags = rec.safe({**rec.parent_tags(self.cfg, self.info, self.out_dir, self.flow_run, self._commit),
                         **(extra_tags or {})})
        self.parent_id = session.create_run(rec.parent_name(self.cfg, self.info, self.out_dir, self.flow_run), tags)
        self.parent_url = session.url(self.parent_id)
        session.log_params(self.parent_id, rec.safe(self.cfg.flat()))
        session.log_dataset(self.parent_id, self.info)
        self.settle_killed(previous)
        if self.parent_id is not None:
            write_json(self.out_dir / RECORD, {"tracking_uri": display_uri(uri), "experiment": self.settings.experiment,
                                               "parent_run_id": self.parent_id, "parent_url": self.parent_url})
        log.info("MLflow: experiment %r at %s, parent run %s (%.1fs)", self.settings.experiment,
                 display_uri(uri), self.parent_url or self.parent_id, time.perf_counter() - started)
        if session.view_url():
            log.info("MLflow: every variant run with its headline metrics: %s", session.view_url())

    def start_variant(self, variant: str, *, name: str | None = None, seed: int | None = None) -> str | None:
        """Open the variant's child run (named `name`, tagged with its pretraining `seed` in a seed grid);
        returns its id."""
        if self._session is None or self.parent_id is None:
            return None
        session = self._session
        name = name or variant
        tags = rec.variant_tags(self.parent_id, variant, self.info, self._commit)
        params = rec.variant_params(self.cfg, variant)
        if seed is not None:
            self.grid[name] = (variant, seed)
            tags["seed"] = params["seed"] = str(seed)  # the run's model trained with this seed
        run_id = session.create_run(name, tags)
        self.runs[name] = run_id
        session.log_params(run_id, params)
        session.log_dataset(run_id, self.info)
        return run_id

    def metric_logger(self, variant: str) -> Callable[[dict[str, float], int], None] | None:
        """A per-epoch metrics callback for the trainer (only enqueues: training never waits on MLflow)."""
        run_id = self.runs.get(variant)
        if self._session is None or run_id is None:
            return None
        session = self._session

        def log_epoch(metrics: dict[str, float], step: int) -> None:
            session.log_metrics(run_id, epoch_items(metrics, step))
            with self._lock:
                self._epochs[run_id] = max(step, self._epochs.get(run_id, 0))

        return log_epoch

    def remote_logger(self, variant: str) -> RunLog | None:
        """A picklable per-epoch metrics callback for a task in another process (a Ray worker)."""
        run_id = self.runs.get(variant)
        if self._session is None or run_id is None:
            return None
        self._remote.add(run_id)  # what it logged is read back from MLflow before the history upload
        return RunLog(self._session.uri, run_id, retries=self.settings.retries, backoff_s=self.settings.retry_backoff_s)

    def tag_variant(self, variant: str, tags: Mapping[str, str]) -> None:
        """Queue tags on the variant's run."""
        if self._session is not None:
            self._session.log_tags(self.runs.get(variant), dict(tags))

    def eval_logger(self, variant: str) -> Callable[[dict[str, float]], None] | None:
        """An evaluation metrics callback (only enqueues)."""
        run_id = self.runs.get(variant)
        if self._session is None or run_id is None:
            return None
        session = self._session

        def log_eval(metrics: dict[str, float]) -> None:
            items = {rec.callback_key(k): float(v) for k, v in metrics.items()}
            with self._lock:
                self._eval_logged.setdefault(run_id, {}).update(items)
            session.log_metrics(run_id, [(k, v, 0) for k, v in items.items()])

        return log_eval

    def log_results(self, failures: Mapping[str, str]) -> None:
        """Each variant's history, files, plots, model and eval metrics, then the parent's summary and files."""
        if self._session is None:
            return
        session = self._session
        summary = rec.read_summary(self.out_dir)
        for variant, run_id in self.runs.items():
            if run_id is None:
                continue
            with self._lock:
                after = self._epochs.get(run_id, 0)
            failed = variant in failures
            session.writer.submit(f"{variant}: history and files", lambda v=variant, r=run_id, a=after, f=failed:
                                  self._upload_variant(v, r, a, f), run_id)
            if summary is not None and variant not in failures:
                live = self._eval_logged.get(run_id, {})
                session.log_metrics(run_id, [(k, v, 0) for k, v in rec.eval_metrics(summary, variant).items()
                                             if live.get(k) != v])
        self._log_parent_results(list(dict.fromkeys(self.grid.get(n, (n,))[0] for n in self.runs if n not in failures)))

    def _upload_variant(self, variant: str, run_id: str, after_epoch: int, failed: bool) -> None:
        # runs on the writer thread, so the history is logged in order with the writes queued before it
        session = self._session
        assert session is not None
        model_dir = self.out_dir / "models" / variant
        history = read_json(model_dir / "history.json") if (model_dir / "history.json").is_file() else []
        if run_id in self._remote:
            after_epoch = logged_epochs(session.client, run_id, history)
        session.log_metrics(run_id, rec.history_metrics(history, after_epoch))
        # a failed variant's folder may hold an earlier run's figures: they are not this run's
        plots = rec.variant_plots(self.out_dir, variant) if self.settings.log_plots and not failed else []
        session.log_artifacts(run_id, rec.variant_artifacts(self.out_dir, variant, plots))
        if self.settings.log_models and (model_dir / "model.pt").is_file():
            registered, seed = self.grid.get(variant, (variant, None))  # a grid member registers as its variant
            session.log_encoder(run_id, registered, model_dir, self.example, self.info, seed=seed)

    def _log_parent_results(self, variants: list[str]) -> None:
        """The parent's headline metrics, the verdict as its description, and its files."""
        session = self._session
        assert session is not None
        summary = rec.read_summary(self.out_dir)
        tags = rec.verdict_tags(self.out_dir)
        if summary is not None:
            metrics, best = rec.headline_metrics(summary, variants)
            metrics.update(rec.aggregate_metrics(summary, {v for v, _ in self.grid.values()}))
            session.log_metrics(self.parent_id, [(k, v, 0) for k, v in metrics.items()])
            tags.update(best)
            for name in rec.baseline_names(summary, variants) if self.parent_id is not None else []:
                session.writer.submit(f"baseline run {name}", lambda n=name: self._baseline_run(n, summary),
                                      self.parent_id)
        if tags:
            session.log_tags(self.parent_id, tags)
        session.log_artifacts(self.parent_id, rec.parent_artifacts(self.out_dir))

    def _baseline_run(self, name: str, summary: Any) -> None:
        """A finished child run holding one baseline's numbers under the variants' metric names (on the writer)."""
        session = self._session
        assert session is not None and self.parent_id is not None
        run_id = session.create_run(rec.baseline_run_name(name),
                                    rec.baseline_tags(self.parent_id, name, self.info, self._commit))
        self.baseline_runs[name] = run_id
        session.log_metrics(run_id, [(k, v, 0) for k, v in rec.eval_metrics(summary, name).items()])
        session.log_dataset(run_id, self.info)
        session.terminate(run_id, "FINISHED")

    def end_runs(self, failures: Mapping[str, str]) -> None:
        """End the variant runs and the parent: FAILED (with the reason) for failures, else FINISHED."""
        if self._session is None or self._finished:
            return
        self._finished = True
        session = self._session
        for variant, run_id in self.runs.items():
            if variant in failures:
                session.log_tags(run_id, {"failure_reason": failures[variant][:5000]})
            session.terminate(run_id, "FAILED" if variant in failures else "FINISHED")
        if failures:
            session.log_tags(self.parent_id, {"failed": ", ".join(sorted(failures))})
        session.terminate(self.parent_id, "FAILED" if failures else "FINISHED")

    def finish(self, failures: Mapping[str, str]) -> None:
        """End the runs and write everything queued; if MLflow was down, record what was not logged and say so."""
        if self._session is None or self._finished:
            return
        atexit.unregister(self.abandon)
        self.end_runs(failures)
        self._close_live()

    def close(self) -> tuple[bool, list[Any]]:
        """Write everything queued and stop the writer: (finished in time, the writes that were not logged)."""
        assert self._session is not None
        started = time.perf_counter()
        drained = self._session.close(self.settings.flush_timeout_s)
        log.info("MLflow: queued writes finished in %.1fs", time.perf_counter() - started)
        return drained, list(self._session.writer.not_logged)

    def _close_live(self) -> None:
        session = self._session
        assert session is not None
        drained, not_logged = self.close()
        pending = self.out_dir / PENDING
        if drained and not not_logged:
            pending.unlink(missing_ok=True)  # an earlier attempt's record no longer applies
            return
        write_json(pending, {
            "tracking_uri": display_uri(session.uri),
            "experiment": self.settings.experiment,
            "parent_run_id": self.parent_id,
            "runs": self.runs,
            "baseline_runs": self.baseline_runs,
            "prefect": self.flow_run,
            "offline_since": session.writer.offline_since,
            "queue_drained": drained,
            "not_logged": [asdict(n) for n in not_logged],
            "upload_with": f"ae-repr log-run {self.out_dir}",
        })
        log.warning("MLflow: %d writes were not logged (server %s unreachable since %s); the run is complete on "
                    "disk in %s; upload it with `ae-repr log-run %s`", len(not_logged), display_uri(session.uri),
                    session.writer.offline_since or "-", self.out_dir, self.out_dir)

    def abandon(self) -> None:
        """Without `finish` (the flow crashed; at exit at the latest): end the open runs as FAILED."""
        if self._session is None or self._finished:
            return
        self._finished = True
        atexit.unregister(self.abandon)
        for run_id in (*self.runs.values(), self.parent_id):
            self._session.terminate(run_id, "FAILED")
        if self._live and self.out_dir.is_dir():
            self._close_live()
        else:  # removed meanwhile (a failed command cleans up): no record to write into it
            self._session.close(30)


@dataclass(frozen=True)
class Upload:
    """What `replay` created."""

    parent_id: str
    url: str | None
    runs: dict[str, str | None]


def replay(out_dir: str | os.PathLike[str], experiment: str | None = None) -> Upload:
    """Upload a finished run directory to MLflow by replaying a live run's recording (`ae-repr log-run`)."""
    out = Path(out_dir).expanduser().resolve()
    if not (out / "config.json").is_file():
        raise UserError(f"{out_dir}: not a run directory (no config.json)")
    try:
        raw = read_json(out / "config.json")
    except ValueError:
        raise UserError(f"{out / 'config.json'}: not valid JSON") from None
    cfg = validate_config(raw, source=str(out / "config.json"))
    settings = cfg.tracking if experiment is None else cfg.tracking.model_copy(update={"experiment": experiment})
    members = grid_members(cfg)
    if not any((out / "models" / m.name).is_dir() for m in members):
        raise UserError(f"{out_dir}: no trained models under {out / 'models'}")
    pending = read_json(out / PENDING) if (out / PENDING).is_file() else {}
    from ae_repr.data import load_dataset

    example, info = example_rows(load_dataset(cfg.data.dataset, test_fraction=cfg.data.test_fraction,
                                              seed=cfg.data.split_seed))
    recorder = Recorder(cfg, out, info, example, flow_run=pending.get("prefect") or {}, settings=settings)
    recorder.open({"ae_repr.uploaded_by": "log-run", "ae_repr.replaces": pending.get("parent_run_id")})
    session = recorder._session
    assert session is not None
    if recorder.parent_id is None:
        session.close(5)
        raise RuntimeError(f"MLflow at {display_uri(session.uri)}: could not create the parent run")
    summary = rec.read_summary(out)
    failures: dict[str, str] = {}
    for m in members:
        v = m.name
        recorder.start_variant(m.variant, name=v, seed=m.grid_seed)
        if not (out / "models" / v / "model.pt").is_file():
            failures[v] = "no trained model in the run directory"
        elif summary is None or not (summary["representation"] == v).any():
            failures[v] = "no evaluation results in summary.parquet"
    recorder.log_results(failures)
    recorder.end_runs(failures)
    _supersede(session, pending, recorder.parent_id)
    drained, not_logged = recorder.close()
    if not drained or not_logged:
        first = not_logged[0] if not_logged else None
        raise RuntimeError(f"MLflow at {display_uri(session.uri)}: {len(not_logged)} writes failed during the "
                           f"upload{f' (first: {first.what}: {first.error})' if first else ''}; run log-run again")
    (out / PENDING).unlink(missing_ok=True)
    return Upload(recorder.parent_id, recorder.parent_url, dict(recorder.runs))


def _supersede(session: Session, pending: Mapping[str, Any], parent_id: str) -> None:
    """Mark the partial runs of a live attempt as replaced by the upload (when the server has them)."""
    from mlflow.exceptions import MlflowException

    old = [r for r in (pending.get("parent_run_id"), *(pending.get("runs") or {}).values(),
                       *(pending.get("baseline_runs") or {}).values()) if r]

    def mark() -> None:
        for run_id in old:
            try:
                session.client.set_tag(run_id, "ae_repr.superseded_by", parent_id)
                if session.client.get_run(run_id).info.status == "RUNNING":
                    session.client.set_terminated(run_id, "FAILED")
            except MlflowException:  # never created, or deleted since: nothing to mark
                continue

    if old:
        session.writer.submit("mark the partial runs superseded", mark)
