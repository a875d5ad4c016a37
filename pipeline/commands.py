"""What each command does: the one place that wires the parts (tracking on or off, which store,
which device). Imports are inside each command, so that `compare` and `dashboard` never load torch."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.training.config import NOTEBOOK_TEST_ACCURACY, ConfigError, TrainConfig
from pipeline.network import check_exposure, require_free_port
from pipeline.training.recipes import load_recipe


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def reports_folder(path: Path) -> Path:
    """--reports-dir, checked before any work: a file there would fail after the work is done."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--reports-dir {path} is a file, not a folder; name a folder (it is created if missing)")
    return path


def run_data(args: argparse.Namespace) -> int:
    from pipeline.data.fetch import ensure_dataset

    dataset = ensure_dataset()
    print(f"Fashion-MNIST ready in {dataset.source}: {len(dataset.train_labels)} train / "
          f"{len(dataset.test_labels)} test images, checksum {dataset.checksum[:12]}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    for key, flag in (("model", args.model), ("epochs", args.epochs)):
        if flag is None:
            continue
        if key in overrides and str(overrides[key]) != str(flag):
            raise ConfigError(f"--{key} {flag} and --set {key}={overrides[key]} disagree; give one of them")
        overrides[key] = flag
    recipe = load_recipe(args.recipe) if args.recipe else None
    base = recipe.config() if recipe else TrainConfig()
    config = base.replace(**overrides)  # a bad key fails here, before any slow import

    from pipeline.data.dataset import load_fashion_mnist, make_splits, normalize
    from pipeline.training.device import configure_cpu_threads, pick_device
    from pipeline.training.models import build_model, count_parameters
    from pipeline.progress import epoch_bar
    from pipeline.training.train import nll_and_accuracy, train

    out = sys.stderr if args.json else sys.stdout
    started = time.perf_counter()
    device = pick_device(args.device)
    configure_cpu_threads()
    dataset = load_fashion_mnist()
    splits = make_splits(dataset, val_size=config.val_size, train_subset=config.train_subset).to(device)
    if recipe:
        print(f"recipe {recipe.name} ({recipe.path})" + (f": {recipe.description}" if recipe.description else ""),
              file=out)
    print(f"{config.model.upper()} with {count_parameters(build_model(config)):,} parameters on {device}; "
          f"{len(splits.train_labels):,} training / {len(splits.val_labels):,} validation images", file=out)

    bar = epoch_bar(config.epochs, description="training", stream=out)  # a live bar on a terminal only

    def show_progress(epoch, m):
        bar.update(epoch, m.val_accuracy)
        bar.write(f"epoch {epoch:3d}/{config.epochs}  train loss {m.train_batch_loss:.4f} acc "
                  f"{m.train_batch_accuracy:6.2%}  val loss {m.val_loss:.4f} acc {m.val_accuracy:6.2%}  "
                  f"lr {m.lr:.2e}  {m.epoch_seconds:5.1f}s")

    try:
        result = train(config, splits, device=device, on_epoch_end=show_progress)
    finally:
        bar.close()
    # Train accuracy as the notebook reported it: the final model, in eval mode, on the training split.
    _, train_accuracy = nll_and_accuracy(result.model, splits.train_images, splits.train_labels)
    test_images = normalize(dataset.test_images, splits.mean, splits.std)
    _, test_accuracy = nll_and_accuracy(result.model, test_images, dataset.test_labels)
    seconds = time.perf_counter() - started

    early = " (stopped early)" if result.stopped_early else ""
    print(f"\nbest epoch {result.best_epoch} of {result.epochs_run}{early}, {result.seconds:.0f} s of training",
          file=out)
    print(f"train accuracy      {train_accuracy:6.2%}", file=out)
    views = {"flip": "the mirror image", "flip-translate": "the mirror image and one-pixel shifts"}
    averaged = f"   (averaged over {views[result.tta]}: it paid on validation)" if result.flip_averaged else ""
    print(f"validation accuracy {result.best_val_accuracy:6.2%}{averaged}", file=out)
    print(f"test accuracy       {test_accuracy:6.2%}   (the notebook: {NOTEBOOK_TEST_ACCURACY:.2%})", file=out)
    if args.json:
        print(json.dumps({
            "train_accuracy": train_accuracy,
            "val_accuracy": result.best_val_accuracy,
            "test_accuracy": test_accuracy,
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "flip_averaged": result.flip_averaged,
            "tta": result.tta,
            "tta_val_accuracy": result.tta_val_accuracy,
            "seconds": round(seconds, 2),
            "train_seconds": round(result.seconds, 2),
            "device": str(device),
            "recipe": recipe.name if recipe else None,
            "config": config.to_dict(),
            "history": [asdict(m) for m in result.history],
        }))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from pipeline.training.checkpoints import check_checkpoint_dir
    from pipeline.training.device import available_cpus, pick_device
    from pipeline.search.session import Session
    from pipeline.search.study import check_study_matches
    from pipeline.search.study_file import load_study
    from pipeline.stores import check_tracking_store, heartbeat_seconds, opened_storage, redact, storage_url
    from pipeline.tracking.runs import session_tracker

    settings = parse_overrides(args.overrides)
    # A bad file or setting fails here, before any worker.
    spec = load_study(args.study).with_settings(settings).with_seed(args.seed)
    if args.workers < 1:
        raise ConfigError(f"--workers (WORKERS) must be at least 1, got {args.workers}")
    if args.workers > available_cpus():  # each worker needs a core for itself, GPU or not
        raise ConfigError(f"--workers (WORKERS) {args.workers} is more than this machine's {available_cpus()} CPU "
                          f"cores; each worker process needs one. Fix: at most {available_cpus()}, and more "
                          f"machines on a shared storage beyond that (docs/scaling-out.md)")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials (TRIALS) must be at least 1, got {args.trials}")
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ConfigError(f"--timeout (TIMEOUT) must be a positive number of seconds, got {args.timeout:g}")
    # What would fail in every worker, or after the study and its MLflow run exist, fails here, in one line.
    pick_device(args.device)
    check_checkpoint_dir()
    heartbeat_seconds()
    if args.tracking:
        check_tracking_store()
    session = Session(
        spec=spec, storage=storage_url(args.storage),
        target_trials=args.trials if args.trials is not None else spec.trials,
        timeout=args.timeout if args.timeout is not None else spec.timeout,
        workers=args.workers, device=args.device, final_phase=args.final_phase,
        **({} if args.session_seed is None else {"session_seed": check_session_seed(args.session_seed)}),
    )
    budget = f"{session.timeout:.0f} s" if session.timeout else "no time limit"
    changed = f", settings {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else ""
    print(f"Study {spec.name} ({spec.path.name}{changed}) in {redact(session.storage)}: up to "
          f"{session.target_trials} finished trials, {budget}, {session.workers} worker(s), "
          f"session seed {session.session_seed}", flush=True)
    # A wrong URL or password, or a study of that name training another model family: one line, before any
    # MLflow run exists.
    with opened_storage(session.storage) as storage:
        check_study_matches(spec, storage)
    return run_and_report(session, session_tracker(session, enabled=args.tracking), as_json=args.json,
                          interrupted=f"finished trials are kept in {redact(session.storage)}; run the same "
                                      f"command again to continue study {spec.name}")


def run_and_report(session, tracker, *, as_json: bool, interrupted: str) -> int:
    """Run a tuning or baseline session, then print its summary (and as JSON); Ctrl-C is one line
    saying what is kept, exit code 130."""
    from pipeline.search.session import run_session
    from pipeline.search.summary import format_summary

    try:
        summary = run_session(session, tracker)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted}", file=sys.stderr)
        return 130
    print("\n" + format_summary(summary))
    if as_json:
        print(json.dumps(summary))
    return 0


