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

from pipeline.data.dataset import CUSTOM_ENV_VAR
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


def open_page(site, url: str | None, shows, screenshot: str):
    """Go to ``url`` (None: stay on this page) and wait until ``shows(browser)`` holds; keep a
    screenshot either way."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser = site["browser"]
    if url is not None:
        browser.get(url)
    try:
        WebDriverWait(browser, PAGE_SECONDS, poll_frequency=0.5).until(lambda b: shows(b))
    finally:
        browser.save_screenshot(str(SCREENSHOTS / screenshot))
    return browser


def link(browser, href: str, shown: str) -> bool:
    """A link to ``href`` (the attribute as written in the page) whose visible text is ``shown``."""
    return any(a.text.strip() == shown for a in browser.find_elements("css selector", f'a[href="{href}"]'))


def mlflow_ids(site, experiment: str):
    import mlflow

    client = mlflow.MlflowClient(site["env"]["MLFLOW_TRACKING_URI"])
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    (run,) = client.search_runs([experiment_id], "tags.trial = '0'")
    return experiment_id, run.info.run_id


def test_the_mlflow_ui_lists_the_studies_experiments(site):
    ids = {name: mlflow_ids(site, name)[0] for name in ("mlp", "mlp-random")}
    open_page(site, f"{site['ui']}/#/experiments",
              lambda b: all(link(b, f"#/experiments/{ids[name]}", name) for name in ids), "mlflow-experiments.png")


# The card of a chart titled ``name`` (its title's nearest ancestor holding a plot): the number of its traces drawn.
CHART_TRACES = """
const title = Array.from(document.querySelectorAll("h4")).find(h => h.getAttribute("title") === arguments[0]);
let card = title;
while (card && !card.querySelector(".js-plotly-plot")) card = card.parentElement;
return card ? card.querySelectorAll(".js-plotly-plot .scatterlayer .trace").length : 0;
"""


def test_a_trial_run_shows_its_metric_charts_and_its_confusion_matrix(site):
    experiment_id, run_id = mlflow_ids(site, "mlp")
    run_page = f"{site['ui']}/#/experiments/{experiment_id}/runs/{run_id}"

    counted = "//div[normalize-space()='Model metrics']/following-sibling::div[normalize-space()='(10)']"

    def listed(browser):  # the section counts the ten metrics logged; the first charts are drawn
        return len(browser.find_elements("xpath", counted)) == 1 and drawn_plots(browser) >= 3

    browser = open_page(site, f"{run_page}/model-metrics", listed, "mlflow-trial-metrics-list.png")
    # Charts below the fold are drawn only when shown: look val_accuracy up as a person would.
    browser.find_element("css selector", "input[placeholder='Search metric charts']").send_keys("val_accuracy")
    open_page(site, None, lambda b: b.execute_script(CHART_TRACES, "val_accuracy") > 0, "mlflow-trial-metrics.png")

    def image_shown(browser):  # the 700 x 600 px heatmap loaded and decoded (the UI shows it from a blob: URL)
        return browser.execute_script(
            "return Array.from(document.images).some(i => i.complete && i.naturalWidth === 700"
            " && i.naturalHeight === 600)")

    open_page(site, f"{run_page}/artifacts/confusion_matrix.png", image_shown, "mlflow-trial-confusion-matrix.png")


def test_the_registered_model_page_shows_its_versions_and_the_champion_alias(site):
    import mlflow

    from pipeline.tracking.registry import CHAMPION, REGISTERED_MODEL

    client = mlflow.MlflowClient(site["env"]["MLFLOW_TRACKING_URI"])
    champion = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION).version
    # The row of the versions table that links to the champion's version holds the alias.
    row = (f"//*[@role='row'][.//a[substring(@href, string-length(@href) - {len(f'/versions/{champion}') - 1})"
           f" = '/versions/{champion}']][.//*[@title='{CHAMPION}']]")
    open_page(site, f"{site['ui']}/#/models/{REGISTERED_MODEL}", lambda b: len(b.find_elements("xpath", row)) == 1,
              "mlflow-registered-model.png")


def study_ids(site) -> dict[str, int]:
    import optuna

    storage = site["env"]["OPTUNA_STORAGE"]
    return {name: optuna.load_study(study_name=name, storage=storage)._study_id for name in ("mlp", "mlp-random")}


def drawn_plots(browser) -> int:
    """Plotly figures with at least one trace drawn."""
    return len(browser.find_elements("css selector", ".js-plotly-plot .scatterlayer .trace"))


def plot_traces(browser, selector: str) -> int:
    """The traces drawn in the Plotly figures that hold an element matching ``selector``."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('.js-plotly-plot'))"
        ".filter(p => p.querySelector(arguments[0]))"
        ".reduce((n, p) => n + p.querySelectorAll('.scatterlayer .trace').length, 0)", selector)


def test_the_dashboard_lists_both_studies_and_draws_a_studys_history(site):
    ids = study_ids(site)

    def listed(browser):  # each study's entry links to its page, headed with its number and name
        return all(any(h.text.strip() == f"{ids[name]}. {name}" for h in
                       browser.find_elements("css selector", f'a[href="/dashboard/studies/{ids[name]}"] h5'))
                   for name in ids)

    open_page(site, site["dashboard"], listed, "dashboard-studies.png")
    open_page(site, f"{site['dashboard']}/studies/{ids['mlp']}",
              lambda b: plot_traces(b, "text.ytitle[data-unformatted='val_accuracy']") > 0,
              "dashboard-study-history.png")


def test_the_dashboards_compare_page_overlays_both_histories(site):
    ids = study_ids(site)
    both = ("text[data-unformatted='val_accuracy of mlp']", "text[data-unformatted='val_accuracy of mlp-random']")
    overlaid = ("return Array.from(document.querySelectorAll('.js-plotly-plot'))"
                ".some(p => arguments[0].every(s => p.querySelector('.legend ' + s))"
                " && p.querySelectorAll('.scatterlayer .trace').length >= 2)")
    open_page(site, f"{site['dashboard']}/compare-studies?ids={ids['mlp']},{ids['mlp-random']}",
              lambda b: b.execute_script(overlaid, list(both)), "dashboard-compare.png")
