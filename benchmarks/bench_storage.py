"""`make bench-storage`: how many workers each store carries, and how it fails past that.

Optuna: N worker processes (N = 1, 2, 4, ... 32) run one study through `study.optimize`, as the
pipeline's workers do, opened by the pipeline's own `open_storage` (heartbeats on for SQLite and
PostgreSQL; the journal file has none). The objective trains nothing: ten intermediate reports
with a short sleep between them, so the storage is what is measured. Per store and N: finished
trials per second, p50 / p99 of "ask" (from the previous trial's end to the objective's start:
stale-trial check, ask, heartbeat start) and "tell" (from the objective's return to the trial's
callback: tell, heartbeat stop) and of one `trial.report`, errors by kind, and trials left RUNNING.
Rates count from the first worker's start of work (its store opened) to the last one's end.

MLflow: N processes each log trial runs as the pipeline's trials do (a run with parameters, one
batch of four metrics per epoch for ten epochs, a summary, the end), against a SQLite store and
against the PostgreSQL-backed tracking server of `make services`. Per store and N: runs per second,
p50 / p99 of one call, errors by kind.

Memory: the peak resident size of a real `make tune` worker (the real data, the mlp study, one
epoch), with `--memory`.

PostgreSQL and the tracking server are throwaway ones (`make services` in a temporary folder), on
loopback. Bounded: each cell stops at its trial count or its time limit. Prints a table; asserts
nothing. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPORTS = 10  # intermediate values per trial, as a 10-epoch trial reports
STEP_SLEEP = 0.01  # seconds of "training" between reports
MLFLOW_EPOCHS = 10
ERROR_KINDS = (  # (kind, pattern in the error's text), first match wins
    ("database is locked", "database is locked"),
    ("deadlock", "deadlock"),
    ("already finished", "already finished|UpdateFinishedTrial|has already"),
    ("too many connections", "too many clients|too many connections|remaining connection slots"),
    ("lost connection", "connection|server closed|terminating|Connection refused|timed out"),
)


def error_kind(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    for kind, pattern in ERROR_KINDS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return kind
    return type(error).__name__


def in_processes(count: int, target, args: tuple, timeout: float) -> list:
    """Run ``target(*args, results)`` in ``count`` forked processes (the parent's imports shared; each
    opens its own connections) and gather what each puts on ``results``."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    processes = [context.Process(target=target, args=(*args, results)) for _ in range(count)]
    for process in processes:
        process.start()
    gathered = [results.get(timeout=timeout) for _ in processes]
    for process in processes:
        process.join(timeout=30)
    return gathered


def busy_wall(spans: list[tuple[float, float]]) -> float:
    """Seconds from the first worker's start of work (its store opened) to the last one's end: the
    rate then measures the store, not how fast processes start."""
    return max(end for _, end in spans) - min(start for start, _ in spans)


# Optuna ----------------------------------------------------------------------------------------


def optuna_worker(storage_url: str, study_name: str, trials: int, deadline: float, results) -> None:
    """One worker process: run trials until its share is done or the deadline passes; send back the
    latencies (seconds) and the errors by kind."""
    import optuna

    from pipeline.stores import open_storage

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    marks = {"ask": [], "tell": [], "report": []}
    errors: Counter = Counter()
    last_end = [time.perf_counter()]
    returned = [0.0]

    def objective(trial):
        marks["ask"].append(time.perf_counter() - last_end[0])
        for step in range(REPORTS):
            time.sleep(STEP_SLEEP)
            started = time.perf_counter()
            trial.report(step / REPORTS, step)
            marks["report"].append(time.perf_counter() - started)
        returned[0] = time.perf_counter()
        return trial.number / 1000

    def told(study, trial):
        now = time.perf_counter()
        marks["tell"].append(now - returned[0])
        last_end[0] = now

    done = 0
    study = None
    began = None
    while done < trials and time.time() < deadline:
        try:
            if study is None:
                study = optuna.load_study(study_name=study_name, storage=open_storage(storage_url))
                last_end[0] = time.perf_counter()  # opening the storage is not an ask
                began = began or time.time()
            before = len(marks["tell"])
            study.optimize(objective, n_trials=trials - done, timeout=max(0.0, deadline - time.time()),
                           callbacks=[told])
            done += len(marks["tell"]) - before
        except Exception as error:  # noqa: BLE001 - counted by kind: what the bench is for
            errors[error_kind(error)] += 1
            done += len(marks["tell"]) - before if study is not None else 0
            last_end[0] = time.perf_counter()
            time.sleep(0.05)
    results.put((marks, dict(errors), (began or time.time(), time.time())))