def check_session_seed(seed: int) -> int:
    if not 0 <= seed < 2 ** 32:
        raise ConfigError(f"--session-seed must be an integer from 0 to {2 ** 32 - 1}, got {seed}")
    return seed


def run_baseline(args: argparse.Namespace) -> int:
    from pipeline.training.checkpoints import check_checkpoint_dir
    from pipeline.search.baseline import baseline_spec, describe_plan, plan_baseline, queue_baseline
    from pipeline.search.session import Session
    from pipeline.search.study import prepare_study, quiet_optuna
    from pipeline.search.study_file import load_study
    from pipeline.search.summary import count_complete_or_pruned
    from pipeline.stores import check_tracking_store, opened_storage, storage_url
    from pipeline.tracking.runs import session_tracker

    for flag, value in (("--seconds", args.seconds), ("--max-epochs", args.max_epochs)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag} must be positive, got {value:g}")
    check_checkpoint_dir()
    quiet_optuna()
    spec = load_study(args.study).with_settings(parse_overrides(args.overrides)).with_seed(args.seed)
    storage = storage_url(args.storage)
    with opened_storage(storage, must_exist=True) as opened:  # the study's pace is read there, whatever the time
        plan = plan_baseline(spec, opened, seconds=args.seconds, max_epochs=args.max_epochs)
        if args.tracking:
            check_tracking_store()
        baseline = baseline_spec(spec, plan)
        print(describe_plan(spec, plan), flush=True)
        study = prepare_study(baseline, opened)
        queue_baseline(baseline, study)
        target = count_complete_or_pruned(study) + 1
    session = Session(spec=baseline, storage=storage, target_trials=target,
                      timeout=None, device=args.device, final_phase=False, promote=False)
    return run_and_report(session, session_tracker(session, enabled=args.tracking), as_json=args.json,
                          interrupted=f"run the same command again to train the baseline of {spec.name}")


