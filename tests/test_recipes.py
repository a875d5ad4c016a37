"""Recipes: a named training configuration, trained by `train --recipe` and started from by a study."""

import json
import tomllib

import optuna
import pytest

from pipeline.training.recipes import RecipeError, load_recipe
from pipeline.search.study_file import StudyFileError, load_study, study_path
from tests.test_bad_input import one_error_line, run_main
from tests.test_cli import run_cli

SMALL_CNN = """
description = "a small CNN for the synthetic data"
model = "cnn"
cnn_channels = [8, 16]
cnn_convs_per_stage = 1
cnn_head_width = 32
batch_size = 32
lr = 0.004
tta = "flip-translate"
val_size = 200
"""


@pytest.mark.slow
def test_train_with_a_recipe_trains_its_configuration_and_set_changes_it(synthetic_dir, tmp_path):
    recipe = tmp_path / "small-cnn.toml"
    recipe.write_text(SMALL_CNN)
    done = run_cli("train", "--recipe", str(recipe), "--set", "lr=0.002", "--epochs", "1", "--device", "cpu",
                   "--json", data_dir=synthetic_dir)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["recipe"] == "small-cnn"
    config = report["config"]
    assert (config["model"], config["cnn_channels"], config["batch_size"], config["tta"]) == ("cnn", [8, 16], 32,
                                                                                                "flip-translate")
    assert config["lr"] == 0.002 and config["epochs"] == 1  # the command line wins over the recipe
    assert "recipe small-cnn" in done.stderr and "a small CNN for the synthetic data" in done.stderr


def test_the_cnn_study_starts_from_the_fast_cnn_recipe():
    spec = load_study("cnn")
    recipe = load_recipe("fast-cnn")
    study_file_fixed = tomllib.loads(study_path("cnn").read_text()).get("fixed", {})
    assert spec.recipe == "fast-cnn"
    # Trial 0 is the recipe, searched fields included, with only what the study's own [fixed] changes.
    first_trial = spec.config_for(optuna.trial.FixedTrial(spec.enqueue[0]))
    assert first_trial == recipe.config().replace(**study_file_fixed)
    # Every other trial keeps the recipe's settings that the study neither searches nor overrides.
    searched = {p.name for p in spec.space}
    assert spec.fixed == {**{k: v for k, v in recipe.settings.items() if k not in searched}, **study_file_fixed}


@pytest.mark.parametrize("text, message", [
    ("lr = 0.01\nnope = 1\n", "unknown config key 'nope'"),
    ("dropout = 1.5\n", "'dropout' = 1.5 is out of range"),
    ("[fixed]\nlr = 0.01\n", "[fixed]: a recipe has no tables"),
    ("lr = \n", "not valid TOML"),
    ("description = 3\n", "description: must be a string"),
])
def test_a_bad_recipe_is_one_error_naming_the_file_and_the_key(tmp_path, capsys, text, message):
    recipe = tmp_path / "mine.toml"
    recipe.write_text(text)
    code, stderr = run_main(capsys, "train", "--recipe", str(recipe))
    assert code == 1
    line = one_error_line(stderr)
    assert str(recipe) in line and message in line


def test_an_unknown_recipe_lists_the_recipes_there_are(capsys):
    code, stderr = run_main(capsys, "train", "--recipe", "fast-cnnn")
    assert code == 1
    assert "recipes/fast-cnnn.toml: no such recipe file" in stderr and "fast-cnn" in stderr.split("recipes in")[-1]


def test_a_study_whose_recipe_lies_outside_its_search_space_is_refused(tmp_path):
    recipe = tmp_path / "wide.toml"
    recipe.write_text("model = \"cnn\"\nlr = 0.5\n")
    study = tmp_path / "study.toml"
    study.write_text(f"recipe = \"{recipe}\"\n[search]\nlr = {{ type = \"float\", low = 1e-4, high = 1e-2 }}\n")
    with pytest.raises(StudyFileError, match=r"recipe wide's lr: 0.5 is outside the search space of search.lr"):
        load_study(study)
    missing = tmp_path / "missing.toml"
    missing.write_text("recipe = \"no-such-recipe\"\n[search]\nlr = { type = \"float\", low = 1e-4, high = 1e-2 }\n")
    with pytest.raises(StudyFileError, match=r"missing.toml: recipe: .*no-such-recipe.toml: no such recipe file"):
        load_study(missing)
    with pytest.raises(RecipeError):
        load_recipe(tmp_path / "none.toml")


def test_a_studys_recipe_is_tried_before_its_own_enqueued_configurations(tmp_path):
    recipe = tmp_path / "base.toml"
    recipe.write_text("model = \"cnn\"\nlr = 0.004\nepochs = 3\n")
    space = "[search]\nlr = { type = \"float\", low = 1e-4, high = 1e-2 }\ndropout = { type = \"float\", low = 0, high = 0.5 }\n"
    study = tmp_path / "study.toml"
    study.write_text(f"recipe = \"{recipe}\"\n{space}[[enqueue]]\nlr = 0.001\ndropout = 0.2\n")
    spec = load_study(study)
    assert spec.enqueue == ({"lr": 0.004}, {"lr": 0.001, "dropout": 0.2})  # the recipe's, then the file's
    assert spec.fixed == {"model": "cnn", "epochs": 3}
    study.write_text(f"recipe = \"{recipe}\"\n{space}[[enqueue]]\nlr = 0.5\ndropout = 0.2\n")
    with pytest.raises(StudyFileError, match=r"enqueue\[0\]\.lr: 0.5 is outside"):  # the file's own numbering
        load_study(study)
