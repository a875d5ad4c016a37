"""The command line: `python -m pipeline <command> --help`. The only place that wires the parts."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from pipeline.config import NOTEBOOK_TEST_ACCURACY, ConfigError, TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the known failures below get one line, anything else a traceback
        from pipeline.data import DatasetError
        from pipeline.registry import RegistryError
        from pipeline.search import WorkerFailed
        from pipeline.services import ServicesError
        from pipeline.stores import StorageError, TrackingServerError
        from pipeline.study_file import StudyFileError
        from pipeline.train import NonFiniteLossError

        known = (DatasetError, NonFiniteLossError, StudyFileError, RegistryError, TrackingServerError, StorageError,
                 ServicesError, WorkerFailed)
        if isinstance(error, known):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
    from pipeline.services import DEFAULT_MLFLOW_PORT, DEFAULT_PG_PORT  # standard library only: cheap to import

    commands = parser.add_subparsers(required=True, metavar="command")

    data = commands.add_parser("data", help="make Fashion-MNIST available (apt, dpkg -x or download) and verify it")
    data.set_defaults(handler=run_data)

    train = commands.add_parser(
        "train", help="train one configuration; report train, validation and test accuracy",
        description="Train one configuration with the shared trainer and report train, validation and "
                    "test accuracy as the notebook did. Any config field can be set: --set lr=0.003.")
    train.add_argument("--model", choices=["mlp", "cnn"], help="model family (default: mlp)")
    train.add_argument("--epochs", type=int, help="number of epochs (default: 20)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="set any config field, e.g. --set batch_size=64 --set hidden_sizes=256,128")
    train.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1")
    train.add_argument("--json", action="store_true",
                       help="print one JSON object on the last line of stdout (progress goes to stderr)")
    train.set_defaults(handler=run_train)

    tune = commands.add_parser(
        "tune", help="run or resume an Optuna study from studies/<name>.toml",
        description="Run or resume a study until it has --trials finished (complete or pruned) trials or "
                    "--timeout seconds pass. Ctrl-C stops within seconds; run it again to continue.")
    tune.add_argument("--study", default="mlp", help="a study name (studies/<name>.toml) or a path (default: mlp)")
    tune.add_argument("--trials", type=int, help="finished trials the study should reach (default: the study file's)")
    tune.add_argument("--timeout", type=float, help="seconds for this session (default: the study file's)")
    tune.add_argument("--workers", type=int, default=1, help="worker processes on the same study (default: 1)")
    tune.add_argument("--no-final", dest="final_phase", action="store_false",
                      help="skip the study file's final phase (the best configuration retrained for longer)")
    add_storage_option(tune)
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="change one of the study's fixed settings for this run, e.g. --set epochs=2 "
                           "(the smoke run and the tests shrink the shipped studies this way)")
    tune.add_argument("--device", default="auto", help="auto, cpu, cuda; with several GPUs, one worker per GPU")
    tune.add_argument("--no-tracking", dest="tracking", action="store_false",
                      help="no MLflow runs, models or promotion (Optuna storage only)")
    tune.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    tune.set_defaults(handler=run_tune)

    best = commands.add_parser(
        "evaluate-best", help="evaluate a registered model (the champion) on the test set",
        description="Load a registered model from MLflow as an outside client would and evaluate it on the "
                    "10,000 test images: terminal report, reports/<model>-v<version>/report.html, metrics.json, "
                    "and an MLflow evaluation run.")
    best.add_argument("--model", default="fashion-mnist-classifier", help="registered model name")
    which = best.add_mutually_exclusive_group()
    which.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    which.add_argument("--version", type=int, help="a version number instead of an alias")
    best.add_argument("--prune-sweep", action="store_true",
                      help="also report test accuracy with 0-90 %% of the weights pruned by global magnitude")
    best.add_argument("--reports-dir", type=Path, help="where <model>-v<version>/ goes (default: reports/)")
    best.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    best.set_defaults(handler=run_evaluate_best)

    compare = commands.add_parser(
        "compare", help="studies side by side: best accuracy for the time and epochs spent",
        description="A table of the studies (model family, sampler, pruner, best validation accuracy, trials by "
                    "state, epochs against unpruned, busy wall time, time to within 0.2 points of the best), "
                    "reports/compare.html (best-so-far against wall time and epochs; the spread of accuracies), "
                    "and a run in the MLflow experiment `compare`.")
    compare.add_argument("studies", nargs="*", help="study names (default: every study in the storage)")
    add_storage_option(compare)
    compare.add_argument("--reports-dir", type=Path, help="where compare.html goes (default: reports/)")
    compare.add_argument("--no-tracking", dest="tracking", action="store_false", help="no MLflow run")
    compare.add_argument("--json", action="store_true", help="print the records as one JSON object on the last line")
    compare.set_defaults(handler=run_compare)

    dashboard = commands.add_parser("dashboard", help="optuna-dashboard on the study storage, on 127.0.0.1")
    add_storage_option(dashboard)
    add_address_options(dashboard, port=8080)
    dashboard.set_defaults(handler=run_dashboard)

    ui = commands.add_parser("ui", help="the MLflow UI on the tracking store, on 127.0.0.1",
                             description="Serve the MLflow UI on the local tracking store ($MLFLOW_TRACKING_URI "
                                         "or sqlite under mlruns/). When $MLFLOW_TRACKING_URI is a tracking "
                                         "server, that server already is the UI: its address is printed.")
    add_address_options(ui, port=5000)
    ui.set_defaults(handler=run_ui)

    serve = commands.add_parser(
        "serve", help="the champion behind MLflow's scoring server, on 127.0.0.1",
        description="Serve a registered model (the champion) with `mlflow models serve` in this environment: "
                    "POST raw pixels 0-255 as {\"inputs\": [[[28 floats] x 28] x N]} to /invocations, get "
                    "{\"predictions\": [[10 probabilities] x N]} back.")
    serve.add_argument("--model", default="fashion-mnist-classifier", help="registered model name")
    serve.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    add_address_options(serve, port=5001)
    serve.set_defaults(handler=run_serve)

    services = commands.add_parser(
        "services", help="start, stop or check a local PostgreSQL + MLflow tracking server (make services)",
        description="A throwaway PostgreSQL cluster (databases optuna and mlflow) and an `mlflow server` on it "
                    "with proxied artifacts, under $SERVICES_DIR (default .services/). `start` prints the "
                    "two exports that point `make tune`, `make evaluate-best` and the UIs at them.")
    services.add_argument("action", choices=["start", "stop", "status"])
    services.add_argument("--host", default="127.0.0.1",
                          help="address both bind to (default: 127.0.0.1; 0.0.0.0 lets other machines in)")
    services.add_argument("--pg-port", type=int,
                          help=f"PostgreSQL's port (default: {DEFAULT_PG_PORT}, else a free one)")
    services.add_argument("--mlflow-port", type=int,
                          help=f"the tracking server's port (default: {DEFAULT_MLFLOW_PORT}, else a free one)")
    services.set_defaults(handler=run_services)
    return parser


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, else sqlite under studies/)")


def add_address_options(parser: argparse.ArgumentParser, *, port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=port, help=f"port (default: {port})")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def run_data(args: argparse.Namespace) -> int:
    from pipeline.fetch import ensure_dataset

    dataset = ensure_dataset()
    print(f"Fashion-MNIST ready in {dataset.source}: {len(dataset.train_labels)} train / "
          f"{len(dataset.test_labels)} test images, checksum {dataset.checksum[:12]}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.overrides)
    if args.model:
        overrides["model"] = args.model
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    config = TrainConfig().replace(**overrides)  # a bad key fails here, before any slow import

    from pipeline.data import load_fashion_mnist, make_splits, normalize
    from pipeline.device import configure_cpu_threads, pick_device
    from pipeline.models import build_model, count_parameters
    from pipeline.progress import epoch_bar
    from pipeline.train import nll_and_accuracy, train

    out = sys.stderr if args.json else sys.stdout
    started = time.perf_counter()
    device = pick_device(args.device)
    configure_cpu_threads()
    dataset = load_fashion_mnist()
    splits = make_splits(dataset, val_size=config.val_size, train_subset=config.train_subset).to(device)
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
    mirrored = "   (averaged with the mirror image: it paid on validation)" if result.flip_averaged else ""
    print(f"validation accuracy {result.best_val_accuracy:6.2%}{mirrored}", file=out)
    print(f"test accuracy       {test_accuracy:6.2%}   (the notebook: {NOTEBOOK_TEST_ACCURACY:.2%})", file=out)
    if args.json:
        print(json.dumps({
            "train_accuracy": train_accuracy,
            "val_accuracy": result.best_val_accuracy,
            "test_accuracy": test_accuracy,
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "flip_averaged": result.flip_averaged,
            "seconds": round(seconds, 2),
            "train_seconds": round(result.seconds, 2),
            "device": str(device),
            "config": config.to_dict(),
            "history": [asdict(m) for m in result.history],
        }))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from pipeline.search import Session, format_summary, run_session
    from pipeline.stores import open_storage, redact, storage_url
    from pipeline.study_file import load_study
    from pipeline.tracking import session_tracker

    settings = parse_overrides(args.overrides)
    spec = load_study(args.study).with_settings(settings)  # a bad file or setting fails here, before any worker
    if args.workers < 1:
        raise ConfigError(f"--workers (WORKERS) must be at least 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise ConfigError(f"--trials (TRIALS) must be at least 1, got {args.trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise ConfigError(f"--timeout (TIMEOUT) must be a positive number of seconds, got {args.timeout:g}")
    session = Session(
        study_file=str(spec.path), storage=storage_url(args.storage),
        target_trials=args.trials if args.trials is not None else spec.trials, timeout=args.timeout if args.timeout is not None else spec.timeout,
        workers=args.workers, device=args.device, settings=tuple(settings.items()), final_phase=args.final_phase,
    )
    budget = f"{session.timeout:.0f} s" if session.timeout else "no time limit"
    changed = f", settings {', '.join(f'{k}={v}' for k, v in settings.items())}" if settings else ""
    print(f"Study {spec.name} ({spec.path.name}{changed}) in {redact(session.storage)}: up to "
          f"{session.target_trials} finished trials, {budget}, {session.workers} worker(s)", flush=True)
    open_storage(session.storage)  # a wrong URL or password is one line here, before any MLflow run exists
    tracker = session_tracker(spec, session.storage, enabled=args.tracking)
    try:
        summary = run_session(session, tracker)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are kept in {redact(session.storage)}; "
              f"run the same command again to continue study {spec.name}", file=sys.stderr)
        return 130
    print("\n" + format_summary(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def run_evaluate_best(args: argparse.Namespace) -> int:
    from pipeline.evaluate import evaluate_registered, format_report
    from pipeline.paths import REPORTS_DIR
    from pipeline.stores import configure_mlflow

    configure_mlflow()
    alias = None if args.version is not None else args.alias
    result = evaluate_registered(args.model, alias=alias, version=args.version, prune_sweep=args.prune_sweep,
                                 reports_dir=args.reports_dir or REPORTS_DIR)
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from pipeline.compare import as_dict, compare, format_table, log_comparison, write_page
    from pipeline.paths import REPORTS_DIR
    from pipeline.search import quiet_optuna
    from pipeline.stores import configure_mlflow, open_storage, storage_url

    quiet_optuna()
    records = compare(open_storage(storage_url(args.storage)), args.studies)
    print(format_table(records))
    page = write_page(records, args.reports_dir or REPORTS_DIR)
    print(f"\nfigures: {page}")
    if args.tracking:
        configure_mlflow()
        print(f"MLflow run: {log_comparison(records, page)} (experiment `compare`)")
    if args.json:
        print(json.dumps({"studies": [as_dict(r) for r in records]}))
    return 0


def run_dashboard(args: argparse.Namespace) -> int:
    """optuna-dashboard, served from this process: the storage URL (and its password) stays off the
    command line that `ps` shows, and a wrong URL or password is one line before the server starts."""
    from optuna_dashboard import run_server

    from pipeline.search import quiet_optuna
    from pipeline.stores import open_storage, redact, storage_url

    quiet_optuna()
    storage = storage_url(args.storage)
    opened = open_storage(storage)
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

    from pipeline.registry import resolve_version
    from pipeline.stores import configure_mlflow, redact

    uri = configure_mlflow()
    version = resolve_version(args.model, alias=args.alias, version=None)  # one clear line if it is missing
    os.environ["MLFLOW_TRACKING_URI"] = uri  # the server resolves models:/ itself
    bin_dir = Path(sys.executable).parent
    os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"  # it starts `uvicorn` by name
    print(f"serving {args.model} version {version.version} (@{args.alias}) from {redact(uri)} on "
          f"http://{args.host}:{args.port}/invocations", flush=True)
    mlflow = bin_dir / "mlflow"
    os.execv(mlflow, [str(mlflow), "models", "serve", "-m", f"models:/{args.model}@{args.alias}",
                      "--env-manager", "local", "--host", args.host, "--port", str(args.port)])


def run_services(args: argparse.Namespace) -> int:
    from pipeline.services import Services, services_dir

    services = Services(services_dir())
    if args.action == "stop":
        services.stop()
        print(f"stopped the services in {services.root}")
        return 0
    if args.action == "status":
        print("\n".join(services.status()))
        return 0
    state = services.start(host=args.host, pg_port=args.pg_port, mlflow_port=args.mlflow_port)
    print("\n".join(services.status()))
    print(f"Artifacts are proxied by the server into {services.root / 'mlflow-artifacts'}.\n"
          f"Paste into every shell that runs make tune, evaluate-best, dashboard or ui (the storage URL holds the "
          f"database password, so it is read from a file readable by you only):\n"
          f'  export OPTUNA_STORAGE="$(cat {services.storage_url_file})"\n'
          f"  export MLFLOW_TRACKING_URI={services.tracking_uri(state)}\n"
          f"make services-status says what runs; make services-stop stops both.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
