"""Where the flow's task runs execute: threads of the flow's process (the default), or a Ray cluster.

`threads` is Prefect's thread pool in the flow's process and imports nothing of Ray. `ray` hands the task
runs to prefect-ray's `RayTaskRunner` on an existing cluster (`orchestration.ray_address`, else
`RAY_ADDRESS`, else a local Ray started for the run): training tasks (tagged `gpu`) ask Ray for
`train.gpus_per_task` GPUs and `orchestration.cpus_per_task` CPUs, every other task for the CPUs alone. Tasks
still exchange paths and small dicts, so the run folder must be storage every node sees, and MLflow must be a
server: both are checked before the run starts (`check_start`), from a Ray task on every node.

Each Ray task runs with as many torch threads as Ray granted it CPUs (the same count as under threads when
`cpus_per_task` is set, so the numbers agree); it writes its phase seconds into the run folder, which the
flow adds to timings.json, and the flow's process repeats each task run's final-state line for the progress
display, which only sees records of its own process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from ae_repr.config import ExperimentConfig, OrchestrationConfig
from ae_repr.errors import ConfigError, UserError
from ae_repr.io import write_json
from ae_repr.train import torch_threads

if TYPE_CHECKING:
    from prefect_ray import RayTaskRunner

    from .tracking import Recorder

WORKER_TAG = "ae_repr.worker"  # on every variant run: hostname:pid of the process that trained it
RAY_ADDRESS_ENV = "RAY_ADDRESS"
PHASES = ".phases"  # under the run folder: each Ray task's phase seconds, until the flow adds them up
CONNECT_TIMEOUT_S = 5.0  # an address that does not answer fails the start this fast
CHECK_TIMEOUT_S = 120.0  # the start check's task on every node, worker start-up included
PACKAGES = ("ae_repr", "evaluation", "flows")  # the code a Ray worker must share with the flow's process
EpochLog = Callable[[dict[str, float], int], None]
EvalLog = Callable[[dict[str, float]], None]

log = logging.getLogger(__name__)


def worker_id() -> str:
    """`hostname:pid` of this process."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Clock(Protocol):
    """The flow's phase clock, as far as the executor uses it (flows.pretrain_and_probe.CLOCK)."""

    def reset(self) -> None: ...
    def export(self) -> dict[str, list[float]]: ...
    def merge(self, phases: Mapping[str, list[float]]) -> None: ...


class Executor(Protocol):
    """What the flow asks of its executor: the tracking callbacks its tasks get, and their phase seconds."""

    name: str

    def train_logger(self, recorder: Recorder, variant: str) -> EpochLog | None: ...
    def eval_logger(self, recorder: Recorder, variant: str) -> EvalLog | None: ...
    def collect(self, clock: Clock, out: Path) -> None: ...


class _InProcess:
    """The recorder's per-epoch callback with the calls a training task makes on it (threads: this process)."""

    def __init__(self, log_epoch: EpochLog, tag: Callable[[Mapping[str, str]], None]) -> None:
        self.log_epoch, self.tag = log_epoch, tag

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.log_epoch(metrics, step)

    def close(self) -> list[Any]:
        return []  # the recorder's writer is closed by the flow


class Threads:
    """Task runs as threads of the flow's process, logging through the flow's recorder."""

    name = "threads"

    def train_logger(self, recorder: Recorder, variant: str) -> EpochLog | None:
        """The recorder's per-epoch callback, able to tag the run with the training process."""
        log_epoch = recorder.metric_logger(variant)
        return None if log_epoch is None else _InProcess(log_epoch, functools.partial(recorder.tag_variant, variant))

    def eval_logger(self, recorder: Recorder, variant: str) -> EvalLog | None:
        """The recorder's evaluation metrics callback."""
        return recorder.eval_logger(variant)

    def collect(self, clock: Clock, out: Path) -> None:
        """Nothing to collect: the tasks timed themselves on the flow's clock."""