def run_optuna_cell(storage_url: str, workers: int, trials_per_worker: int, seconds: float) -> dict:
    import optuna

    from pipeline.stores import open_storage

    name = f"bench-{workers}-{time.time_ns()}"
    storage = open_storage(storage_url)
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    if hasattr(storage, "engine"):
        storage.engine.dispose()  # forked workers open their own: hand them no connection
    gathered = in_processes(workers, optuna_worker, (storage_url, name, trials_per_worker, time.time() + seconds),
                            seconds + 120)
    wall = busy_wall([span for *_, span in gathered])
    study = optuna.load_study(study_name=name, storage=open_storage(storage_url))
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    merged = {key: np.concatenate([np.asarray(m[key]) for m, *_ in gathered]) for key in ("ask", "tell", "report")}
    errors = sum((Counter(e) for _, e, _ in gathered), Counter())
    return {"finished": states["COMPLETE"], "per_second": states["COMPLETE"] / wall, "running": states["RUNNING"],
            "failed": states["FAIL"], "errors": dict(errors), "wall": wall,
            **{f"{key}_p50": _ms(merged[key], 50) for key in merged}, **{f"{key}_p99": _ms(merged[key], 99)
                                                                         for key in merged}}


# MLflow ----------------------------------------------------------------------------------------


