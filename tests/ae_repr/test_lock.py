"""The run-folder lock: a file beside the folder, created atomically, naming host, pid and start time."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ae_repr.errors import UserError
from ae_repr.io import _process_start, exclusive_lock, lock_path


def _write_holder(folder: Path, **holder: object) -> Path:
    path = lock_path(folder)
    path.write_text(json.dumps(holder))
    return path


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has it (until the kernel hands it out again, long after this test)


def _try_in_another_process(out: Path) -> str:
    code = (f"from ae_repr.io import exclusive_lock\nfrom ae_repr.errors import UserError\n"
            f"try:\n    with exclusive_lock({str(out)!r}):\n        print('taken')\n"
            f"except UserError as e:\n    print(e)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()


def test_the_lock_lives_beside_the_folder_and_survives_its_deletion(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out):
        path = lock_path(out)
        assert path.parent == tmp_path and path.name == ".run.lock"
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] and holder["start"] == _process_start(os.getpid())
        shutil.rmtree(out)  # the folder goes; the lock stays, so a second run is still refused
        assert _try_in_another_process(out) == f"{out}: another run is using this folder (pid {os.getpid()}); " \
                                                "use a different --out"
    assert not path.exists(), "the holder removes its lock when it ends"


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import socket

    out = tmp_path / "run"
    pid = _dead_pid()
    _write_holder(out, host=socket.gethostname(), pid=pid, start="1", since="earlier", what="run")
    with caplog.at_level(logging.WARNING), exclusive_lock(out):
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
    assert f"took over the lock of a run that is gone (pid {pid}" in caplog.text


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path: Path) -> None:
    """The holder's pid now belongs to another process (a different start time): the lock is stale."""
    import socket

    out = tmp_path / "run"
    _write_holder(out, host=socket.gethostname(), pid=os.getpid(), start="not-this-start", since="earlier")
    with exclusive_lock(out):
        assert json.loads(lock_path(out).read_text())["start"] == _process_start(os.getpid())


def test_a_lock_held_on_another_host_is_refused_with_what_to_do(tmp_path: Path) -> None:
    out = tmp_path / "run"
    path = _write_holder(out, host="node-7", pid=4242, start="1", since="2026-01-01T00:00:00")
    with pytest.raises(UserError) as e:
        with exclusive_lock(out):
            pass
    msg = str(e.value)
    assert "node-7" in msg and "4242" in msg and f"delete {path}" in msg
    assert path.read_text() == json.dumps({"host": "node-7", "pid": 4242, "start": "1",
                                           "since": "2026-01-01T00:00:00"}), "a refused run must not touch the lock"


def test_a_live_holder_in_another_process_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = (f"import time; from ae_repr.io import exclusive_lock\n"
            f"with exclusive_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"pid {child.pid}\); use a different --out"):
            with exclusive_lock(out):
                pass
    finally:
        child.kill()
        child.wait()
    with exclusive_lock(out):  # killed: its lock is stale and taken over
        pass


def test_the_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    """`ae-repr run` locks the folder and so does the flow inside it: the inner lock is a no-op, the outer one
    releases."""
    out = tmp_path / "run"
    with exclusive_lock(out):
        with exclusive_lock(out, "flow run"):
            pass
        assert json.loads(lock_path(out).read_text())["pid"] == os.getpid(), "the inner block released the lock"
    assert not lock_path(out).exists()


def test_torn_writes_of_a_killed_process_are_removed(tmp_path: Path) -> None:
    """What `atomic_path` leaves when its process dies mid-write (never renamed into place) goes; files stay."""
    from ae_repr.io import atomic_path, remove_torn_writes

    (tmp_path / "plots").mkdir()
    keep = tmp_path / "plots" / "a.png"
    keep.write_bytes(b"done")
    torn = tmp_path / "plots" / ".b.png.x1y2z3.tmp"
    torn.write_bytes(b"half")
    with atomic_path(tmp_path / "c.json") as tmp:  # what a write in progress holds: the same naming
        assert tmp.name.startswith(".c.json.") and tmp.name.endswith(".tmp")
        tmp.write_text("{}")
    assert remove_torn_writes(tmp_path) == [torn]
    assert keep.read_bytes() == b"done" and (tmp_path / "c.json").is_file() and not torn.exists()