class Ray:
    """Task runs on a Ray cluster: per-epoch metrics through a picklable logger, phase seconds through files."""

    name = "ray"

    def train_logger(self, recorder: Recorder, variant: str) -> EpochLog | None:
        """A logger the task's process opens itself (tracking URI and run id)."""
        return recorder.remote_logger(variant)

    def eval_logger(self, recorder: Recorder, variant: str) -> EvalLog | None:
        """None: the flow logs the evaluation's numbers from the summary when the run ends."""
        return None

    def collect(self, clock: Clock, out: Path) -> None:
        """Add the phase seconds the Ray tasks left in the run folder to the flow's clock."""
        folder = out / PHASES
        for path in sorted(folder.glob("*.json")):
            try:
                clock.merge(json.loads(path.read_text()))
            except (OSError, ValueError) as e:  # timings are a report, not a result: say so and go on
                log.warning("phase seconds of a Ray task unreadable (%s): %s", path.name, e)
            path.unlink(missing_ok=True)
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


@contextmanager
def task_logging(log_fn: object) -> Iterator[None]:
    """Inside a training task: the variant's run is tagged with this process; what it logged is sent before the end."""
    tag, close = getattr(log_fn, "tag", None), getattr(log_fn, "close", None)
    if tag is not None:
        tag({WORKER_TAG: worker_id()})
    try:
        yield
    finally:
        if close is not None and (lost := close()):
            log.warning("MLflow: %d writes from this task were not logged (first: %s: %s); the flow uploads "
                        "the training history at the end", len(lost), lost[0].what, lost[0].error)


# --- the start checks ---------------------------------------------------------------------------------------


def ray_address(cfg: ExperimentConfig) -> str | None:
    """The cluster to use: `orchestration.ray_address`, else RAY_ADDRESS, else None (a local Ray)."""
    if cfg.orchestration.ray_address:
        return cfg.orchestration.ray_address
    env = os.environ.get(RAY_ADDRESS_ENV, "").strip()
    if not env:
        return None
    try:
        return OrchestrationConfig(ray_address=env).ray_address
    except ValidationError:  # e.g. a deployment's `{{ $RAY_ADDRESS }}` left unset when it was deployed
        raise ConfigError(f"{RAY_ADDRESS_ENV}={env!r}: not HOST:PORT, ray://HOST:PORT or auto") from None


def check_tracking(cfg: ExperimentConfig) -> None:
    """UserError unless tracking under Ray goes to an MLflow server (a file store is on one machine only)."""
    if cfg.orchestration.executor != "ray" or not cfg.tracking.enabled:
        return
    from .tracking import display_uri, tracking_uri
    from .tracking.store import ENV_URI, is_http

    uri = tracking_uri()
    if not is_http(uri):
        raise UserError(f"--executor ray needs an MLflow tracking server every node reaches, not the local store "
                        f"{display_uri(uri)}: set {ENV_URI}=http://HOST:PORT (or run with --no-tracking)")


def _probe(address: str, timeout_s: float) -> None:
    """UserError unless something accepts connections at the address's HOST:PORT within `timeout_s`."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        why = "timed out" if isinstance(e, TimeoutError) else (getattr(e, "strerror", None) or e.__class__.__name__)
        raise UserError(f"Ray cluster at {address} is unreachable ({why}, {timeout_s:g}s); start it "
                        f"(ray start --head) or fix --ray-address / {RAY_ADDRESS_ENV}") from None


def connect(address: str | None) -> None:
    """Join the Ray cluster at `address` (a local Ray when None) from this process, unless already joined."""
    if address is not None and address != "auto":
        _probe(address, CONNECT_TIMEOUT_S)  # before importing Ray (seconds): a wrong address fails at once
    import ray

    if ray.is_initialized():
        return
    try:
        # workers' output stays in Ray's logs (and their task runs' logs reach the Prefect API): the console
        # shows the flow's progress, not every worker's lines
        ray.init(address=address, namespace="prefect", log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"Ray cluster at {address}: cannot connect ({e.__class__.__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def code_digest() -> str:
    """sha256 over this process's sources of the project's packages (a worker must run the same code)."""
    h = hashlib.sha256()
    for name in PACKAGES:
        root = Path(__import__(name).__file__).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _node_check(out: str, marker: str, token: str, api_url: str | None) -> dict[str, Any]:
    """Run on one node: write the marker into the run folder, reach the Prefect API, report the code's digest."""
    found: dict[str, Any] = {"host": socket.gethostname(), "code": code_digest(), "error": None, "api": None}
    try:
        Path(out, marker).write_text(token)
    except OSError as e:
        found["error"] = f"{e.__class__.__name__}: {e.strerror or e}"
    if api_url:
        import urllib.request

        try:
            urllib.request.urlopen(api_url.rstrip("/") + "/health", timeout=10).close()
        except OSError as e:
            found["api"] = f"{e.__class__.__name__}: {getattr(e, 'reason', None) or e}"
    return found