def run_evaluate_best(args: argparse.Namespace) -> int:
    from pipeline.training.device import keep_freed_memory
    from pipeline.reports.evaluate import evaluate_registered, format_report
    from pipeline.paths import REPORTS_DIR
    from pipeline.stores import configure_mlflow

    keep_freed_memory()  # the sweep predicts the test split again and again at batch 2,048
    configure_mlflow()
    alias = None if args.version is not None else args.alias
    result = evaluate_registered(args.model, alias=alias, version=args.version, prune_sweep=args.prune_sweep,
                                 reports_dir=reports_folder(args.reports_dir or REPORTS_DIR))
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.reports.compare import (
        as_dict,
        compare,
        format_groups,
        format_table,
        group_records,
        log_comparison,
        pick_references,
        time_to_reference,
    )
    from pipeline.reports.compare_page import write_page
    from pipeline.paths import REPORTS_DIR
    from pipeline.search.study import quiet_optuna
    from pipeline.stores import configure_mlflow, opened_storage, storage_url

    quiet_optuna()
    reports = reports_folder(args.reports_dir or REPORTS_DIR)
    with opened_storage(storage_url(args.storage), must_exist=True) as storage:
        records = compare(storage, args.studies, args.rungs)
    references = pick_references(records, args.reference)
    time_to_reference(records, references)
    groups = group_records(records)
    print(format_table(records, references))
    print("\n" + format_groups(groups, references))
    page = write_page(records, groups, references, reports)
    print(f"\nfigures and tables: {page}")
    if args.tracking:
        configure_mlflow()
        print(f"MLflow run: {log_comparison(records, groups, page)} (experiment `compare`)")
    if args.json:
        print(json.dumps({"studies": [as_dict(r) for r in records], "groups": [asdict(g) for g in groups],
                          "references": {family: asdict(r) for family, r in references.items()}}))
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard, served from this process: the storage URL (and its password) stays off the
    command line that `ps` shows, and a wrong URL or password is one line before the server starts."""
    from optuna_dashboard import run_server

    from pipeline.search.study import quiet_optuna
    from pipeline.stores import open_storage, redact, storage_url

    check_exposure(args.host, args.expose_without_login, what="optuna-dashboard", port=args.port,
                   exposes="reads every study and can change or delete it")
    quiet_optuna()
    storage = storage_url(args.storage)
    opened = open_storage(storage, must_exist=True)
    require_free_port(args.host, args.port, what="optuna-dashboard", variable=args.port_variable)
    print(f"optuna-dashboard for {redact(storage)} on http://{args.host}:{args.port}", flush=True)
    try:
        run_server(opened, host=args.host, port=args.port)
    except KeyboardInterrupt:
        pass
    return 0


def run_ui(args: argparse.Namespace) -> int:
    """Replace this process with `mlflow server` on the local store; a tracking server is its own UI.
    The store's URI goes through the environment, not the command line `ps` shows."""
    import os

    from pipeline.paths import MLRUNS_DIR
    from pipeline.services import MLFLOW_SERVER_ENV
    from pipeline.stores import is_server, redact, tracking_uri

    uri = tracking_uri()
    if is_server(uri):
        print(f"MLFLOW_TRACKING_URI is a tracking server, which serves the MLflow UI itself: open {redact(uri)}")
        return 0
    check_exposure(args.host, args.expose_without_login, what="the MLflow UI", port=args.port,
                   exposes="reads, changes and deletes every run and model, and can move @champion")
    require_free_port(args.host, args.port, what="the MLflow UI", variable=args.port_variable)
    print(f"MLflow UI for {redact(uri)} on http://{args.host}:{args.port}", flush=True)
    os.environ["MLFLOW_BACKEND_STORE_URI"] = uri
    os.environ.update(MLFLOW_SERVER_ENV)
    mlflow = Path(sys.executable).parent / "mlflow"
    os.execv(mlflow, [str(mlflow), "server",
                      "--default-artifact-root", str(MLRUNS_DIR / "artifacts"),  # for experiments made in the UI
                      "--host", args.host, "--port", str(args.port)])


