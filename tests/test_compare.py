"""`make compare` on studies whose trials are written by hand, so every figure can be worked out."""

import datetime
import json

import mlflow
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from pipeline.__main__ import main
from pipeline import attrs
from pipeline.stores import open_storage

T0 = datetime.datetime(2026, 11, 25, 12, 0, 0)


def trial(state, start, end, *, value=None, epochs, max_epochs=5):
    return FrozenTrial(
        number=0, trial_id=0, state=state, value=value, values=None,
        datetime_start=T0 + datetime.timedelta(seconds=start), datetime_complete=T0 + datetime.timedelta(seconds=end),
        params={"lr": 0.001}, distributions={"lr": FloatDistribution(1e-4, 1e-2, log=True)},
        user_attrs={attrs.EPOCHS_RUN: epochs, attrs.MAX_EPOCHS: max_epochs}, system_attrs={},
        intermediate_values={e: 0.5 for e in range(1, epochs + 1)})


@pytest.fixture
def storage_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url)
    tpe = optuna.create_study(study_name="tpe-median", storage=storage, direction="maximize")
    tpe.set_user_attr(attrs.STUDY_MODEL_FAMILY, "mlp"), tpe.set_user_attr(attrs.STUDY_SAMPLER, "tpe"), tpe.set_user_attr(attrs.STUDY_PRUNER, "median")
    for t in (trial(TrialState.COMPLETE, 0, 60, value=0.80, epochs=5),
              trial(TrialState.PRUNED, 60, 80, epochs=2),
              trial(TrialState.COMPLETE, 80, 140, value=0.85, epochs=5),
              trial(TrialState.FAIL, 140, 150, epochs=1)):
        tpe.add_trial(t)
    # Two workers: the trials overlap from 50 s to 100 s, so the busy wall time is 150 s, not 200 s.
    random = optuna.create_study(study_name="random-none", storage=storage, direction="maximize")
    random.set_user_attr(attrs.STUDY_MODEL_FAMILY, "cnn"), random.set_user_attr(attrs.STUDY_SAMPLER, "random")
    random.set_user_attr(attrs.STUDY_PRUNER, "none")
    for t in (trial(TrialState.COMPLETE, 0, 100, value=0.83, epochs=5),
              trial(TrialState.COMPLETE, 50, 150, value=0.849, epochs=5)):
        random.add_trial(t)
    return url


def test_compare_works_out_best_counts_epochs_and_time_to_the_best(storage_url, tmp_path, capsys):
    assert main(["compare", "--storage", storage_url, "--reports-dir", str(tmp_path / "reports"), "--json"]) == 0
    printed = capsys.readouterr().out
    records = {r["study"]: r for r in json.loads(printed.strip().splitlines()[-1])["studies"]}

    tpe, random = records["tpe-median"], records["random-none"]
    assert (tpe["model_family"], tpe["sampler"], tpe["pruner"]) == ("mlp", "tpe", "median")
    assert tpe["best_val_accuracy"] == 0.85 and (tpe["complete"], tpe["pruned"], tpe["failed"]) == (2, 1, 1)
    assert tpe["epochs_run"] == 5 + 2 + 5 and tpe["epochs_unpruned"] == 5 + 5 + 5  # as make tune counts them
    assert tpe["wall_seconds"] == 150
    assert (tpe["seconds_to_near_best"], tpe["epochs_to_near_best"]) == (140, 12)  # when trial 2 finished
    assert random["wall_seconds"] == 150  # 0-100 s and 50-150 s overlap
    assert random["best_val_accuracy"] == 0.849 and random["seconds_to_near_best"] == 150  # 0.83 is not within 0.2
    # When the first trial ended (100 s), the second had been running too: busy all along, 100 s.
    assert [tuple(p) for p in random["curve"]] == [(100, 5, 0.83), (150, 10, 0.849)]

    assert "tpe-median" in printed and "2/1/1" in printed and "12 of 15" in printed and "2m20s / 12 ep" in printed


