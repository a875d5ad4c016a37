"""The command line: `python -m pipeline <command> --help`. This module parses; commands.py does.

Every error a user can fix is a PipelineError and is printed as one `error:` line (exit 1; a bad
command-line value, exit 2). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import commands
from pipeline.training.config import ConfigError
from pipeline.errors import PipelineError
from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL  # cheap: MLflow is imported only where used

# Defaults named once: the Makefile passes a variable on only when it is set.
DEFAULT_STUDY = "mlp"
DASHBOARD_PORT, UI_PORT, SERVE_PORT = 8080, 5000, 5001


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        parser.exit(2, f"error: {error}\n")
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    from pipeline.services import DEFAULT_MLFLOW_PORT, DEFAULT_PG_PORT  # standard library only: cheap to import

    parser = argparse.ArgumentParser(prog="python -m pipeline", description="Fashion-MNIST tuning pipeline: "
                                     "`python -m pipeline <command> --help` for each command.")
    command = parser.add_subparsers(required=True, metavar="command").add_parser

    data = command("data", help="make Fashion-MNIST available (apt, dpkg -x or download) and verify it")
    data.set_defaults(handler=commands.run_data)

    train = command("train", help="train one configuration; report train, validation and test accuracy",
                    description="Train one configuration with the shared trainer and report train, validation and "
                                "test accuracy as the notebook did. Any config field can be set: --set lr=0.003; "
                                "--recipe starts from a named configuration, which --set then changes.")
    train.add_argument("--recipe", metavar="NAME_OR_PATH",
                       help="start from a recipe: recipes/<name>.toml or a path, e.g. fast-cnn (default: the "
                            "config's defaults, the notebook's MLP)")
    train.add_argument("--model", choices=["mlp", "cnn"], help="model family (default: mlp)")
    train.add_argument("--epochs", type=int, help="number of epochs (default: 20)")
    add_settings_option(train, "set any config field, e.g. --set batch_size=64 --set hidden_sizes=256,128")
    add_device_option(train, "auto (GPU when there is one), cpu, cuda, cuda:1")
    add_json_option(train, "print one JSON object on the last line of stdout (progress goes to stderr)")
    train.set_defaults(handler=commands.run_train)

    tune = command("tune", help="run or resume an Optuna study from studies/<name>.toml",
                   description="Run or resume a study until it has --trials finished (complete or pruned) trials "
                               "or --timeout seconds pass. Ctrl-C stops within seconds; run it again to continue.")
    tune.add_argument("--study", default=DEFAULT_STUDY,
                      help=f"a study name (studies/<name>.toml) or a path (default: {DEFAULT_STUDY})")
    tune.add_argument("--trials", type=int, help="finished trials the study should reach (default: the study file's)")
    tune.add_argument("--timeout", type=float, help="seconds for this session (default: the study file's)")
    tune.add_argument("--workers", type=int, default=1, help="worker processes on the same study (default: 1)")
    add_seed_option(tune)
    tune.add_argument("--session-seed", type=int, metavar="N",
                      help="this session's own seed (recorded on its MLflow run and on each trial as session_seed); "
                           "given again, with one worker on the study as it was then, a session draws the same "
                           "configurations; default: a new one each session, so that sessions sharing a study draw "
                           "different ones")
    tune.add_argument("--no-final", dest="final_phase", action="store_false",
                      help="skip the study file's final phase (the best configuration retrained for longer)")
    add_storage_option(tune)
    add_settings_option(tune, "change one of the study's fixed settings for this run, e.g. --set epochs=2 "
                              "(the smoke run and the tests shrink the shipped studies this way)")
    add_device_option(tune, "auto, cpu, cuda; with several GPUs, one worker per GPU")
    add_tracking_option(tune, "no MLflow runs, models or promotion (Optuna storage only)")
    add_json_option(tune, "print the summary as one JSON object on the last line")
    tune.set_defaults(handler=commands.run_tune)

    baseline = command("baseline", help="the study's default configuration trained for the study's time",
                       description="Train the study's default configuration (its recipe's, or its first "
                                   "[[enqueue]]) once, for the epochs that fit the study's busy wall time at its "
                                   "own pace (capped by the study's final.max_epochs), as study <name>-baseline: "
                                   "what `make compare` measures the search against. Never promoted.")
    baseline.add_argument("--study", default=DEFAULT_STUDY,
                          help=f"a study name (studies/<name>.toml) or a path (default: {DEFAULT_STUDY})")
    add_seed_option(baseline)
    baseline.add_argument("--seconds", type=float, help="the time to fit (default: the study's busy wall time)")
    baseline.add_argument("--max-epochs", type=int, help="at most this many epochs (default: final.max_epochs)")
    add_storage_option(baseline)
    add_settings_option(baseline, "change one of the study's fixed settings, as on tune (the tests shrink it so)")
    add_device_option(baseline, "auto, cpu, cuda")
    add_tracking_option(baseline, "no MLflow runs")
    add_json_option(baseline, "print the summary as one JSON object on the last line")
    baseline.set_defaults(handler=commands.run_baseline)

    best = command("evaluate-best", help="evaluate a registered model (the champion) on the test set",
                   description="Load a registered model from MLflow as an outside client would and evaluate it on "
                               "the 10,000 test images: terminal report, reports/<model>-v<version>/report.html, "
                               "metrics.json, and an MLflow evaluation run.")
    add_model_options(best, version=True)
    best.add_argument("--prune-sweep", action="store_true",
                      help="also report test accuracy with 0-90 %% of the weights pruned by global magnitude")
    best.add_argument("--reports-dir", type=Path, help="where <model>-v<version>/ goes (default: reports/)")
    add_json_option(best, "print the result as one JSON object on the last line")
    best.set_defaults(handler=commands.run_evaluate_best)

    compare = command("compare", help="studies side by side: best accuracy for the time and epochs spent",
                      description="A table of the studies (sampler, pruner, best validation accuracy and its lead "
                                  "over the default configuration, trials by state, epochs against unpruned, busy "
                                  "wall time, time to within 0.2 points of the best and of the reference, rank "
                                  "correlation at the pruning rungs), one of the groups (seeds of one search: median "
                                  "and spread; baselines), reports/compare.html (the tables, best-so-far against "
                                  "wall time and epochs, the spread of accuracies), and a run in the MLflow "
                                  "experiment `compare`.")
    compare.add_argument("studies", nargs="*", help="study names (default: every study in the storage)")
    add_storage_option(compare)
    compare.add_argument("--reports-dir", type=Path, help="where compare.html goes (default: reports/)")
    compare.add_argument("--rungs", type=epoch_list, metavar="E1,E2",
                         help="rank correlations at these epochs instead of each study's pruning rungs, e.g. 3,9 "
                              "on an unpruned study: where would rungs predict the end?")
    compare.add_argument("--reference", metavar="GROUP",
                         help="the group whose median best, less 0.2 points, each study is timed to (default: "
                              "each model family's random-search group)")
    add_tracking_option(compare, "no MLflow run")
    add_json_option(compare, "print the records as one JSON object on the last line")
    compare.set_defaults(handler=commands.run_compare)

    dashboard = command("dashboard", help="optuna-dashboard on the study storage, on 127.0.0.1")
    add_storage_option(dashboard)
    add_address_options(dashboard, port=DASHBOARD_PORT, variable="DASHBOARD_PORT")
    dashboard.set_defaults(handler=commands.run_dashboard)

    ui = command("ui", help="the MLflow UI on the tracking store, on 127.0.0.1",
                 description="Serve the MLflow UI on the local tracking store ($MLFLOW_TRACKING_URI or sqlite under "
                             "mlruns/). When $MLFLOW_TRACKING_URI is a tracking server, that server already is the "
                             "UI: its address is printed.")
    add_address_options(ui, port=UI_PORT, variable="UI_PORT")
    ui.set_defaults(handler=commands.run_ui)

    serve = command("serve", help="the champion behind MLflow's scoring server, on 127.0.0.1",
                    description="Serve a registered model (the champion) with `mlflow models serve` in this "
                                "environment: POST raw pixels 0-255 as {\"inputs\": [[[28 floats] x 28] x N]} to "
                                "/invocations, get {\"predictions\": [[10 probabilities] x N]} back.")
    add_model_options(serve, version=False)
    add_address_options(serve, port=SERVE_PORT, variable="SERVE_PORT")
    serve.set_defaults(handler=commands.run_serve)

    services = command("services", help="start, stop or check a local PostgreSQL + MLflow tracking server "
                                        "(make services)",
                       description="A throwaway PostgreSQL cluster (databases optuna, mlflow, mlflow_auth) and an `mlflow "
                                   "server` on it with proxied artifacts, under $SERVICES_DIR (default .services/). "
                                   "The server asks for a login (user admin, a generated password). `start` prints the "
                                   "exports that point `make tune`, `make evaluate-best` and the UIs at them.")
    services.add_argument("action", choices=["start", "stop", "status"])
    services.add_argument("--host", default="127.0.0.1",
                          help="address both bind to (default: 127.0.0.1). Another address of this machine lets "
                               "the machines of its network in (password logins to PostgreSQL); 0.0.0.0 every "
                               "address and every network (firewall it)")
    services.add_argument("--pg-port", type=port_number,
                          help=f"PostgreSQL's port (default: {DEFAULT_PG_PORT}, else a free one)")
    services.add_argument("--mlflow-port", type=port_number,
                          help=f"the tracking server's port (default: {DEFAULT_MLFLOW_PORT}, else a free one)")
    services.set_defaults(handler=commands.run_services)
    return parser


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, help="the sampler's seed; another than the study file's makes the "
                                                 "study <name>-seed<N> (make: SEED=n)")


def add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage", help="Optuna storage URL (default: $OPTUNA_STORAGE, else sqlite under studies/)")


def add_settings_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_device_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--device", default="auto", help=help)


def add_json_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def add_tracking_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--no-tracking", dest="tracking", action="store_false", help=help)


def add_model_options(parser: argparse.ArgumentParser, *, version: bool) -> None:
    parser.add_argument("--model", default=REGISTERED_MODEL, help=f"registered model name (default: {REGISTERED_MODEL})")
    which = parser.add_mutually_exclusive_group() if version else parser
    which.add_argument("--alias", default=CHAMPION, help=f"registry alias (default: {CHAMPION})")
    if version:
        which.add_argument("--version", type=int, help="a version number instead of an alias")


def add_address_options(parser: argparse.ArgumentParser, *, port: int, variable: str) -> None:
    """--host and --port of a server; ``variable`` is the make variable that moves the port (errors name it)."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only; "
                                                             "another needs --expose-without-login)")
    parser.add_argument("--port", type=port_number, default=port, help=f"port (default: {port}; make: {variable})")
    parser.add_argument("--expose-without-login", action="store_true",
                        help="allow a --host other than loopback: the server has no login, so anyone who reaches "
                             "that address uses it (refused without this flag)")
    parser.set_defaults(port_variable=variable)


def epoch_list(text: str) -> list[int]:
    try:
        epochs = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected epochs separated by commas, e.g. 3,9") from None
    if epochs[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: epochs count from 1")
    return epochs


def port_number(text: str) -> int:
    """A TCP port, 1-65535 (argparse reports anything else as a bad value of the option)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


if __name__ == "__main__":
    sys.exit(main())
