"""Runs a killed session left RUNNING, found and ended by the next one.

A session stopped by Ctrl-C or an error ends its parent run and its trials' runs itself. One killed
outright (SIGKILL, the machine lost) cannot: its parent run and the runs of the trials it was
training stay RUNNING in MLflow. (Its Optuna trials are Optuna's business: they stop beating, and
the next worker that asks for a trial fails and re-queues them.) So each parent run says where its
session lives (the machine, by its boot and process namespace, and the process, by its id and start
time) and beats: a tag holding the time of its last beat, rewritten every heartbeat interval. When
a session starts, it ends as KILLED, with a tag saying why, every RUNNING parent run of the study
whose session is gone: on this machine, its process is no longer there (checked at once, and only
so); elsewhere, it has not beaten for SESSION_GRACE_BEATS of its own intervals (the machines' clocks
must agree: NTP). And it ends as FAILED, with the reason, every RUNNING trial run under such a
parent or under one that has already ended: FAILED as its Optuna trial will be (a trial run's
KILLED means pruned here).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipeline.attrs import FAIL_REASON
from pipeline.tracking.experiments import end_run

SESSION_KIND = "tuning-session"  # the `kind` tag of a session's parent run
HOST, PID, HEARTBEAT = "session_host", "session_pid", "session_heartbeat"
MACHINE = "session_machine"  # boot id and process namespace: where a process id means this process
PROCESS_START = "session_process_start"  # the process's start time, in clock ticks since boot
INTERVAL = "session_heartbeat_seconds"  # how often this session beats: judged by its own setting
ENDED_BECAUSE = "killed_reason"  # on a parent run ended for its gone session
# A session on another machine counts as gone after this many of its intervals without a beat (two
# minutes at the default 10 s): longer than a trial's grace (three beats), so that a tracking server
# away for a minute, which the session rides out, does not get its live parent run ended meanwhile.
SESSION_GRACE_BEATS = 12


def identity_tags(interval: float) -> dict[str, str]:
    """The tags a parent run starts with: where its session runs, how often it beats, its first beat."""
    pid = os.getpid()
    return {HOST: socket.gethostname(), PID: str(pid), MACHINE: this_machine(), PROCESS_START: _start_time(pid),
            INTERVAL: f"{interval:g}", HEARTBEAT: f"{time.time():.0f}"}


def this_machine() -> str:
    """What makes a process id mean the same process: the kernel's boot and the process namespace
    (containers sharing a host name do not share these). Empty where /proc does not tell."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return ""


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
    """Why the session of this RUNNING parent run is gone, or None while it may be alive. ``interval``
    is ours, used when the run does not say its own."""
    tags = run.data.tags
    pid = _number(tags.get(PID))
    where = f"process {tags.get(PID)} on {tags.get(HOST)}" if pid else "a session from before parent runs beat"
    if pid and tags.get(MACHINE) and tags.get(MACHINE) == this_machine():
        if _start_time(int(pid)) != tags.get(PROCESS_START):  # gone, or its id reused by another process
            return f"its session ({where}) is gone: killed or crashed, so it could not end its runs"
        return None  # alive on this machine: however late its beats, it is not gone
    last_beat = _number(tags.get(HEARTBEAT)) or run.info.start_time / 1000
    beats_every = max(_number(tags.get(INTERVAL)) or interval, interval)
    silent = (now or time.time()) - last_beat
    if silent > SESSION_GRACE_BEATS * beats_every:
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
            ended.append(_end(client, run, "FAILED", FAIL_REASON, gone[parent]))
        elif parent not in sessions and _has_ended(client, parent):
            ended.append(_end(client, run, "FAILED", FAIL_REASON,
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


def _has_ended(client, run_id: str) -> bool:
    """Whether that parent run has ended (read again: it may have been RUNNING, on a page not read)."""
    try:
        return client.get_run(run_id).info.status != "RUNNING"
    except Exception:  # noqa: BLE001 - deleted: nothing will end its trials' runs either
        return True


def _end(client, run, status: str, tag: str, reason: str) -> str:
    end_run(client, run.info.run_id, status, reason, reason_tag=tag)
    return f"run {run.info.run_name} ({run.info.run_id}) left RUNNING, ended as {status}: {reason}"


def _start_time(pid: int) -> str:
    """The process's start time (field 22 of /proc/<pid>/stat), or "" when there is no such live
    process (a zombie is dead: killed, waiting to be reaped)."""
    try:
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return ""
    return "" if after_name[0] in ("Z", "X") else after_name[19]


def _number(text: str | None) -> float | None:
    """A tag's number; None when missing or not a number (a tag edited by hand)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
