"""A run killed outright (SIGKILL, a lost machine) ends nothing itself: its Prefect flow run stays Running
and its MLflow runs RUNNING. The next run into the same folder settles them: it holds the folder's lock,
so no other run is live there, and whatever the folder's last run left unfinished was killed.

`flow_run.json` in the run folder names the flow run that last worked there; the MLflow side reads
`tracking.json` (flows.tracking.lifecycle). Prefect's own zombie detection needs heartbeats and an
automation on a server; this needs neither and also covers the temporary API of `ae-repr run`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ae_repr.io import read_json, write_json

log = logging.getLogger(__name__)

FLOW_RUN = "flow_run.json"  # the flow run working in the folder (kept after it ends: the next one reads it)


def settle_flow_run(out_dir: Path, current: str | None) -> str | None:
    """Mark the folder's previous flow run Crashed if it never ended; record `current` as the folder's run.

    Returns the id of the flow run that was marked (None when the previous one ended, or there was none).
    """
    path = Path(out_dir) / FLOW_RUN
    previous = (read_json(path) if path.is_file() else {}).get("id")
    if current is not None:
        write_json(path, {"id": current})
    if not previous or previous == current:  # a retry of the same flow run is not a rerun
        return None
    try:
        from prefect.client.orchestration import get_client
        from prefect.states import Crashed

        with get_client(sync_client=True) as client:
            run = client.read_flow_run(previous)
            if run.state is None or run.state.is_final():
                return None
            client.set_flow_run_state(previous, Crashed(message=f"killed: a later run ({current}) found it "
                                                                f"unfinished in {out_dir}"), force=True)
            if current is not None:
                mine = client.read_flow_run(current)
                client.update_flow_run(current, tags=[*mine.tags, f"rerun-of:{previous}"])
    except Exception as e:  # an API that forgot the run (another server, a reset database) has nothing to mark
        log.info("the folder's previous flow run %s could not be settled: %s: %s", previous, type(e).__name__, e)
        return None
    log.warning("flow run %s never ended (killed); marked Crashed", previous)
    return previous