def check_cluster(out: Path, api_url: str | None) -> None:
    """UserError unless a task on every node of the cluster writes into `out` (the flow's process reads it back),
    reaches the Prefect API at `api_url` (None: a temporary API of this process, which only this host reaches)
    and runs the same code as this process."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    token = uuid.uuid4().hex
    check = ray.remote(num_cpus=0, max_retries=0)(_node_check)
    markers = {n["NodeID"]: f".ray-check-{token[:8]}-{i}" for i, n in enumerate(nodes)}
    refs = [check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(str(out), markers[n["NodeID"]], token, api_url) for n in nodes]
    try:
        found = ray.get(refs, timeout=CHECK_TIMEOUT_S)
    except ray.exceptions.GetTimeoutError:
        raise UserError(f"Ray cluster: no answer from a check task on every node within {CHECK_TIMEOUT_S:g}s") from None
    except ray.exceptions.RayError as e:  # its last line is the exception (the rest is Ray's traceback)
        last = next((ln.strip() for ln in reversed(str(e).splitlines()) if ln.strip()), e.__class__.__name__)
        raise UserError(f"Ray cluster: the start check failed on a worker ({last}); every node needs this "
                        "checkout's code and environment") from None
    finally:
        seen = {nid: _read(out / m) for nid, m in markers.items()}
        for m in markers.values():
            (out / m).unlink(missing_ok=True)
    mine = code_digest()
    for node, result in zip(nodes, found, strict=True):
        where = f"{result['host']} ({node['NodeManagerAddress']})"
        if seen[node["NodeID"]] != token:
            reason = f": {result['error']}" if result["error"] else ""
            raise UserError(f"run folder {out} is not shared with the Ray worker on {where}{reason}; put it on "
                            "storage every node mounts at the same path")
        if api_url is None and node["NodeManagerAddress"] != ray.util.get_node_ip_address():
            raise UserError(f"the Ray worker on {where} cannot reach this process's temporary Prefect API; set "
                            "PREFECT_API_URL to a Prefect server every node reaches")
        if result["api"]:
            raise UserError(f"the Ray worker on {where} cannot reach the Prefect API at {api_url} ({result['api']}); "
                            "set PREFECT_API_URL to a Prefect server every node reaches")
        if result["code"] != mine:
            raise UserError(f"the Ray worker on {where} runs other ae-repr code than this process; install the same "
                            "checkout on every node")


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def configured_api() -> str | None:
    """PREFECT_API_URL, when a Prefect server is configured (else the run gets a temporary one)."""
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value()) if PREFECT_API_URL.value() else None


def api_url() -> str | None:
    """The Prefect API the workers must report to: PREFECT_API_URL, else this process's temporary server."""
    if configured_api():
        return configured_api()
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running else None


def check_start(cfg: ExperimentConfig, out: Path) -> None:
    """Before a run on Ray: MLflow is a server, the cluster answers, and every node shares `out` and the code."""
    if cfg.orchestration.executor != "ray":
        return
    check_tracking(cfg)
    connect(ray_address(cfg))
    try:
        check_cluster(out, configured_api())
    except BaseException:
        _disconnect()
        raise


def _disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# --- the flow's side ----------------------------------------------------------------------------------------


def _ray_runner() -> type[RayTaskRunner]:
    """prefect-ray's task runner with per-task resources, torch threads and phase files (imported on use)."""
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    class Runner(RayTaskRunner):
        """RayTaskRunner asking for each task's resources; repeats task runs' final-state lines in this process."""

        def __init__(self, address: str | None = None, init_kwargs: dict[str, Any] | None = None, *,
                     cpus: int = 1, gpus: float = 0) -> None:
            super().__init__(address=address, init_kwargs=init_kwargs)
            self.cpus, self.gpus = cpus, gpus

        def duplicate(self) -> Runner:
            return type(self)(self.address, self.init_kwargs, cpus=self.cpus, gpus=self.gpus)

        def resources(self, task: Any) -> dict[str, float]:
            """Ray resources of a task run: training tasks (tagged `gpu`) get the GPUs, every task the CPUs."""
            return {"num_cpus": self.cpus, "num_gpus": self.gpus if "gpu" in task.tags else 0}

        def submit(self, task: Any, parameters: dict[str, Any], wait_for: Any = None,
                   dependencies: Any = None) -> Any:
            with remote_options(**self.resources(task)):
                future = super().submit(task, parameters, wait_for, dependencies)
            future.wrapped_future._on_completed(
                functools.partial(_report_final, str(future.task_run_id), _run_name(task, parameters)))
            return future

        _run_prefect_task = staticmethod(_run_in_worker)

    return Runner


