"""Set-ups that spend tens of seconds in other processes (the e2e services with their deployment run, the
plug-in's `ae-repr run`, the harness's Prefect server) start on background threads when the session starts, so
that they overlap the in-process tests instead of adding to them; the tests that read them run last (the root
conftest orders them).

A set-up is registered under the name of the fixture that returns it; its failure fails the tests that ask for it,
where they ask (the exception is raised again there), never the session. A whole test can run that way too: one
marked `background` (its only argument `tmp_path`; no monkeypatch, no capture) runs on a background thread from
the session's start, and its test item, run last, waits for it and reports its outcome.

A set-up that tests wait for early is registered `urgent` (the flow tests' Prefect server): its readers run
first among the late tests. Every other set-up runs niced (NICE): the processes it starts inherit its thread's
niceness, so they take what the foreground tests, the urgent set-ups and the background tests leave of the cores
instead of slowing them (two test processes share the cores, see the Makefile).

They run beside tests that change the environment and patch modules, so a background thread never reads
`os.environ` (pytest rewrites it at every test, and tests monkeypatch it): it builds its processes' environment from
`environ()`, the environment as the session started. It imports nothing a test may patch (import that at
collection), and it does its heavy work in other processes (in-process work here raced the tests' `warnings` and
module state).
"""

from __future__ import annotations

import inspect
import os
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import pytest

Builder = Callable[[pytest.TempPathFactory], Any]
NICE = 5  # niceness of the non-urgent set-ups' threads and of every process they start

_builders: dict[str, Builder] = {}
_urgent: set[str] = set()
_started: dict[str, Future] = {}
_threads: list[threading.Thread] = []
_environ: dict[str, str] = {}


def environ() -> dict[str, str]:
    """A copy of the environment as the session started (before any test changed it)."""
    return dict(_environ or os.environ)


def register(name: str, build: Builder, *, urgent: bool = False) -> None:
    """`build(tmp_path_factory)` is the set-up behind fixture `name` (called at most once per session); an urgent
    one runs at normal priority and its readers first among the late tests."""
    _builders[name] = build
    if urgent:
        _urgent.add(name)


def uses(item: pytest.Item) -> set[str]:
    """The registered set-ups a test reads (directly or through other fixtures)."""
    return set(getattr(item, "fixturenames", ())) & set(_builders)


def is_body(item: pytest.Item) -> bool:
    """A test whose body runs on a background thread (marked `background`)."""
    if item.get_closest_marker("background") is None:
        return False
    args = tuple(inspect.signature(item.obj).parameters)
    if args != ("tmp_path",):
        raise pytest.UsageError(f"{item.nodeid}: a background test takes tmp_path alone, not {args}")
    return True


def last(items: list[pytest.Item]) -> None:
    """Move the tests that read a set-up or run in the background to the end: the readers of urgent set-ups first,
    then the background tests, then the readers of each other set-up together (a set-up may stop after its last
    reader), otherwise in collection order."""
    def rank(item: pytest.Item) -> tuple[int, list[str]]:
        return (0 if uses(item) & _urgent else 1 if is_body(item) else 2), sorted(uses(item))

    late = sorted((i for i in items if uses(i) or is_body(i)), key=rank)
    items[:] = [i for i in items if not (uses(i) or is_body(i))] + late


def _spawn(fn: Callable[..., Any], *args: Any, nice: bool, **kwargs: Any) -> Future:
    """`fn(*args, **kwargs)` on a thread of its own (niced when `nice`: so is every process it starts); its Future."""
    future: Future = Future()

    def target() -> None:
        if nice and sys.platform == "linux":  # there a thread's own niceness, inherited by the processes it forks
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)

    thread = threading.Thread(target=target, name=f"background-{getattr(fn, '__name__', 'set-up')}")
    _threads.append(thread)
    thread.start()
    return future


def start(items: Iterable[pytest.Item], factory: pytest.TempPathFactory) -> None:
    """Start every set-up one of `items` reads, each on its own thread."""
    _environ.update(_environ or os.environ)
    wanted = sorted({name for item in items for name in uses(item)} - set(_started))
    bodies = [item for item in items if is_body(item) and item.nodeid not in _started]
    if not wanted and not bodies:
        return
    factory.getbasetemp()  # created here, once: threads creating it at once would each make their own
    for name in sorted(wanted, key=lambda n: n not in _urgent):
        _started[name] = _spawn(_builders[name], factory, nice=name not in _urgent)
    for item in bodies:
        _started[item.nodeid] = _spawn(item.obj, tmp_path=factory.mktemp(item.name[:30]), nice=False)


def run_body(item: pytest.Item) -> bool | None:
    """For a background test: wait for its body and raise what it raised (True: the call is done); else None."""
    if item.nodeid not in _started:
        return None
    _started[item.nodeid].result()
    return True


def result(name: str, factory: pytest.TempPathFactory) -> Any:
    """What set-up `name` returned (waiting for it), or built now when nothing started it."""
    if name not in _started:
        _started[name] = Future()
        try:
            _started[name].set_result(_builders[name](factory))
        except BaseException as e:
            _started[name].set_exception(e)
    return _started[name].result()


def wait_all() -> None:
    """Wait for every started set-up (whatever it returned or raised), so that nothing outlives the session."""
    for future in _started.values():
        future.exception()
    for thread in _threads:
        thread.join()
