"""Runs a killed session left RUNNING, found and ended by the next one.

A session stopped by Ctrl-C or an error ends its parent run and its trials' runs itself. One killed
outright (SIGKILL, the machine lost) cannot: its parent run and the runs of the trials it was
training stay RUNNING in MLflow. (Its Optuna trials are Optuna's business: they stop beating, and
the next worker that asks for a trial fails and re-queues them.) So each parent run says where
its session lives (host and process id) and beats: a tag holding the time of its last beat, written
from a thread every heartbeat interval. When a session starts, it ends as KILLED, with a tag saying
why, every RUNNING parent run of the study whose session is gone: its process is not alive on this
host, or it has not beaten for SESSION_GRACE_BEATS intervals (a session on another host, or one
whose process id was reused); and as FAILED, with the reason, every RUNNING trial run under such a
parent or under one that has already ended: FAILED as its Optuna trial will be (a trial run's KILLED
means pruned here).
"""

from __future__ import annotations

import os
import socket
import threading
import time

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

SESSION_KIND = "tuning-session"  # the `kind` tag of a session's parent run
HOST, PID, HEARTBEAT = "session_host", "session_pid", "session_heartbeat"
ENDED_BECAUSE = "killed_reason"  # on a parent run ended for its gone session
TRIAL_FAILED_BECAUSE = "fail_reason"  # on a trial's run, as for every failed trial
# A session on another host counts as gone after this many missed beats (two minutes at the default
# 10 s): longer than a trial's grace (three beats), so a tracking server away for a minute, which
# the session rides out, does not get its live parent run ended by a session starting meanwhile.
SESSION_GRACE_BEATS = 12


def identity_tags(now: float | None = None) -> dict[str, str]:
    """The tags a parent run starts with: where its session runs, and its first beat."""
    return {HOST: socket.gethostname(), PID: str(os.getpid()), HEARTBEAT: f"{now or time.time():.0f}"}


class SessionHeartbeat:
    """Writes the parent run's heartbeat tag every ``interval`` seconds from a daemon thread, until
    stopped. A beat that fails (the tracking server is away) is skipped: the next one tries again."""

    def __init__(self, client, run_id: str, interval: float):
        self.client, self.run_id, self.interval = client, run_id, interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="mlflow-session-heartbeat", daemon=True)

    def start(self) -> SessionHeartbeat:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.interval + 5)

    def _beat(self) -> None:
        while not self._stopped.wait(self.interval):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.0f}")
            except Exception:  # noqa: BLE001 - a missed beat must never end the session
                pass


def why_gone(run, interval: float, now: float | None = None) -> str | None:
    """Why the session of this RUNNING parent run is gone, or None while it may be alive."""
    tags = run.data.tags
    host, pid = tags.get(HOST), tags.get(PID)
    where = f"process {pid} on {host}" if pid else "a session from before parent runs beat"
    if host == socket.gethostname() and pid and not _process_alive(int(pid)):
        return f"its session ({where}) is gone: killed or crashed, so it could not end its runs"
    last_beat = float(tags.get(HEARTBEAT) or run.info.start_time / 1000)
    silent = (now or time.time()) - last_beat
    if silent > SESSION_GRACE_BEATS * interval:
        return f"its session ({where}) stopped beating {silent:.0f} s ago: killed, or its machine lost"
    return None


def end_runs_of_gone_sessions(client, experiment_id: str, interval: float) -> list[str]:
    """End the RUNNING runs of this experiment whose session is gone (see the module's docstring);
    one line per run ended, for the user. Reads only the RUNNING runs, a page at a time."""
    running = _running_runs(client, experiment_id)
    sessions = {run.info.run_id: run for run in running if run.data.tags.get("kind") == SESSION_KIND}
    gone = {run_id: reason for run_id, run in sessions.items() if (reason := why_gone(run, interval))}
    ended = []
    for run in running:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if "trial" not in run.data.tags or parent is None:
            continue  # not a trial's run
        if parent in gone:
            ended.append(_end(client, run, "FAILED", TRIAL_FAILED_BECAUSE, gone[parent]))
        elif parent not in sessions:
            ended.append(_end(client, run, "FAILED", TRIAL_FAILED_BECAUSE,
                              f"its session's parent run {parent} has ended, so nothing trains it"))
    for run_id, reason in gone.items():
        ended.append(_end(client, sessions[run_id], "KILLED", ENDED_BECAUSE, reason))
    return ended


def _running_runs(client, experiment_id: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _end(client, run, status: str, tag: str, reason: str) -> str:
    client.set_tag(run.info.run_id, tag, reason)
    client.set_terminated(run.info.run_id, status)
    return f"run {run.info.run_name} ({run.info.run_id}) left RUNNING, ended as {status}: {reason}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