def _run_name(task: Any, parameters: Mapping[str, Any]) -> str:
    """The task run's name as Prefect derives it from its `task_run_name` template."""
    try:
        return task.task_run_name.format(**parameters) if isinstance(task.task_run_name, str) else task.name
    except (KeyError, IndexError, AttributeError):
        return task.name


def _report_final(task_run_id: str, name: str, result: Any) -> None:
    """Log a Ray task run's final state in this process as the task engine logged it in the worker."""
    from prefect.states import State

    state = str(result) if isinstance(result, State) else f"Crashed({result.__class__.__name__})"
    completed = isinstance(result, State) and result.is_completed()
    logging.getLogger("prefect.task_runs").log(
        logging.INFO if completed else logging.ERROR, "Finished in state %s", state,
        extra={"task_run_id": task_run_id, "task_run_name": name, "send_to_api": False})  # the worker sent its own


def _run_in_worker(*upstream: Any, task: Any, parameters: dict[str, Any], **kwargs: Any) -> Any:
    """A task run in a Ray worker: torch threads = the CPUs Ray granted; its phase seconds go to the run folder."""
    import ray
    from prefect_ray import RayTaskRunner

    # the worker's own clock; imported here, as the flow's module imports this one
    from flows.pretrain_and_probe import CLOCK

    granted = ray.get_runtime_context().get_assigned_resources()
    CLOCK.reset()
    with torch_threads(max(1, int(granted.get("CPU", 1)))), _no_gpu_unless(granted.get("GPU", 0) > 0):
        state = RayTaskRunner._run_prefect_task(*upstream, task=task, parameters=parameters, **kwargs)
    out, phases = parameters.get("out"), CLOCK.export()
    if isinstance(out, str) and phases:
        try:
            write_json(Path(out) / PHASES / f"{kwargs['task_run_id']}.json", phases)
        except OSError as e:
            log.warning("phase seconds not written: %s", e)
    return state


@contextmanager
def _no_gpu_unless(granted: bool) -> Iterator[None]:
    """A task Ray granted no GPU sees none (`train.device: auto` then means CPU, e.g. evaluation's retraining).

    Ray leaves CUDA_VISIBLE_DEVICES alone for a task without GPUs, so it would see every GPU of its node; a worker
    that ran a GPU task exits after it (Ray's max_calls=1 for GPU tasks), so CUDA is not yet set up here.
    """
    if granted:
        yield
        return
    before = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = before


@contextmanager
def running_on(cfg: ExperimentConfig, out: Path, threads: int) -> Iterator[Executor]:
    """Inside a flow run: its task runs go to the configured executor; `threads` torch threads per task under
    threads (`orchestration.cpus_per_task` wins)."""
    cpus = cfg.orchestration.cpus_per_task
    if cfg.orchestration.executor != "ray":
        with torch_threads(cpus or threads):
            yield Threads()
        return
    import ray
    from prefect.context import FlowRunContext
    from prefect.settings import PREFECT_API_URL, temporary_settings

    started = time.perf_counter()
    check_start(cfg, out)
    try:
        gpus = cfg.train.gpus_per_task
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        runner = _ray_runner()(ray_address(cfg), cpus=cpus or 1, gpus=gpus)
        flow_run = FlowRunContext.get()
        if flow_run is None:
            raise RuntimeError("running_on(ray) is for the body of a flow run")
        url = api_url()
        log.info("Ray: %d nodes, %s CPUs and %s GPUs; a training task asks for %s CPUs and %s GPUs (%.1fs)",
                 len([n for n in ray.nodes() if n.get("Alive")]), ray.cluster_resources().get("CPU", 0),
                 ray.cluster_resources().get("GPU", 0), cpus or 1, gpus, time.perf_counter() - started)
        # the workers report to this API (the temporary one of `ae-repr run` too), not to one of their own
        with (temporary_settings(updates={PREFECT_API_URL: url} if url else {}), runner,
              flow_run.model_copy(update={"task_runner": runner})):
            yield Ray()
    finally:
        _disconnect()
