"""The MLflow model registry: register a study's best model, promote it, find a version again.

A version's validation accuracy is its `val_accuracy` tag, written and read here only. Promotion
compares validation accuracies; the test split plays no part in it. Accuracies on different images
do not compare: two versions are compared only when they were validated on the same split of the
same data (the `dataset_checksum` and `validation_split` tags agree). Otherwise the one validated as
the shipped studies validate (the official Fashion-MNIST, the default 10,000-image split) wins, and
neither displaces the other when both or neither are. A registry that cannot be read moves nothing.
"""

from __future__ import annotations

from pipeline.training.config import TrainConfig
from pipeline.errors import PipelineError, first_line

REGISTERED_MODEL = "fashion-mnist-classifier"
CHAMPION, CHALLENGER = "champion", "challenger"
VAL_ACCURACY_TAG = "val_accuracy"
# What a version was validated on, copied from its run: the data, and the validation split's digest
# (the data's checksum and the split's image indices) with the size that made it.
VALIDATION_TAGS = ("dataset", "dataset_checksum", "validation_split")
STANDARD_VAL_SIZE = str(TrainConfig.val_size)


class RegistryError(PipelineError):
    """The registry, the model or the alias cannot be found or reached; the message gives the fix."""


def val_accuracy_of(model_version) -> float | None:
    """The validation accuracy a version was registered with; None when the tag is missing or not a number."""
    try:
        return float(model_version.tags[VAL_ACCURACY_TAG])
    except (KeyError, TypeError, ValueError):
        return None


def register(model_uri: str, run_id: str, *, val_accuracy: float, study: str, trial: int,
             name: str = REGISTERED_MODEL):
    """A new version of ``name`` for the trial's logged model, or the version that run already has
    (a study run again without a new best is not registered twice). The version carries the run's
    dataset tags, so that promotion compares like with like."""
    import mlflow

    client = mlflow.MlflowClient()
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        return existing[0]
    run = client.get_run(run_id).data
    dataset = {k: run.tags[k] for k in VALIDATION_TAGS if k in run.tags}
    if "val_size" in run.params:
        dataset["val_size"] = run.params["val_size"]
    version = mlflow.register_model(model_uri, name, tags={
        VAL_ACCURACY_TAG: f"{val_accuracy:.6f}", "study": study, "trial": str(trial), "run_id": run_id, **dataset})
    client.update_model_version(name, version.version, description=(
        f"Best trial ({trial}) of Optuna study {study}: validation accuracy {val_accuracy:.4%}. "
        f"Takes raw pixels 0-255, float32 (N, 28, 28); returns class probabilities (N, 10)."))
    return version


def promote(version, *, name: str = REGISTERED_MODEL) -> str:
    """Move ``champion`` to ``version`` if it beats the champion (see ``_beats``), else mark it
    ``challenger``. Returns what happened, in words.

    Two sessions may promote at the same moment, each deciding on the champion it read before the
    other wrote. So after writing, the alias is read again and settled on the best version trained
    on the same data among those registered since that champion, until it holds still: the last
    writer sees every version registered before it, so ``champion`` ends on the best one, never on
    a worse one. Versions older than the champion read first are left out: a champion someone set
    back by hand stays where they put it."""
    import mlflow

    client = mlflow.MlflowClient()
    champion = first_read = _champion(client, name)
    if champion is not None and champion.version == version.version:
        return "already champion"
    written = None  # the version this promotion last moved `champion` to
    if _beats(version, champion):
        client.set_registered_model_alias(name, CHAMPION, version.version)
        written = version.version
    newer = 0 if first_read is None else int(first_read.version)
    for _ in range(10):
        champion = _champion(client, name, written=written)
        peers = [v for v in client.search_model_versions(f"name='{name}'")
                 if int(v.version) > newer and _comparable(v, version) and val_accuracy_of(v) is not None]
        best = max(peers, key=lambda v: (val_accuracy_of(v), -int(v.version)), default=version)
        if champion is not None and (champion.version == best.version or not _beats(best, champion)):
            break
        client.set_registered_model_alias(name, CHAMPION, best.version)
        written = best.version
    if champion is not None and champion.version == version.version:
        return "promoted to champion"
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if champion is None:
        return "challenger"
    if not _same_data(champion, version):
        return f"challenger (champion v{champion.version} was trained on {champion.tags.get('dataset', 'other')} data)"
    if not _comparable(champion, version):
        return (f"challenger (champion v{champion.version} was validated on another split: val_size "
                f"{champion.tags.get('val_size', 'unrecorded')}, this one {version.tags.get('val_size', 'unrecorded')})")
    return f"challenger (champion v{champion.version} has {val_accuracy_of(champion):.2%})"


