import dataclasses
import tomllib

import pytest
from optuna.trial import FixedTrial

from pipeline.training.config import ConfigError, TrainConfig
from pipeline.training.recipes import load_recipe
from pipeline.search.study_file import StudyFileError, load_study
from pipeline.training.train import batch_scaled_lr

SHIPPED = ["cnn", "cnn-gpu", "mlp", "mlp-random", "mlp-unpruned"]


def lowest_params(spec):
    """Parameters at the low end of every range: the smallest configuration the space allows."""
    params = {}
    for p in spec.space:
        if p.type == "categorical":
            params[p.name] = p.choices[0]
        elif p.type == "layers":
            params.update(p.as_params((p.width[0],) * p.depth[0]))
        else:
            params[p.name] = p.low
    return params


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_study_loads_and_its_space_builds_configs(name):
    spec = load_study(name)
    assert spec.name == name and spec.direction == "maximize"
    assert spec.path.read_text().startswith(f"# {name}:")  # says what it tests and how to run it
    searched = {p.name for p in spec.space}
    assert {"lr", "dropout"} <= searched
    assert searched & {"hidden_sizes", "cnn_channels"}
    config = spec.config_for(FixedTrial(lowest_params(spec)))
    assert isinstance(config, TrainConfig) and config.model == spec.fixed["model"]
    written = tomllib.loads(spec.path.read_text()).get("enqueue", [])
    if spec.recipe:  # its configuration is tried before [[enqueue]]'s (tests/test_recipes.py)
        written = [{k: v for k, v in load_recipe(spec.recipe).settings.items() if k in searched}, *written]
    assert len(written) == len(spec.enqueue)
    for values, enqueued in zip(written, spec.enqueue):  # each [[enqueue]] runs exactly as written
        config = spec.config_for(FixedTrial(enqueued))
        for key, value in values.items():  # the value as written, coerced to the field's type (lists to tuples)
            assert getattr(config, key) == getattr(TrainConfig().replace(**{key: value}), key), key


def test_the_gpu_study_can_start_from_what_the_cnn_study_tries_first():
    # Its warm start names the cnn study; a narrowing of its ranges that left out cnn's own starting
    # configuration would make the warm start queue nothing.
    gpu, cnn = load_study("cnn-gpu"), load_study(load_study("cnn-gpu").warm_start.study)
    assert gpu.fits(gpu.in_space(cnn.enqueue[0])) and gpu.in_space(cnn.enqueue[0])


def test_the_mlp_study_starts_from_the_default_configuration():
    spec = load_study("mlp")
    first = spec.config_for(FixedTrial(spec.enqueue[0]))
    # The notebook's network and optimizer; only the schedule is the study's (its rungs need wsd), and its
    # lr, given per 128 images, is the default's at the default's batch size.
    assert first.replace(epochs=TrainConfig().epochs, schedule="onecycle", lr_reference_batch=0) == TrainConfig()
    assert batch_scaled_lr(first) == TrainConfig().lr


def test_mlp_random_is_mlp_with_random_sampling_and_the_same_pruning():
    mlp, random = load_study("mlp"), load_study("mlp-random")
    assert random.space == mlp.space and random.fixed == mlp.fixed and random.enqueue == mlp.enqueue
    assert random.sampler["name"] == "random" and random.pruner == mlp.pruner
    # It searches for as long as mlp does before its final phase.
    assert random.timeout == mlp.timeout - mlp.final.seconds and random.final is None


def test_mlp_unpruned_runs_every_trial_of_the_mlp_space_to_the_end():
    mlp, unpruned = load_study("mlp"), load_study("mlp-unpruned")
    assert unpruned.space == mlp.space and unpruned.fixed == mlp.fixed and unpruned.enqueue == mlp.enqueue
    assert unpruned.pruner == {"name": "none"} and unpruned.sampler["name"] == "random"


def test_another_sampler_seed_is_its_own_study_and_the_files_seed_is_the_study():
    mlp = load_study("mlp")
    assert mlp.with_seed(None) is mlp and mlp.with_seed(mlp.sampler["seed"]) is mlp
    seeded = mlp.with_seed(7)
    assert seeded.name == "mlp-seed7" and seeded.sampler == {**mlp.sampler, "seed": 7}
    # Only the sampler changes: every seed starts from the same default, trained alike.
    assert (seeded.fixed, seeded.space, seeded.enqueue) == (mlp.fixed, mlp.space, mlp.enqueue)