def test_compare_writes_an_offline_page_and_an_mlflow_run(storage_url, tmp_path, capsys):
    main(["compare", "tpe-median", "random-none", "--storage", storage_url, "--reports-dir", str(tmp_path)])
    page = (tmp_path / "compare.html").read_text()
    # Three figures for each model family (mlp and cnn here, each on its own zoomed axes), nothing fetched.
    assert page.count("Plotly.newPlot") == 6 and "<script src=" not in page
    assert "mlp: best validation accuracy so far" in page and "cnn: best validation accuracy so far" in page
    assert "against busy wall time" in page and "against epochs spent" in page
    experiment = mlflow.MlflowClient().get_experiment_by_name("compare")
    (run,) = mlflow.MlflowClient().search_runs([experiment.experiment_id])
    assert run.data.metrics["best_val_accuracy.tpe-median"] == 0.85
    assert {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)} >= {"compare.html", "compare.json"}


def test_parallel_trials_count_once_and_the_time_to_the_best_includes_trials_still_running(tmp_path, capsys):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    study = optuna.create_study(study_name="two-workers", storage=storage, direction="maximize")
    # Worker 1: 0-10 s, then 50-60 s (the best); worker 2: one long trial, 5-100 s.
    for t in (trial(TrialState.COMPLETE, 0, 10, value=0.5, epochs=1), trial(TrialState.COMPLETE, 5, 100, value=0.6,
              epochs=5), trial(TrialState.COMPLETE, 50, 60, value=0.9, epochs=1)):
        study.add_trial(t)
    main(["compare", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--no-tracking", "--json",
          "--reports-dir", str(tmp_path)])
    (record,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["studies"]
    assert record["seconds_to_near_best"] == 60  # busy from 0 s until the best ended at 60 s, not 10 + 10 s
    assert record["wall_seconds"] == 100


def test_an_empty_storage_is_one_clear_line(tmp_path, capsys):
    open_storage(f"sqlite:///{tmp_path / 'empty.db'}").engine.dispose()  # Optuna's tables, no study
    assert main(["compare", "--storage", f"sqlite:///{tmp_path / 'empty.db'}", "--no-tracking"]) == 1
    assert "holds no study yet" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["sqlite:///{}/typo.db", "{}/typo.journal"])
def test_a_storage_that_is_not_there_is_one_line_and_is_not_created(tmp_path, capsys, url):
    # A typo in STORAGE must not leave an empty database behind (Optuna would create one on opening).
    assert main(["compare", "--storage", url.format(tmp_path), "--no-tracking"]) == 1
    assert "nothing has been tuned there yet" in capsys.readouterr().err
    assert not list(tmp_path.glob("typo*"))


def test_a_study_not_in_the_storage_is_one_clear_line(storage_url, capsys):
    assert main(["compare", "nope", "--storage", storage_url, "--no-tracking"]) == 1
    error = capsys.readouterr().err
    assert "no study 'nope'" in error and "tpe-median" in error and "make tune STUDY=nope" in error


def search_study(storage, name, *, sampler, seed, file="studies/mlp.toml", kind="search", trials=(),
                 pruner="successive_halving", family="mlp"):
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    for key, value in ((attrs.STUDY_MODEL_FAMILY, family), (attrs.STUDY_SAMPLER, sampler),
                       (attrs.STUDY_PRUNER, pruner), (attrs.STUDY_FILE, file),
                       (attrs.STUDY_SEED, seed), (attrs.STUDY_KIND, kind), (attrs.STUDY_RUNGS, [1])):
        study.set_user_attr(key, value)
    for t in trials:
        study.add_trial(t)
    return study


def default(t):
    t.user_attrs[attrs.DEFAULT_CONFIGURATION] = True
    return t


