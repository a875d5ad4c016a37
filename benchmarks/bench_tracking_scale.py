"""`make bench-tracking-scale`: the pipeline's reads against a study that has run for weeks.

Starts throwaway services (`pipeline.services.Services` in a temporary SERVICES_DIR: PostgreSQL and
an MLflow tracking server, as `make services` runs them), then writes one study's worth of synthetic
tracking state through them, shaped as `make tune` writes it (pipeline/tracking/runs.py,
pipeline/search/objective.py):

- an experiment `scale` (tagged for the UI), a parent run per session of 1,000 trials (`kind =
  tuning-session`), and RUNS nested runs `trial-<n>` with the trial tags, the full configuration and
  the sampled values as parameters, the seven per-epoch metrics over 20 epochs (step = epoch) and
  `best_val_accuracy`, `best_epoch`, `val_macro_f1`; a third FINISHED, the rest KILLED (pruned);
- the matching Optuna study in PostgreSQL: RUNS trials sampled from studies/mlp.toml's space, a third
  COMPLETE and two thirds PRUNED, each with 20 intermediate values and the user attributes the
  pipeline reads (`mlflow_run_id`, `epochs_run`, `epoch_seconds`, ...);
- two tiny real models (an untrained MLP logged as pipeline/tracking/export.py logs a trial's model): an
  early trial's, registered and made `champion` before the clock starts, and the best trial's, which
  the timed promotion registers and promotes.

Every run logs 20 epochs, pruned ones too (the worst case for the store: a real pruned trial stops
at a rung). Runs are written by a pool of threads through `MlflowClient` (create_run, one
log_batch, set_terminated: three requests a run); their Optuna trials through the storage's
create_new_trial.

Then it times, each once, on the full store:

1. the MLflow UI's experiment page in headless Chromium (Selenium, Debian's chromium-driver) until
   the run table shows rows, a first (cold) and a second load; and with the run table filtered;
2. `search_runs` over the experiment: every run, 1,000 a page; one trial's run by tag; the best
   run (order_by, max_results=1);
3. the pipeline's reads: promotion (`registry.promote_best_trial` on the study), `python -m pipeline
   evaluate-best` and `python -m pipeline compare` as whole commands (subprocesses), and what a
   `make tune` reads when a session starts (`check_study_matches` and `prepare_study`), for the
   study itself (a resumed session) and for a new study with `[warm_start] study = "scale"`.

Prints a table; asserts nothing. Uses the real test split for evaluate-best (`make data`).
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

STUDY = "scale"
EPOCHS = 20
TRIALS_PER_SESSION = 1000
THREADS = 8  # concurrent writers while building the store; the server has two workers
PAGE = 1000  # search_runs page size (MLflow's default)
UI_SECONDS = 120  # how long the UI may take to show rows before the bench gives up on it
REPO_ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000, help="nested trial runs (default: 10000)")
    parser.add_argument("--keep", action="store_true", help="leave the services running and say where (debugging)")
    args = parser.parse_args()
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

    from pipeline.network import free_port
    from pipeline.services import Services

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the services below
    began = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bench-tracking-scale-", dir="/tmp"))  # reachable by the postgres user
    root.chmod(0o755)
    services = Services(root)
    figures: list[tuple[str, str, str]] = []
    try:
        started = time.perf_counter()
        state = services.start(pg_port=free_port(), mlflow_port=free_port())
        print(f"services up in {time.perf_counter() - started:.1f} s ({root})", flush=True)
        os.environ.update(services.client_env(state))  # the printed exports: the stores and the server's login
        os.environ.pop("SERVICES_DIR", None)
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"  # set_terminated would get_run to print a link
        build = build_store(root, args.runs)
        del os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"]  # the timed commands run as users run them
        figures.append((f"writing {args.runs:,} trial runs + {build['sessions']} session runs and their Optuna "
                        f"trials ({THREADS} threads)", f"{build['seconds']:.0f} s",
                        f"{args.runs / build['seconds']:.0f} runs/s; {build['metrics']:,} metric values"))
        figures += time_reads(root, build)
    finally:
        if args.keep:
            print(f"services kept: SERVICES_DIR={root} .venv/bin/python -m pipeline services stop")
        else:
            services.stop()
            shutil.rmtree(root, ignore_errors=True)
    width = max(len(f[0]) for f in figures)
    print(f"\nTracking at scale: {args.runs:,} trial runs of {EPOCHS} epochs in one experiment and one study")
    print(f"{'what':<{width}}  {'seconds':>9}  note")
    for what, seconds, note in figures:
        print(f"{what:<{width}}  {seconds:>9}  {note}")
    print(f"\nbench in all: {time.perf_counter() - began:.0f} s")


# Building the store ------------------------------------------------------------------------------

def study_files(root: Path) -> tuple[Path, Path]:
    """The study (studies/mlp.toml's space and settings, named `scale`) and a new study that warm-starts from it."""
    folder = root / "studies"
    folder.mkdir()
    text = (REPO_ROOT / "studies" / "mlp.toml").read_text()
    (folder / f"{STUDY}.toml").write_text(text)
    (folder / f"{STUDY}-warm.toml").write_text(text + f'\n[warm_start]\nstudy = "{STUDY}"\nbest = 3\n')
    return folder / f"{STUDY}.toml", folder / f"{STUDY}-warm.toml"


def build_store(root: Path, runs: int) -> dict:
    import mlflow
    import optuna
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
    from optuna.trial import TrialState

    from pipeline.tracking.experiments import EXPERIMENT_TAGS, ensure_experiment, environment_tags, param_value
    from pipeline import attrs
    from pipeline.search.study import prepare_study, quiet_optuna
    from pipeline.search.study_file import load_study
    from pipeline.stores import open_storage, redact
    from pipeline.tracking.runs import study_tags

    quiet_optuna()
    study_file, _ = study_files(root)
    spec = load_study(study_file)
    storage_url = os.environ["OPTUNA_STORAGE"]
    storage = open_storage(storage_url)
    client = mlflow.MlflowClient()
    experiment_id = ensure_experiment(STUDY)
    assert client.get_experiment(experiment_id).tags.get("mlflow.experimentKind") == \
        EXPERIMENT_TAGS["mlflow.experimentKind"]
    study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
    study_id = storage.get_study_id_from_name(STUDY)

    rng = random.Random(0)
    sampler_study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))  # in memory: the space's values
    shared_tags = {**study_tags(spec, storage_url), **environment_tags(), "device": "cpu", "dataset": "official",
                   "dataset_checksum": "0" * 64}
    weeks = timedelta(days=21)
    first = datetime.now() - weeks
    step = weeks / runs
    best_index = max(i for i in range(runs) if i % 3 == 0)  # a complete trial near the end: the study's best
    champion_index = 0  # an early complete trial: the champion before the timed promotion

    sessions = []
    for s in range(math.ceil(runs / TRIALS_PER_SESSION)):
        start = first + s * TRIALS_PER_SESSION * step
        run = client.create_run(experiment_id, start_time=int(start.timestamp() * 1000),
                                run_name=f"{STUDY} session {start:%Y-%m-%d %H:%M:%S}",
                                tags={**study_tags(spec, storage_url), "study": STUDY, "kind": "tuning-session"})
        sessions.append(run.info.run_id)

    planned = []
    for number in range(runs):
        trial = sampler_study.ask()
        config = spec.config_for(trial)
        complete = number % 3 == 0
        top = 0.95 if number == best_index else 0.93 if number == champion_index else rng.uniform(0.80, 0.92)
        curve = [top - 0.08 * math.exp(-epoch / 4) * rng.uniform(0.8, 1.2) for epoch in range(1, EPOCHS + 1)]
        curve[-1] = top if complete else curve[-1]
        planned.append(SimpleNamespace(number=number, params=trial.params, distributions=trial.distributions,
                                       config=config, complete=complete, curve=curve,
                                       start=first + number * step, seconds=rng.uniform(20, 60)))

    def write(trial) -> int:
        start_ms = int(trial.start.timestamp() * 1000)
        run = client.create_run(experiment_id, start_time=start_ms, run_name=f"trial-{trial.number}", tags={
            **shared_tags, MLFLOW_PARENT_RUN_ID: sessions[trial.number // TRIALS_PER_SESSION],
            "trial": str(trial.number)})
        run_id = run.info.run_id
        epoch_seconds = trial.seconds / EPOCHS
        metrics = []
        for epoch, val_accuracy in enumerate(trial.curve, start=1):
            at = start_ms + int(epoch * epoch_seconds * 1000)
            values = {"train_batch_loss": 1.2 - val_accuracy, "train_batch_accuracy": val_accuracy + 0.01,
                      "val_loss": 1.1 - val_accuracy, "val_accuracy": val_accuracy, "lr": 0.002 * (1 - epoch / 21),
                      "train_seconds": epoch_seconds * 0.9, "epoch_seconds": epoch_seconds}
            metrics += [Metric(k, v, at, epoch) for k, v in values.items()]
        best_epoch = max(range(EPOCHS), key=lambda e: trial.curve[e]) + 1
        end_ms = start_ms + int(trial.seconds * 1000)
        tags = [RunTag("pruned_at_epoch", str(EPOCHS))]
        if trial.complete:
            metrics += [Metric("best_val_accuracy", max(trial.curve), end_ms, 0),
                        Metric("best_epoch", best_epoch, end_ms, 0), Metric("val_macro_f1", max(trial.curve) - 0.002,
                                                                            end_ms, 0)]
            tags = [RunTag("flip_averaged", "false"), RunTag("tta", "none")]
        params = {**asdict(trial.config), **{f"sampled.{k}": v for k, v in trial.params.items()}}
        client.log_batch(run_id, metrics=metrics, params=[Param(k, param_value(v)) for k, v in params.items()],
                         tags=tags)
        user_attrs = {}
        if trial.number in (champion_index, best_index):  # a trial that improved the best logs its model
            trial.model_uri = log_tiny_model(run_id)
            client.set_tag(run_id, "model_uri", trial.model_uri)
            user_attrs[attrs.MODEL_URI] = trial.model_uri
        client.set_terminated(run_id, "FINISHED" if trial.complete else "KILLED", end_time=end_ms)
        frozen = optuna.trial.create_trial(
            state=TrialState.COMPLETE if trial.complete else TrialState.PRUNED,
            value=max(trial.curve) if trial.complete else trial.curve[-1],
            params=trial.params, distributions=trial.distributions,
            intermediate_values=dict(enumerate(trial.curve, start=1)),
            user_attrs={attrs.MAX_EPOCHS: EPOCHS, attrs.EPOCHS_RUN: EPOCHS, attrs.BEST_EPOCH: best_epoch,
                        attrs.SECONDS: round(trial.seconds, 1), attrs.EPOCH_SECONDS: round(epoch_seconds, 2),
                        attrs.WORKER: "bench:1", attrs.MLFLOW_RUN_ID: run_id, attrs.TRACKING_SECONDS: 0.2,
                        **user_attrs})
        frozen.datetime_start, frozen.datetime_complete = trial.start, trial.start + timedelta(seconds=trial.seconds)
        trial.run_id = run_id
        trial.trial_id = storage.create_new_trial(study_id, template_trial=frozen)
        return len(metrics)

    special = [planned[champion_index], planned[best_index]]
    started = time.perf_counter()
    metric_values = sum(write(trial) for trial in special)  # their models first, one at a time
    rest = [trial for trial in planned if trial not in special]
    with ThreadPoolExecutor(THREADS) as pool:  # trial numbers follow completion order, as with parallel workers
        for done, count in enumerate(pool.map(write, rest), start=len(special) + 1):
            metric_values += count
            if done % max(100, runs // 10) == 0:
                elapsed = time.perf_counter() - started
                print(f"  {done:,} runs written, {elapsed:.0f} s ({done / elapsed:.1f} runs/s)", flush=True)
    for session in sessions:
        client.set_terminated(session, "FINISHED")
    seconds = time.perf_counter() - started
    prepare_study(spec, storage)  # the study's own attributes, as a session records them (no trial is queued)

    # The champion before the timed promotion; the best trial's model is left for promotion to register.
    from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL, register

    champion = planned[champion_index]
    version = register(champion.model_uri, champion.run_id, val_accuracy=max(champion.curve), study=STUDY,
                       trial=champion.number)
    client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version.version)
    print(f"store built: {len(study.get_trials(deepcopy=False)):,} trials in {redact(storage_url)}", flush=True)
    return {"seconds": seconds, "metrics": metric_values, "sessions": len(sessions), "experiment_id": experiment_id,
            "best_number": planned[best_index].number}


def log_tiny_model(run_id: str) -> str:
    """An untrained 784-32-10 MLP logged to the run as a trial's model is (pipeline/tracking/export.py)."""
    import torch

    from pipeline.training.config import TrainConfig
    from pipeline.tracking.export import log_raw_pixel_model
    from pipeline.training.models import build_model

    torch.manual_seed(0)
    model = build_model(TrainConfig(hidden_sizes=(32,)))
    splits = SimpleNamespace(val_images=torch.randn(4, 1, 28, 28), mean=0.286, std=0.353)
    return log_raw_pixel_model(run_id, model, splits)


# Timing the reads --------------------------------------------------------------------------------

def time_reads(root: Path, build: dict) -> list[tuple[str, str, str]]:
    figures = []
    figures += time_ui(build["experiment_id"], build["best_number"])
    figures += time_search_runs(build)
    figures += time_promotion(build)
    figures.append(time_command("python -m pipeline evaluate-best", ["evaluate-best", "--reports-dir",
                                                                     str(root / "reports")]))
    figures.append(time_command("python -m pipeline compare", ["compare", "--reports-dir", str(root / "reports")]))
    figures += time_session_start(root)
    figures += time_whole_study_reads()
    return figures


def log_in(browser) -> None:
    """Every request the page makes carries the tracking server's login (basic auth), as a person's
    browser sends it once they typed it; set through Chrome's DevTools, so it is in no URL."""
    import base64

    user, password = os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {
        "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}})


def time_ui(experiment_id: str, trial_number: int) -> list[tuple[str, str, str]]:
    """The experiment page until its run table shows rows: a cold load, a second one, then filtered."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        return [("MLflow UI", "-", "skipped: needs Debian's chromium and chromium-driver")]
    from urllib.parse import quote

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.paths import REPORTS_DIR

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    screenshots = REPORTS_DIR / "screenshots"
    screenshots.mkdir(parents=True, exist_ok=True)
    page = f"{os.environ['MLFLOW_TRACKING_URI']}/#/experiments/{experiment_id}/runs"  # "Training runs"
    sessions_only = quote("tags.kind = 'tuning-session'")
    one_trial = quote(f"tags.trial = '{trial_number}'")
    loads = [("MLflow UI experiment page, first load (cold)", page, "session", "mlflow-scale-cold.png"),
             ("MLflow UI experiment page, second load", page, "session", "mlflow-scale-warm.png"),
             ("MLflow UI, run table filtered to `tags.kind = 'tuning-session'`",
              f"{page}?searchFilter={sessions_only}", "session", "mlflow-scale-sessions.png"),
             ("MLflow UI, run table filtered to one trial (`tags.trial = '<n>'`)",
              # The trial shows inside its session's row, collapsed: the table matches the two of them.
              f"{page}?searchFilter={one_trial}", "session", "mlflow-scale-one-trial.png")]
    browser = webdriver.Chrome(service=Service(driver), options=options)
    log_in(browser)
    figures = []
    try:
        for what, url, wanted, screenshot in loads:
            def shows_rows(b, wanted=wanted):  # the run table names a run, and says how many match
                text = b.find_element("tag name", "body").text
                return wanted in text and "matching run" in text

            browser.get("about:blank")
            started = time.perf_counter()
            browser.get(url)
            try:
                WebDriverWait(browser, UI_SECONDS, poll_frequency=0.2).until(shows_rows)
                seconds = time.perf_counter() - started
                matching = re.search(r"([\d,]+) matching runs?", browser.find_element("tag name", "body").text)
                figures.append((what, f"{seconds:.1f}", f"'{matching.group(0)}'; reports/screenshots/{screenshot}"))
            except Exception as error:  # a timeout: say so, keep the screenshot
                figures.append((what, f">{UI_SECONDS}", f"no run row shown ({type(error).__name__})"))
            finally:
                browser.save_screenshot(str(screenshots / screenshot))
            print(f"  {figures[-1][0]}: {figures[-1][1]} s", flush=True)
    finally:
        browser.quit()
    return figures


def time_search_runs(build: dict) -> list[tuple[str, str, str]]:
    import mlflow

    client = mlflow.MlflowClient()
    experiment = [build["experiment_id"]]
    started = time.perf_counter()
    runs, token, pages = 0, None, 0
    while True:
        page = client.search_runs(experiment, max_results=PAGE, page_token=token)
        runs, token, pages = runs + len(page), page.token, pages + 1
        if not token:
            break
    every = time.perf_counter() - started
    started = time.perf_counter()
    (one,) = client.search_runs(experiment, f"tags.trial = '{build['best_number']}'")
    by_tag = time.perf_counter() - started
    started = time.perf_counter()
    (best,) = client.search_runs(experiment, "attributes.status = 'FINISHED'", max_results=1,
                                 order_by=["metrics.best_val_accuracy DESC"])
    ordered = time.perf_counter() - started
    assert one.info.run_id == best.info.run_id, "the best trial's run is the best run"
    figures = [(f"search_runs, every run of the experiment ({PAGE:,} a page)", f"{every:.1f}",
                f"{runs:,} runs in {pages} pages"),
               ("search_runs, one trial's run (`tags.trial = '<n>'`)", f"{by_tag:.2f}", "1 run"),
               ("search_runs, the best run (order_by best_val_accuracy, max_results=1)", f"{ordered:.2f}", "1 run")]
    for what, seconds, _ in figures:
        print(f"  {what}: {seconds} s", flush=True)
    return figures


def time_promotion(build: dict) -> list[tuple[str, str, str]]:
    """What a session does after its trials: register the best trial's model and promote it."""
    import optuna

    from pipeline.tracking.registry import promote_best_trial
    from pipeline.stores import open_storage

    started = time.perf_counter()
    study = optuna.load_study(study_name=STUDY, storage=open_storage(os.environ["OPTUNA_STORAGE"]))
    outcome = promote_best_trial(study)
    seconds = time.perf_counter() - started
    print(f"  promotion: {seconds:.2f} s ({outcome['outcome']})", flush=True)
    return [("promotion (registry.promote_best_trial: best trial, register, promote)", f"{seconds:.2f}",
             f"version {outcome['version']}: {outcome['outcome']}")]


def time_command(what: str, arguments: list[str]) -> tuple[str, str, str]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", *arguments], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-3000:], sep="\n")
        return what, f"{seconds:.1f}", f"FAILED (exit {done.returncode})"
    print(f"  {what}: {seconds:.1f} s", flush=True)
    return what, f"{seconds:.1f}", "the whole command, start-up included"


def time_session_start(root: Path) -> list[tuple[str, str, str]]:
    """What `make tune` reads from the storage before its first trial: check_study_matches, then
    prepare_study (the warm start's reads included), each on a storage opened afresh."""
    from optuna.trial import TrialState

    from pipeline.search.study import check_study_matches, prepare_study
    from pipeline.search.study_file import load_study
    from pipeline.stores import open_storage

    resumed, warm = (load_study(path) for path in study_files_in(root))
    figures = []
    for what, spec in (("session start, resuming the study (check_study_matches + prepare_study)", resumed),
                       ("session start, a new study warm-starting from it ([warm_start], best 3)", warm)):
        storage = open_storage(os.environ["OPTUNA_STORAGE"])
        started = time.perf_counter()
        check_study_matches(spec, storage)
        study = prepare_study(spec, storage)
        seconds = time.perf_counter() - started
        waiting = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        figures.append((what, f"{seconds:.2f}", f"{waiting} trials queued"))
        print(f"  {what}: {seconds:.2f} s", flush=True)
    return figures


def time_whole_study_reads() -> list[tuple[str, str, str]]:
    """For scale: reading every trial, as the session start and compare's study list did before they
    were narrowed (and as a session's sampler and summary, and compare's figures, still must)."""
    import optuna

    from pipeline.stores import open_storage

    figures = []
    storage = open_storage(os.environ["OPTUNA_STORAGE"])
    started = time.perf_counter()
    trials = optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)
    figures.append(("every trial of the study loaded (Study.get_trials)", f"{time.perf_counter() - started:.2f}",
                    f"{len(trials):,} trials"))
    started = time.perf_counter()
    summaries = optuna.get_all_study_summaries(open_storage(os.environ["OPTUNA_STORAGE"]), include_best_trial=False)
    figures.append(("optuna.get_all_study_summaries (every trial of every study)",
                    f"{time.perf_counter() - started:.2f}", f"{len(summaries)} studies"))
    for what, seconds, _ in figures:
        print(f"  {what}: {seconds} s", flush=True)
    return figures


def study_files_in(root: Path) -> tuple[Path, Path]:
    return root / "studies" / f"{STUDY}.toml", root / "studies" / f"{STUDY}-warm.toml"


if __name__ == "__main__":
    main()
