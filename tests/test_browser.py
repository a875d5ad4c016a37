"""The pages people browse, opened in headless Chromium (Debian's chromium and chromium-driver) as a
person would, after a tiny real tune of two studies and an evaluate-best: the MLflow UI (`make ui`)
and optuna-dashboard (`make dashboard`). Screenshots go to reports/screenshots/."""

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from pipeline.data import CUSTOM_ENV_VAR
from pipeline.paths import REPORTS_DIR
from tests.conftest import free_port

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SCREENSHOTS = REPORTS_DIR / "screenshots"
PAGE_SECONDS = 60  # how long a single-page app may take to fetch and draw


def pipeline(*args, env):
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def serve(command: str, port: int, env) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "pipeline", command, "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise AssertionError(f"`pipeline {command}` did not start on port {port}")


@pytest.fixture(scope="module")
def site(tmp_path_factory, synthetic_dir):
    """Two tracked studies (mlp, mlp-random) and an evaluate-best in fresh stores; the MLflow UI and
    optuna-dashboard serving them; a headless Chromium."""
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):
            pytest.fail("CI must have chromium and chromium-driver (.ci/run installs them)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    folder = tmp_path_factory.mktemp("browsed")
    env = {**os.environ, CUSTOM_ENV_VAR: str(synthetic_dir), "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
           "OPTUNA_STORAGE": f"sqlite:///{folder}/optuna.db"}
    for study in ("mlp", "mlp-random"):
        pipeline("tune", "--study", study, "--trials", "3", "--set", "epochs=3", "--set", "val_size=200",
                 "--device", "cpu", env=env)
    pipeline("evaluate-best", "--reports-dir", str(folder / "reports"), env=env)

    ui_port, dashboard_port = free_port(), free_port()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1400,1000"):
        options.add_argument(argument)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    servers, browser = [], None
    try:  # whatever fails to start, what did start is stopped
        servers.append(serve("ui", ui_port, env))
        servers.append(serve("dashboard", dashboard_port, env))
        browser = webdriver.Chrome(service=Service(DRIVER), options=options)
        yield {"browser": browser, "ui": f"http://127.0.0.1:{ui_port}",
               "dashboard": f"http://127.0.0.1:{dashboard_port}/dashboard", "env": env}
    finally:
        if browser is not None:
            browser.quit()
        for server in servers:
            server.terminate()
            server.wait(timeout=30)


def open_page(site, url: str, shows, screenshot: str):
    """Go to ``url`` and wait until ``shows(browser)`` holds; keep a screenshot either way."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser = site["browser"]
    browser.get(url)
    try:
        WebDriverWait(browser, PAGE_SECONDS, poll_frequency=0.5).until(lambda b: shows(b))
    finally:
        browser.save_screenshot(str(SCREENSHOTS / screenshot))
    return browser


def text(browser) -> str:
    return browser.find_element("tag name", "body").text


def mlflow_ids(site, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(site["env"]["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], "tags.trial = '0'")
    return experiment_id, run.info.run_id


def test_the_mlflow_ui_lists_the_studies_experiments(site):
    open_page(site, f"{site['ui']}/#/experiments",
              lambda b: "mlp-random" in text(b) and "\nmlp\n" in text(b), "mlflow-experiments.png")


def test_a_trial_run_shows_its_metric_charts_and_its_confusion_matrix(site):
    experiment_id, run_id = mlflow_ids(site, "mlp")
    run_page = f"{site['ui']}/#/experiments/{experiment_id}/runs/{run_id}"

    def charted(browser):  # a drawn chart per logged metric (ten of them), val_accuracy among them
        return "val_accuracy" in text(browser) and drawn_plots(browser) >= 5

    open_page(site, f"{run_page}/model-metrics", charted, "mlflow-trial-metrics.png")

    def image_shown(browser):  # the 700 x 600 px heatmap loaded and decoded (the UI's icons are far smaller)
        return "confusion_matrix.png" in text(browser) and browser.execute_script(
            "return Array.from(document.images).some(i => i.complete && i.naturalWidth >= 600)")

    open_page(site, f"{run_page}/artifacts/confusion_matrix.png", image_shown, "mlflow-trial-confusion-matrix.png")


def test_the_registered_model_page_shows_its_versions_and_the_champion_alias(site):
    open_page(site, f"{site['ui']}/#/models/fashion-mnist-classifier",
              lambda b: "Version 1" in text(b) and "champion" in text(b), "mlflow-registered-model.png")


def study_ids(site) -> dict[str, int]:
    import optuna

    storage = site["env"]["OPTUNA_STORAGE"]
    return {name: optuna.load_study(study_name=name, storage=storage)._study_id for name in ("mlp", "mlp-random")}


def drawn_plots(browser) -> int:
    """Plotly figures with at least one trace drawn."""
    return len(browser.find_elements("css selector", ".js-plotly-plot .scatterlayer .trace"))


def test_the_dashboard_lists_both_studies_and_draws_a_studys_history(site):
    open_page(site, site["dashboard"], lambda b: "mlp-random" in text(b) and "mlp\n" in text(b),
              "dashboard-studies.png")
    ids = study_ids(site)
    open_page(site, f"{site['dashboard']}/studies/{ids['mlp']}",
              lambda b: drawn_plots(b) > 0 and "val_accuracy" in text(b), "dashboard-study-history.png")


def test_the_dashboards_compare_page_overlays_both_histories(site):
    ids = study_ids(site)
    open_page(site, f"{site['dashboard']}/compare-studies?ids={ids['mlp']},{ids['mlp-random']}",
              lambda b: "val_accuracy of mlp\n" in text(b) + "\n" and "val_accuracy of mlp-random" in text(b)
              and drawn_plots(b) >= 2, "dashboard-compare.png")
