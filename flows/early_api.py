"""Boot Prefect's temporary API server in the background while `ae-repr run` imports and loads its data.

Without a configured API (`PREFECT_API_URL`), Prefect starts a temporary server the first time the flow
needs a client: a subprocess that takes seconds to boot, idle time of the whole run. Started from a
thread at the beginning instead, the boot overlaps the imports and the data loading. It is the same
server Prefect would start (`SubprocessASGIServer` is one instance per process), stopped by Prefect at exit.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = 120  # Prefect's 20 s default is too short on a busy 2-core machine; the variable wins


def startup_timeout() -> int:
    """Seconds the temporary server may take to answer its health check."""
    return int(os.environ.get(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S))


def _start(start: Callable[..., None]) -> None:
    try:
        start(timeout=startup_timeout())
    except Exception as e:  # the flow starts it again and reports the failure where it matters
        log.debug("early start of the temporary Prefect API failed: %s", e)


@contextmanager
def api_booting() -> Iterator[Callable[[], None]]:
    """Start booting the temporary API now; yields `wait`, which returns once the server answers (or failed).

    Call `wait` before the flow: Prefect marks the server running before it answers. Leaving the block
    waits too, so no start is in flight when the process exits; leaving it with an error cancels the boot
    instead, so a bad input is reported at once, not after the server's seconds of start-up. The server
    module is imported here, in the calling thread: imported from the boot thread it would share the
    interpreter with the caller's imports and spawn the server seconds later.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield lambda: None  # a configured server, or none allowed: nothing to boot
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    thread = threading.Thread(target=_start, args=(server.start,), name="prefect-api-boot", daemon=True)
    thread.start()
    try:
        yield thread.join
    except BaseException:
        cancel_boot(server, thread)
        raise
    thread.join()


def cancel_boot(server: Any, thread: threading.Thread) -> None:
    """Stop a booting server without waiting for it to answer; returns once the boot thread has ended."""
    # stop() before the thread spawned the process stops nothing: repeat until the thread is gone (its next
    # health-check poll fails once the process is stopped), then once more for a process spawned meanwhile
    while thread.is_alive():
        server.stop()
        thread.join(0.05)
    server.stop()