def _champion(client, name: str, written: str | None = None):
    """The version ``champion`` names, or None when no version holds the alias. Any other answer (the
    store away, a permission refused) raises: taken for "no champion", it would move the alias.
    ``written``: the version this promotion has moved the alias to already, which the error names."""
    try:
        aliases = client.get_registered_model(name).aliases
        return client.get_model_version(name, aliases[CHAMPION]) if CHAMPION in aliases else None
    except Exception as error:
        import mlflow

        from pipeline.stores import redact

        moved = ("the alias was not moved" if written is None else
                 f"champion was moved to v{written}, and is not yet checked against promotions made at the same time")
        raise RegistryError(f"cannot read the champion of {name!r} in {redact(mlflow.get_tracking_uri())}: "
                            f"{first_line(error)}; {moved}. Fix: check that the tracking store answers, then run "
                            f"`make tune` again (the study's best model is promoted then)") from error


def _beats(candidate, champion) -> bool:
    """Whether ``candidate`` should be champion instead of ``champion``: a higher validation accuracy
    on the same validation images; between versions validated on different images, the one validated
    as the shipped studies validate, never the other way round; anything displaces a champion without a
    recorded accuracy."""
    if champion is None or val_accuracy_of(champion) is None:
        return True
    if not _comparable(champion, candidate):
        return _standard_validation(candidate) and not _standard_validation(champion)
    return val_accuracy_of(candidate) > val_accuracy_of(champion)


def _same_data(champion, candidate) -> bool:
    """Trained on the same data; a version without the checksum tag counts as the same, as it always has."""
    checksums = champion.tags.get("dataset_checksum"), candidate.tags.get("dataset_checksum")
    return None in checksums or checksums[0] == checksums[1]


def _comparable(champion, candidate) -> bool:
    """Whether two versions were validated on the same images: the same data and the same split. A
    version registered before the split was recorded is compared by its data alone, as it was then
    (otherwise an upgrade would let any new model displace the champion it found)."""
    if not _same_data(champion, candidate):
        return False
    splits = champion.tags.get("validation_split"), candidate.tags.get("validation_split")
    return None in splits or splits[0] == splits[1]


def _standard_validation(version) -> bool:
    """Validated as every shipped study validates: the official data, the default validation split."""
    return (version.tags.get("dataset") == "official" and version.tags.get("val_size") == STANDARD_VAL_SIZE
            and version.tags.get("validation_split") is not None)


def promote_best_trial(study) -> dict | None:
    """Register the study's best trial's model and promote it; None when there is nothing to register."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial
        return None
    from pipeline import attrs

    model_uri, run_id = best.user_attrs.get(attrs.MODEL_URI), best.user_attrs.get(attrs.MLFLOW_RUN_ID)
    if not model_uri:
        return None
    version = register(model_uri, run_id, val_accuracy=best.value, study=study.study_name, trial=best.number)
    return {"model": REGISTERED_MODEL, "version": int(version.version), "val_accuracy": best.value,
            "outcome": promote(version)}


def resolve_version(name: str, *, alias: str | None, version: int | None, others: str = "--version N / --alias NAME"):
    """The model version an alias or number names, with one clear error for each way it can be missing."""
    import mlflow
    import requests
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from pipeline.errors import first_line
    from pipeline.stores import redact

    client = mlflow.MlflowClient()
    uri = redact(mlflow.get_tracking_uri())
    if not name.strip():
        raise RegistryError(f"--model is empty; name a registered model (the pipeline registers {REGISTERED_MODEL})")
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(error.error_code):
            raise RegistryError(f"no registered model {name!r} in {uri}. Fix: run `make tune` first (it "
                                f"registers the best model), or set MLFLOW_TRACKING_URI to the store that has it.") from None
        raise RegistryError(f"cannot read the model registry at {uri}: {first_line(error)}. Fix: check "
                            f"MLFLOW_TRACKING_URI (is the server running?).") from None
    except (OSError, requests.exceptions.RequestException) as error:  # refused, DNS, timeout (the REST client)
        raise RegistryError(f"cannot reach the tracking server at {uri}: {first_line(error)}. Fix: start it, "
                            f"or set MLFLOW_TRACKING_URI to a reachable one.") from None
    except sqlalchemy.exc.SQLAlchemyError as error:  # a local store that is not an MLflow database
        raise RegistryError(f"cannot read the tracking database {uri}: {first_line(getattr(error, 'orig', error))}. "
                            f"Fix: point MLFLOW_TRACKING_URI at an MLflow store (unset it for mlruns/mlflow.db)"
                            ) from None
    try:
        if version is not None:
            return client.get_model_version(name, str(version))
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        wanted = f"version {version}" if version is not None else f"alias {alias!r}"
        raise RegistryError(f"model {name!r} has no {wanted} in {uri}. Fix: run `make tune` until a model is "
                            f"promoted, or pick another with {others}.") from None
