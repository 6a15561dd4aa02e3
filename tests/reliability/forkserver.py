"""A fork server for `ae-repr` commands: one process imports the CLI and the libraries its commands use (torch,
scikit-learn, pandas, pyarrow, Prefect, MLflow) once, then runs each command in a forked child of itself.

A child is a real process: its own working directory, stdout and stderr (file descriptors 1 and 2) on files, argv,
the CLI's `main`, and `os._exit` with main's exit code, so a test checks what that process did (exit code, its
output, the files it left). What a fresh process pays and a fork does not is the imports: ~5-10 s per command here.

Forking is only safe while the server has a single OS thread (a fork copies the forking thread alone, and a lock
another thread held stays locked in the child): torch starts its thread pools lazily and the server runs no torch
op; OpenMP/BLAS pools are held to one thread by the environment (as for every CLI subprocess), and pyarrow's
jemalloc background thread is turned off. The server checks its threads (and that no import configured logging)
before forking and refuses instead; `CommandRunner` then, like on a platform without fork, runs subprocesses.

Run as a script, this module is the server: JSON requests on stdin, one per line
(`{"id", "args", "cwd", "timeout", "stdout", "stderr"}`), replies on stdout as commands finish
(`{"id", "code"}`), up to `--jobs` commands at once.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

# imported once by the server, before any fork: what the commands' code paths import, except what configures
# logging on import (`from prefect import flow` installs Prefect's handlers on the root logger: a real `train`
# never imports it, and a real `run` does so after the CLI set up its own), so flows.pretrain_and_probe is left out
PRELOAD = (
    "torch", "numpy", "pandas", "pyarrow.parquet", "sklearn.linear_model", "sklearn.decomposition",
    "ae_repr.cli", "ae_repr.config", "ae_repr.data", "ae_repr.memory", "ae_repr.train", "ae_repr.features",
    "ae_repr.checkpoint", "evaluation", "prefect", "prefect.settings", "prefect.client.orchestration", "mlflow",
    "flows.tracking", "flows.executor", "flows.early_api",
)
# pyarrow's bundled jemalloc starts a background thread at load; a forking process must have none
NO_THREADS_ENV = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}


def os_threads() -> list[str]:
    """The names of this process's OS threads (Python's `threading` does not see OpenMP's or jemalloc's)."""
    try:
        return [Path(f"/proc/self/task/{t}/comm").read_text().strip() for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: trust Python's view
        import threading

        return [t.name for t in threading.enumerate()]


# ---------------------------------------------------------------------------------------------- the server


def _child(req: dict, reply_fd: int) -> None:
    """In the forked child: become the command's process, run it, exit with its code. Never returns."""
    code = 1
    try:
        os.close(reply_fd)  # the server's alone
        os.chdir(req["cwd"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # not the server's request pipe
        os.close(null)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.argv = ["ae-repr", *req["args"]]
        from ae_repr.cli import main

        code = main(list(req["args"]))
    except SystemExit as e:  # argparse's usage errors, as the interpreter would map them
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
    except BaseException:  # what the interpreter prints for an uncaught exception (--debug re-raises)
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - exiting regardless
                pass
        os._exit(code if isinstance(code, int) else 1)


def serve(jobs: int) -> None:
    """Read requests, fork a child per command (at most `jobs` at once), reply with each exit code."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]  # as `ae-repr` sees it
    import gc
    import importlib

    reply_fd = os.dup(1)
    os.dup2(2, 1)  # whatever an import prints goes to stderr, not into the replies
    reply = os.fdopen(reply_fd, "w")
    for name in PRELOAD:
        importlib.import_module(name)
    gc.freeze()  # the imports' objects: a child's collections skip them (and leave their pages shared)
    threads = os_threads()
    import logging

    # a child must set up logging as a fresh process does: nothing preloaded may have configured it
    why_not = f"threads {threads}" if len(threads) != 1 else \
        f"root logger handlers {logging.getLogger().handlers}" if logging.getLogger().handlers else ""
    reply.write(json.dumps({"ready": not why_not, "why_not": why_not}) + "\n")
    reply.flush()
    if why_not:
        return
    pending: list[dict] = []
    running: dict[int, tuple[dict, float, float]] = {}  # pid -> (request, deadline, start)
    stdin_open = True
    buf = b""
    while stdin_open or pending or running:
        while pending and len(running) < jobs:
            req = pending.pop(0)
            if len(os_threads()) != 1:  # something started a thread since: forking now could deadlock a child
                reply.write(json.dumps({"id": req["id"], "code": None, "error": f"threads {os_threads()}"}) + "\n")
                reply.flush()
                continue
            for stream in (reply, sys.stdout, sys.stderr):  # a child must not inherit (and write out) our buffers
                stream.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, reply_fd)
            running[pid] = (req, time.monotonic() + float(req.get("timeout", 240)), time.monotonic())
        if stdin_open:
            ready, _, _ = select.select([sys.stdin.fileno()], [], [], 0.02 if running else None)
            if ready:
                chunk = os.read(sys.stdin.fileno(), 65536)
                if not chunk:
                    stdin_open = False
                buf += chunk
                *lines, buf = buf.split(b"\n")
                pending += [json.loads(line) for line in lines if line.strip()]
        else:
            time.sleep(0.02)
        for pid, (req, deadline, start) in list(running.items()):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0 and time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                done, status = os.waitpid(pid, 0)
            if done:
                del running[pid]
                code = os.waitstatus_to_exitcode(status)
                reply.write(json.dumps({"id": req["id"], "code": code, "wall_s": time.monotonic() - start}) + "\n")
                reply.flush()


# ---------------------------------------------------------------------------------------------- the client


class CommandRunner:
    """Runs `ae-repr` commands in children of a fork server (or as subprocesses where forking is not possible);
    results are `subprocess.CompletedProcess` objects with text stdout and stderr."""

    def __init__(self, env: dict[str, str], cwd: Path, jobs: int = 2, cli: Sequence[str] = ()) -> None:
        self.env, self.cwd, self.jobs, self.cli = {**env, **NO_THREADS_ENV}, cwd, jobs, list(cli)
        self.tmp = Path(tempfile.mkdtemp(prefix="ae-repr-forkserver-"))
        self.server: subprocess.Popen | None = None
        self.why_not = "" if hasattr(os, "fork") else "os.fork is not available"
        if not self.why_not:
            self.server = subprocess.Popen(
                [sys.executable, __file__, "--jobs", str(jobs)], cwd=cwd, env=self.env, stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, text=True, start_new_session=True,
            )
            hello = json.loads(self.server.stdout.readline() or '{"ready": false, "why_not": "it exited"}')
            if not hello["ready"]:
                self.why_not = f"the fork server cannot fork safely: {hello['why_not']}"
                self.close()
        self._n = 0
        self.wall_s: dict[str, float] = {}  # each forked command's wall time, by name

    @property
    def forking(self) -> bool:
        return self.server is not None

    def run_many(self, commands: dict[str, tuple[Sequence[str], Path | None]], timeout: float = 240
                 ) -> dict[str, subprocess.CompletedProcess]:
        """Run every command (name -> (args, cwd)) and return each one's result by name."""
        if not self.forking:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(max_workers=self.jobs) as pool:
                futures = {k: pool.submit(self._subprocess, args, cwd, timeout) for k, (args, cwd) in commands.items()}
                return {k: f.result() for k, f in futures.items()}
        reqs = {}
        for name, (args, cwd) in commands.items():
            self._n += 1
            rid = f"{self._n}"
            reqs[rid] = (name, [str(a) for a in args])
            self.server.stdin.write(json.dumps({
                "id": rid, "args": reqs[rid][1], "cwd": str(cwd or self.cwd), "timeout": timeout,
                "stdout": str(self.tmp / f"{rid}.out"), "stderr": str(self.tmp / f"{rid}.err"),
            }) + "\n")
        self.server.stdin.flush()
        results = {}
        while len(results) < len(reqs):
            line = self.server.stdout.readline()
            if not line:
                raise RuntimeError(f"the fork server exited (code {self.server.poll()})")
            msg = json.loads(line)
            name, args = reqs[msg["id"]]
            if msg["code"] is None:
                raise RuntimeError(f"the fork server could not fork safely: {msg['error']}")
            out, err = (self.tmp / f"{msg['id']}.{s}" for s in ("out", "err"))
            results[name] = subprocess.CompletedProcess(["ae-repr", *args], msg["code"], out.read_text(),
                                                        err.read_text())
            self.wall_s[name] = msg["wall_s"]
        return results

    def run(self, *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 240
            ) -> subprocess.CompletedProcess:
        """Run one command to completion."""
        return self.run_many({"_": ([str(a) for a in args], cwd)}, timeout)["_"]

    def _subprocess(self, args: Sequence[str], cwd: Path | None, timeout: float) -> subprocess.CompletedProcess:
        return subprocess.run([*self.cli, *map(str, args)], cwd=cwd or self.cwd, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def close(self) -> None:
        """Stop the server (its children are done: every request was answered) and remove the output files."""
        if self.server is not None:
            self.server.stdin.close()
            try:
                self.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.server.pid, signal.SIGKILL)
                self.server.wait()
            self.server = None
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)


if __name__ == "__main__":
    serve(int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2)