def run_serve(args: argparse.Namespace) -> int:
    """Replace this process with MLflow's scoring server for the model, after checking it exists."""
    import os

    from pipeline.tracking.registry import resolve_version
    from pipeline.stores import configure_mlflow, redact

    check_exposure(args.host, args.expose_without_login, what="the scoring server", port=args.port,
                   exposes="sends it images to classify, as many as they like")
    uri = configure_mlflow()
    version = resolve_version(args.model, alias=args.alias, version=None, others="--alias NAME")  # one line if missing
    require_free_port(args.host, args.port, what="the scoring server", variable=args.port_variable)
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the server resolves models:/ itself
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # it starts `uvicorn` by name
    print(f"serving {args.model} version {version.version} (@{args.alias}) from {redact(uri)} on "
          f"http://{args.host}:{args.port}/invocations", flush=True)
    mlflow = bin_dir / "mlflow"
    os.execv(mlflow, [str(mlflow), "models", "serve", "-m", f"models:/{args.model}@{args.alias}",
                      "--env-manager", "local", "--host", args.host, "--port", str(args.port)])


def run_services(args: argparse.Namespace) -> int:
    from pipeline.services import MLFLOW_ADMIN, Services, services_dir
    from pipeline.services.addresses import EVERY_ADDRESS, LOOPBACK, machine_addresses

    services = Services(services_dir())
    if args.action == "stop":
        services.stop()
        print(f"stopped the services in {services.root}")
        return 0
    if args.action == "status":
        print("\n".join(services.status()))
        return 0
    state = services.start(host=args.host, pg_port=args.pg_port, mlflow_port=args.mlflow_port)
    host, url_file, password_file = state["host"], services.storage_url_file, services.mlflow_password_file
    where = "" if host in LOOPBACK else f", on this machine or another on {', '.join(state['logins_from'])}"
    if host in EVERY_ADDRESS:
        where = " on this machine"
    print("\n".join(services.status()))
    print(f"Artifacts are proxied by the server into {services.artifacts}.\n"
          f"Paste into every shell that runs make tune, evaluate-best, compare, serve, dashboard or ui{where} (the "
          f"storage URL holds the database password and the server asks for a login, so the passwords are read "
          f"from files readable by you only):\n"
          f'  export OPTUNA_STORAGE="$(cat {url_file})"\n'
          f"  export MLFLOW_TRACKING_URI={services.tracking_uri(state)}\n"
          f"  export MLFLOW_TRACKING_USERNAME={MLFLOW_ADMIN}\n"
          f'  export MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"')
    if host in EVERY_ADDRESS:
        print(f"On other machines: the same lines with one of this machine's addresses in place of 127.0.0.1 "
              f"({', '.join(a for a in machine_addresses() if a not in LOOPBACK) or 'none found'}); "
              f"`--host <address>` prints them ready to paste. PostgreSQL takes password logins from anywhere: "
              f"firewall it.")
    elif host not in LOOPBACK:
        print(f'Where this folder is not shared, read the files over ssh: OPTUNA_STORAGE="$(ssh {host} cat '
              f'{url_file})", MLFLOW_TRACKING_PASSWORD="$(ssh {host} cat {password_file})". Nothing is encrypted '
              f"(plain HTTP and PostgreSQL without TLS), so keep that network private.")
    print("make services-status says what runs; make services-stop stops both.")
    return 0