@pytest.fixture
def seeds_and_baseline(tmp_path):
    """Two seeds of a TPE search and of a random one, and the default trained alone, each starting with
    the default (0.80 after 60 s). Random's median best is 0.86, so the reference level is 0.858. Beside
    them, an unpruned random search (not the reference: it has no rungs, unlike the searches measured)
    and a cnn study (no random search of its family: no reference)."""
    url = f"sqlite:///{tmp_path / 'seeds.db'}"
    storage = open_storage(url)
    done = TrialState.COMPLETE
    search_study(storage, "mlp", sampler="tpe", seed=0, trials=[
        default(trial(done, 0, 60, value=0.80, epochs=5)), trial(done, 60, 90, value=0.86, epochs=5),
        trial(done, 90, 120, value=0.87, epochs=5)])
    search_study(storage, "mlp-seed1", sampler="tpe", seed=1, trials=[
        default(trial(done, 0, 60, value=0.80, epochs=5)), trial(done, 60, 200, value=0.859, epochs=5)])
    search_study(storage, "mlp-random", sampler="random", seed=0, file="studies/mlp-random.toml", trials=[
        default(trial(done, 0, 60, value=0.80, epochs=5)), trial(done, 60, 300, value=0.85, epochs=5)])
    search_study(storage, "mlp-random-seed1", sampler="random", seed=1, file="studies/mlp-random.toml", trials=[
        default(trial(done, 0, 60, value=0.80, epochs=5)), trial(done, 60, 400, value=0.87, epochs=5)])
    # Run twice: after more sessions, the second run (200 s) is the baseline.
    search_study(storage, "mlp-baseline", sampler="random", seed=0, kind="baseline", trials=[
        default(trial(done, 0, 100, value=0.83, epochs=8)), default(trial(done, 500, 700, value=0.84, epochs=12))])
    search_study(storage, "mlp-full", sampler="random", seed=0, pruner="none", file="studies/mlp-full.toml",
                 trials=[default(trial(done, 0, 60, value=0.80, epochs=5)), trial(done, 60, 300, value=0.90, epochs=5)])
    search_study(storage, "cnn", sampler="tpe", seed=0, family="cnn", file="studies/cnn.toml",
                 trials=[default(trial(done, 0, 60, value=0.90, epochs=5))])
    return url


