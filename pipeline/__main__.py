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
        from pipeline.evaluate import RegistryError
        from pipeline.study_file import StudyFileError
        from pipeline.tracking import TrackingServerError
        from pipeline.train import NonFiniteLossError

        known = (DatasetError, NonFiniteLossError, StudyFileError, RegistryError, TrackingServerError)
        if isinstance(error, known):
            print(f"error: {error}", file=sys.stderr)
            return 1
        raise


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__)
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
    tune.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, else sqlite under studies/)")
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
    return parser


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
    from pipeline.train import evaluate, train

    out = sys.stderr if args.json else sys.stdout
    started = time.perf_counter()
    device = pick_device(args.device)
    configure_cpu_threads()
    dataset = load_fashion_mnist()
    splits = make_splits(dataset, val_size=config.val_size, train_subset=config.train_subset).to(device)
    print(f"{config.model.upper()} with {count_parameters(build_model(config)):,} parameters on {device}; "
          f"{len(splits.train_labels):,} training / {len(splits.val_labels):,} validation images", file=out)

    def show_progress(epoch, m):
        print(f"epoch {epoch:3d}/{config.epochs}  train loss {m.train_loss:.4f} acc {m.train_accuracy:6.2%}  "
              f"val loss {m.val_loss:.4f} acc {m.val_accuracy:6.2%}  lr {m.lr:.2e}  {m.epoch_seconds:5.1f}s",
              file=out, flush=True)

    result = train(config, splits, device=device, on_epoch_end=show_progress)
    # Train accuracy as the notebook reported it: the final model, in eval mode, on the training split.
    _, train_accuracy = evaluate(result.model, splits.train_images, splits.train_labels)
    test_images = normalize(dataset.test_images, splits.mean, splits.std)
    _, test_accuracy = evaluate(result.model, test_images, dataset.test_labels)
    seconds = time.perf_counter() - started

    early = " (stopped early)" if result.stopped_early else ""
    print(f"\nbest epoch {result.best_epoch} of {result.epochs_run}{early}, {result.seconds:.0f} s of training",
          file=out)
    print(f"train accuracy      {train_accuracy:6.2%}", file=out)
    print(f"validation accuracy {result.best_val_accuracy:6.2%}", file=out)
    print(f"test accuracy       {test_accuracy:6.2%}   (the notebook: {NOTEBOOK_TEST_ACCURACY:.2%})", file=out)
    if args.json:
        print(json.dumps({
            "train_accuracy": train_accuracy,
            "val_accuracy": result.best_val_accuracy,
            "test_accuracy": test_accuracy,
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "seconds": round(seconds, 2),
            "train_seconds": round(result.seconds, 2),
            "device": str(device),
            "config": config.to_dict(),
            "history": [asdict(m) for m in result.history],
        }))
    return 0


def run_tune(args: argparse.Namespace) -> int:
    from pipeline.search import Session, format_summary, run_session, storage_url
    from pipeline.study_file import load_study

    spec = load_study(args.study)  # a bad study file fails here, before any worker starts
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    session = Session(
        study_file=str(spec.path), storage=storage_url(args.storage),
        trials=args.trials or spec.trials, timeout=args.timeout if args.timeout is not None else spec.timeout,
        workers=args.workers, device=args.device, tracking=args.tracking,
    )
    budget = f"{session.timeout:.0f} s" if session.timeout else "no time limit"
    print(f"Study {spec.name} ({spec.path.name}) in {session.storage}: up to {session.trials} finished trials, "
          f"{budget}, {session.workers} worker(s)", flush=True)
    try:
        summary = run_session(session)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished trials are kept in {session.storage}; "
              f"run the same command again to continue study {spec.name}", file=sys.stderr)
        return 130
    print("\n" + format_summary(summary))
    if args.json:
        print(json.dumps(summary))
    return 0


def run_evaluate_best(args: argparse.Namespace) -> int:
    from pipeline.evaluate import REPORTS_DIR, evaluate_registered, format_report
    from pipeline.tracking import configure_mlflow

    configure_mlflow()
    alias = None if args.version is not None else args.alias
    result = evaluate_registered(args.model, alias=alias, version=args.version, prune_sweep=args.prune_sweep,
                                 reports_dir=args.reports_dir or REPORTS_DIR)
    print(format_report(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