def mlflow_worker(tracking_uri: str, experiment_id: str, runs: int, deadline: float, results) -> None:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(tracking_uri)
    client.get_experiment(experiment_id)  # the store opened (engine, schema check) before the clock
    latencies, errors, finished = [], Counter(), 0
    began = time.time()

    def call(function, *args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            latencies.append(time.perf_counter() - started)

    for number in range(runs):
        if time.time() >= deadline:
            break
        try:
            run = call(client.create_run, experiment_id, run_name=f"trial-{number}", tags={"trial": str(number)})
            run_id = run.info.run_id
            call(client.log_batch, run_id, params=[Param(f"p{i}", str(i)) for i in range(20)])
            for epoch in range(1, MLFLOW_EPOCHS + 1):
                now = int(time.time() * 1000)
                call(client.log_batch, run_id, metrics=[Metric(key, 0.5, now, epoch) for key in
                                                        ("train_loss", "val_loss", "val_accuracy", "seconds")])
            call(client.log_batch, run_id, metrics=[Metric("best_val_accuracy", 0.9, int(time.time() * 1000), 0)])
            call(client.set_terminated, run_id, "FINISHED")
            finished += 1
        except Exception as error:  # noqa: BLE001
            errors[error_kind(error)] += 1
    results.put((latencies, dict(errors), finished, (began, time.time())))


def new_experiment(tracking_uri: str, name: str) -> str:
    """Create the store's tables (a new SQLite store: once, before the clock) and an experiment, in a
    process of its own: the workers are forked from this one, which must hand them no SQLite
    connection (MLflow caches its store, connections included, per URI)."""
    script = ("import sys, mlflow\nfrom pipeline.stores import configure_mlflow\nconfigure_mlflow()\n"
              "print(mlflow.MlflowClient().create_experiment(sys.argv[1]))")
    done = subprocess.run([sys.executable, "-c", script, name], env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                          capture_output=True, text=True, check=True)
    return done.stdout.split()[-1]


def run_mlflow_cell(tracking_uri: str, workers: int, runs_per_worker: int, seconds: float) -> dict:
    experiment_id = new_experiment(tracking_uri, f"bench-{workers}-{time.time_ns()}")
    gathered = in_processes(workers, mlflow_worker, (tracking_uri, experiment_id, runs_per_worker,
                                                     time.time() + seconds), seconds + 300)
    wall = busy_wall([span for *_, span in gathered])
    latencies = np.concatenate([np.asarray(latency) for latency, *_ in gathered])
    finished = sum(count for _, _, count, _ in gathered)
    errors = sum((Counter(e) for _, e, _, _ in gathered), Counter())
    return {"finished": finished, "per_second": finished / wall, "call_p50": _ms(latencies, 50),
            "call_p99": _ms(latencies, 99), "errors": dict(errors), "wall": wall}


def server_call_latencies(tracking_uri: str, calls: int = 20) -> dict[str, float]:
    """Median ms of single calls to the tracking server, one client, nothing else running: three of
    MLflow's client calls, and bare `requests` calls on a kept-alive connection and on a new one."""
    import mlflow
    import requests

    client = mlflow.MlflowClient(tracking_uri)
    run_id = client.create_run(client.create_experiment(f"calls-{time.time_ns()}")).info.run_id
    login = (os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD"))
    login = login if all(login) else None  # the services' server asks for one, as MLflow's client sends it
    session = requests.Session()
    session.auth = login
    api = f"{tracking_uri}/api/2.0/mlflow/runs"
    timed = {"get_run": lambda: client.get_run(run_id), "set_tag": lambda: client.set_tag(run_id, "k", "v"),
             "log_metric": lambda: client.log_metric(run_id, "m", 1.0),
             "requests GET": lambda: session.get(f"{api}/get", params={"run_id": run_id}),
             "requests POST": lambda: session.post(f"{api}/set-tag", json={"run_id": run_id, "key": "k", "value": "v"}),
             # A connection of its own per call, where the others reuse theirs (keep-alive, as MLflow's client does).
             "requests GET, new connection": lambda: requests.get(f"{api}/get", params={"run_id": run_id},
                                                                  auth=login)}
    medians = {}
    for name, call in timed.items():
        seconds = []
        for _ in range(calls):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        medians[name] = _ms(np.asarray(seconds), 50)
    return medians


# Memory ----------------------------------------------------------------------------------------


def worker_peak_memory(folder: Path) -> dict:
    """Peak resident memory (VmHWM) of the session process and of each worker of a real `make tune`
    session: WORKERS=2, the mlp study on the real data, one 1-epoch trial each, no tracking."""
    command = [sys.executable, "-m", "pipeline", "tune", "--study", "mlp", "--workers", "2", "--trials", "2",
               "--set", "epochs=1", "--no-final", "--no-tracking", "--storage", f"sqlite:///{folder / 'mem.db'}"]
    env = {**os.environ, "CHECKPOINT_DIR": str(folder / "checkpoints")}
    session = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks: dict[int, int] = {}
    while session.poll() is None:
        for pid in [session.pid, *_children(session.pid)]:
            peaks[pid] = max(peaks.get(pid, 0), _peak_kib(pid))
        time.sleep(0.5)
    if session.returncode != 0:
        raise SystemExit(f"the memory session failed: {session.stderr.read()[-2000:]}")
    worker_peaks = sorted((kib for pid, kib in peaks.items() if pid != session.pid), reverse=True)[:2]
    return {"session_mib": peaks[session.pid] / 1024, "worker_mib": [kib / 1024 for kib in worker_peaks]}


def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# The run ---------------------------------------------------------------------------------------


def _ms(values: np.ndarray, percentile: int) -> float:
    return float(np.percentile(values, percentile) * 1000) if len(values) else float("nan")


def start_services(folder: Path):
    from pipeline.services import Services
    from pipeline.stores import redact

    services = Services(folder / "services")
    state = services.start()
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # the server's login, for every client
        os.environ[name] = services.client_env(state)[name]  # (a SQLite store ignores it)
    print(f"services: PostgreSQL {redact(services.database_url('optuna', state))}, "
          f"MLflow server {services.tracking_uri(state)}", flush=True)
    return services, state


def format_errors(errors: dict) -> str:
    return ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items())) or "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4,8,16,32", help="worker counts, comma-separated")
    parser.add_argument("--stores", default="sqlite,journal,postgresql", help="Optuna stores to load")
    parser.add_argument("--tracking", default="sqlite,server", help="MLflow stores to load ('' for none)")
    parser.add_argument("--trials", type=int, default=12, help="trials per worker (Optuna)")
    parser.add_argument("--runs", type=int, default=6, help="runs per worker (MLflow)")
    parser.add_argument("--seconds", type=float, default=45, help="time limit of one cell")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of a real make tune worker")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    stores = [s for s in args.stores.split(",") if s]
    tracking = [s for s in args.tracking.split(",") if s]

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study created
    os.environ.setdefault("OPTUNA_HEARTBEAT_SECONDS", "10")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # As the pipeline's configure_mlflow: no "View run" line, and no get_run behind it, per ended run.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    folder = Path(tempfile.mkdtemp(prefix="bench-storage-", dir="/tmp"))  # reachable by the postgres user
    folder.chmod(0o755)
    services = None
    try:
        if "postgresql" in stores or "server" in tracking:
            services, state = start_services(folder)
        print(f"\nOptuna: {args.trials} trials per worker of {REPORTS} reports {STEP_SLEEP * 1000:.0f} ms apart, "
              f"{args.seconds:.0f} s at most per cell; latencies in ms", flush=True)
        print("| store | workers | trials/s | ask p50 / p99 | tell p50 / p99 | report p50 / p99 | errors | RUNNING "
              "left |\n|---|---|---|---|---|---|---|---|", flush=True)
        for store in stores:
            for workers in counts:
                url = {"sqlite": f"sqlite:///{folder / f'optuna-{workers}.db'}",
                       "journal": str(folder / f"optuna-{workers}.journal"),
                       "postgresql": services.database_url("optuna", state) if services else ""}[store]
                cell = run_optuna_cell(url, workers, args.trials, args.seconds)
                print(f"| {store} | {workers} | {cell['per_second']:.1f} ({cell['finished']} in {cell['wall']:.1f} s) "
                      f"| {cell['ask_p50']:.0f} / {cell['ask_p99']:.0f} | {cell['tell_p50']:.0f} / "
                      f"{cell['tell_p99']:.0f} | {cell['report_p50']:.1f} / {cell['report_p99']:.0f} | "
                      f"{format_errors(cell['errors'])} | {cell['running']} |", flush=True)
        if tracking:
            print(f"\nMLflow: {args.runs} runs per worker ({MLFLOW_EPOCHS} epochs of 4 metrics, 20 parameters), "
                  f"{args.seconds:.0f} s at most per cell; latency of one call in ms", flush=True)
            print("| store | workers | runs/s | call p50 / p99 | errors |\n|---|---|---|---|---|", flush=True)
        for store in tracking:
            for workers in counts:
                uri = (services.tracking_uri(state) if store == "server"
                       else f"sqlite:///{folder / f'mlflow-{workers}.db'}")
                cell = run_mlflow_cell(uri, workers, args.runs, args.seconds)
                print(f"| {store} | {workers} | {cell['per_second']:.1f} ({cell['finished']} in {cell['wall']:.1f} s) "
                      f"| {cell['call_p50']:.0f} / {cell['call_p99']:.0f} | {format_errors(cell['errors'])} |",
                      flush=True)
        if "server" in tracking:
            medians = server_call_latencies(services.tracking_uri(state))
            print("\nOne call to the tracking server, median of 20 (ms): "
                  + ", ".join(f"{name} {ms:.1f}" for name, ms in medians.items()), flush=True)
        if args.memory:
            memory = worker_peak_memory(folder)
            print(f"\nMemory of a real `make tune WORKERS=2` (mlp, real data): session process "
                  f"{memory['session_mib']:.0f} MiB peak, workers "
                  f"{' and '.join(f'{m:.0f}' for m in memory['worker_mib'])} MiB peak (VmHWM)", flush=True)
    finally:
        if services is not None:
            services.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