def test_compare_groups_seeds_times_each_search_to_random_searchs_best_and_shows_the_baseline(
        seeds_and_baseline, tmp_path, capsys):
    main(["compare", "mlp", "mlp-seed1", "mlp-full", "mlp-random", "mlp-random-seed1", "mlp-baseline", "cnn",
          "--storage", seeds_and_baseline, "--no-tracking", "--json", "--reports-dir", str(tmp_path)])
    out = capsys.readouterr().out
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["references"] == {"mlp": {"group": "mlp-random", "level": pytest.approx(0.858)}}
    studies = {r["study"]: r for r in printed["studies"]}
    assert studies["mlp"]["seconds_to_reference"] == 90 and studies["mlp-seed1"]["seconds_to_reference"] == 200
    assert studies["mlp-random"]["seconds_to_reference"] is None  # 0.85 never got within 0.2 of 0.86
    assert studies["mlp"]["against_default"]["default_val_accuracy"] == 0.80 and studies["mlp"]["seed"] == 0
    groups = {g["group"]: g for g in printed["groups"]}
    assert set(groups) == {"mlp", "mlp-random", "mlp-baseline", "mlp-full", "cnn"}
    tpe, random = groups["mlp"], groups["mlp-random"]
    assert tpe["studies"] == ["mlp", "mlp-seed1"] and tpe["best_median"] == pytest.approx(0.8645)
    assert (tpe["best_low"], tpe["best_high"]) == (0.859, 0.87) and (tpe["beat_default"], tpe["with_default"]) == (2, 2)
    assert tpe["seconds_to_reference_median"] == 145  # the median of 90 s and 200 s
    assert random["seconds_to_reference_median"] is None and random["reached_reference"] == 1
    assert groups["mlp-baseline"]["kind"] == "baseline"
    baseline = studies["mlp-baseline"]  # its latest run alone: its own 200 s, its own accuracy
    assert baseline["best_val_accuracy"] == 0.84 and baseline["wall_seconds"] == 200
    assert baseline["against_default"] is None
    assert "1 of 2 got there" in out and "+7.00" in out  # mlp's best against its default, in points
    cnn_row = next(line for line in out.splitlines() if line.startswith("cnn "))
    assert "got there" not in cnn_row and cnn_row.rstrip().endswith("-")  # no reference for the cnn family

    # Another reference: the TPE group's median best, less 0.2 points.
    main(["compare", "--storage", seeds_and_baseline, "--no-tracking", "--json", "--reference", "mlp",
          "--reports-dir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["references"] == {
        "mlp": {"group": "mlp", "level": pytest.approx(0.8625)}}
    with pytest.raises(SystemExit) as refused:  # a bad command-line value: exit 2
        main(["compare", "--storage", seeds_and_baseline, "--no-tracking", "--reference", "nope"])
    assert refused.value.code == 2 and "--reference 'nope' is not a group" in capsys.readouterr().err


def test_the_page_reads_at_a_glance_percent_axes_zoomed_to_the_data_and_html_tables(seeds_and_baseline, tmp_path):
    main(["compare", "mlp", "mlp-seed1", "mlp-random", "mlp-random-seed1", "mlp-baseline", "--storage",
          seeds_and_baseline, "--no-tracking", "--reports-dir", str(tmp_path)])
    page = (tmp_path / "compare.html").read_text()
    # Each accuracy axis (best so far against time, against epochs; the complete trials' spread) in percent,
    # zoomed to 84-87 %: 3 points below the best at most, so the defaults' 80 % lies below the frame.
    ranges = [json.loads(r.split("]")[0] + "]") for r in page.split('"ticksuffix":" %","range":')[1:]]
    assert ranges == [[pytest.approx(83.85), pytest.approx(87.15)]] * 3
    assert page.count("<table>") == 2 and "<pre>" not in page
    assert "<td>mlp-random</td>" in page
    assert "<td>86.45% (85.90% - 87.00%)</td>" in page and "<td>2 of 2</td>" in page
    assert "the default, trained alone" in page  # the baseline's star


def test_rank_correlations_at_epochs_asked_for_show_where_rungs_would_predict_the_end(tmp_path, capsys):
    # An unpruned study: at epoch 1 the trials rank 1, 2, 3, 4 and end 2, 1, 3, 4 (rho 0.8); at epoch 2
    # they rank as they end (rho 1).
    url = f"sqlite:///{tmp_path / 'unpruned.db'}"
    study = optuna.create_study(study_name="unpruned", storage=open_storage(url), direction="maximize")
    for first, second, final in ((0.1, 0.5, 0.6), (0.2, 0.4, 0.5), (0.3, 0.7, 0.8), (0.4, 0.8, 0.9)):
        t = trial(TrialState.COMPLETE, 0, 10, value=final, epochs=3)
        t.intermediate_values = {1: first, 2: second, 3: final}
        study.add_trial(t)
    main(["compare", "--storage", url, "--no-tracking", "--json", "--rungs", "2,1", "--reports-dir", str(tmp_path)])
    (record,) = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["studies"]
    first, second = record["pruning"]["rungs"]
    assert (first["epoch"], first["rank_correlation"], first["next_rank_correlation"]) == (1, pytest.approx(0.8),
                                                                                          pytest.approx(0.8))
    assert (second["epoch"], second["rank_correlation"]) == (2, pytest.approx(1.0))
    with pytest.raises(SystemExit) as refused:  # argparse's own error: epochs count from 1
        main(["compare", "--storage", url, "--rungs", "0,3"])
    assert refused.value.code == 2 and "epochs count from 1" in capsys.readouterr().err