@pytest.mark.parametrize("pruner, epochs, rungs", [
    ({"name": "successive_halving", "min_resource": 3, "reduction_factor": 3}, 20, [3, 9]),
    ({"name": "successive_halving", "min_resource": 3, "reduction_factor": 3}, 27, [3, 9]),  # 27: the last epoch
    ({"name": "successive_halving", "min_resource": 1, "reduction_factor": 2, "min_early_stopping_rate": 1}, 9,
     [2, 4, 8]),
    ({"name": "successive_halving"}, 20, []),  # min_resource "auto": Optuna works it out from the trials
    ({"name": "hyperband", "min_resource": 1, "reduction_factor": 3}, 20, [1, 3, 9]),
    ({"name": "median", "n_warmup_steps": 3}, 20, [3]),
    ({"name": "none"}, 20, []),
])
def test_the_pruning_rungs_follow_the_pruners_settings(pruner, epochs, rungs):
    spec = load_study("mlp")
    assert dataclasses.replace(spec, pruner=pruner, fixed={**spec.fixed, "epochs": epochs}).pruning_rungs() == rungs


VALID = """
trials = 3
[fixed]
model = "mlp"
[search]
lr = { type = "float", low = 1e-4, high = 1e-2, log = true }
[sampler]
name = "tpe"
[pruner]
name = "median"
"""


@pytest.mark.parametrize("change, key, hint", [
    (("trials = 3", "trails = 3"), "trails", "unknown key"),
    (("trials = 3", 'trials = "many"'), "trials", "positive integer"),
    (("low = 1e-4", 'low = "small"'), "search.lr.low", "must be a number"),
    (("low = 1e-4, high = 1e-2", "low = 1e-2, high = 1e-4"), "search.lr", "empty range"),
    (("low = 1e-4", "low = 0.0"), "search.lr.log", "log scale needs low > 0"),
    (('name = "tpe"', 'name = "bayes"'), "sampler.name", "tpe, random, gp, cmaes, qmc"),
    (('name = "median"', 'name = "early"'), "pruner.name", "median, successive_halving, hyperband, none"),
    (("[search]\nlr", "[search]\nlearning_rate"), "search.learning_rate", "not a config field"),
    (('type = "float"', 'type = "real"'), "search.lr.type", "float, int, categorical, layers"),
    (('model = "mlp"', 'model = "rnn"'), "fixed", "'model'"),
    (('name = "median"', 'name = "median"\nn_warmup_steps = -1'), "pruner", "bad setting for median"),
    (("[pruner]", "[final]\nseconds = 0\n[pruner]"), "final.seconds", "positive number of seconds"),
    (("[pruner]", "[final]\nseconds = 60\nepochs = 3\n[pruner]"), "final.epochs", "unknown key; allowed: max_epochs"),
    (("[pruner]", "[warm_start]\nbest = 2\n[pruner]"), "warm_start.study", "must name an earlier study"),
    (("[sampler]", 'hidden_sizes = { type = "layers", depth = [1, 2], width = [16, 64], step = 20 }\n[sampler]'),
     "search.hidden_sizes.step", "divides the width range"),
    (('name = "median"', 'name = "median"\n[[enqueue]]\nlr = 1.0'), "enqueue[0].lr", "outside the search space"),
    (("[sampler]", 'cnn_channels = { type = "layers", depth = [1, 2], width = [16, 64] }\n[sampler]'),
     "search.cnn_channels", "only the cnn family reads it, but this study fixes model = 'mlp'"),
])
def test_a_bad_study_file_names_the_file_the_key_and_what_is_allowed(tmp_path, change, key, hint):
    old, new = change
    assert old in VALID
    path = tmp_path / "broken.toml"
    path.write_text(VALID.replace(old, new, 1))
    with pytest.raises(StudyFileError) as raised:
        load_study(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {key}: ")
    assert hint in message


def test_the_valid_template_loads(tmp_path):
    path = tmp_path / "fine.toml"
    path.write_text(VALID)
    assert load_study(path).trials == 3


def test_a_missing_study_lists_the_ones_there_are():
    with pytest.raises(StudyFileError, match="no such study file.*mlp"):
        load_study("nope")


def test_a_shipped_study_shrinks_by_its_fixed_settings_only():
    spec = load_study("cnn")
    shrunk = spec.with_settings({"epochs": "2", "train_subset": "1000"})
    assert shrunk.max_epochs == 2 and shrunk.base_config().train_subset == 1000
    assert shrunk.space == spec.space and shrunk.fixed["model"] == "cnn"  # the rest of the file holds
    with pytest.raises(ConfigError, match="'lr' is searched by study cnn"):
        spec.with_settings({"lr": "0.1"})
    with pytest.raises(ConfigError, match="epochs"):
        spec.with_settings({"epochs": "0"})


def test_setting_another_model_family_than_the_study_searches_is_refused():
    # `--set model=cnn` on the mlp study would run CNNs while the sampler tunes MLP widths they ignore.
    with pytest.raises(ConfigError, match="--set model=cnn contradicts study mlp: it searches 'hidden_sizes'"):
        load_study("mlp").with_settings({"model": "cnn"})
    assert load_study("mlp").with_settings({"model": "mlp"}).base_config().model == "mlp"


def test_a_study_file_that_is_not_text_is_one_error_naming_it(tmp_path):
    path = tmp_path / "image.toml"
    path.write_bytes(bytes(range(256)))
    with pytest.raises(StudyFileError, match="image.toml: not a text file"):
        load_study(path)
