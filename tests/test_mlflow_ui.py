"""The MLflow UI in a real browser: a study's experiment shows its parent run and, nested under
it, one run per trial. The study's runs are written by the sweep's own tracker (`StudyRun`,
`TrialTracker`) without Ray; Debian's Chromium is driven by Playwright. Screenshots go to
tmp_path, and also to the folder `MULTIRES_SCREENSHOTS` names (the README's images)."""
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.study.config import load_study
from orchestrator.study.tracking import StudyRun, TrialTracker
from tests.servers import MlflowServer

pytestmark = pytest.mark.slow

SMOKE = Path(__file__).parent.parent / "search_spaces" / "smoke.yaml"
# Without the background-networking flags Chromium stalls on a closed network.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# (architecture, learning rate, test error at epochs 1 and 2) of the study's three trials.
TRIALS = [("d8-k2-w1", 0.0801, (0.62, 0.48)), ("d14-k1-w1", 0.0316, (0.70, 0.57)),
          ("d14-k2-w1", 0.153, (0.58, 0.41))]


@pytest.fixture
def chromium() -> str:
    """Debian's Chromium (`apt-get install chromium`) with the playwright package; Playwright's
    own browser download is not used."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        path = None
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("the browser test needs Chromium (apt-get install chromium) and "
                        "playwright (the dev extra)")
        pytest.skip("Chromium or playwright not installed: apt-get install chromium")
    return path


def write_study(uri: str, tmp_path: Path) -> tuple[str, str, dict[str, str]]:
    """A finished two-epoch study as a sweep leaves it: (experiment id, parent run id, {trial
    run name: run id})."""
    study = load_study(SMOKE, [f"mlflow.tracking_uri={uri}"])
    parent = StudyRun(MlflowClient(uri), study)
    parent.open(None, tmp_path / "results", SMOKE.read_text())
    tracker = TrialTracker(uri, study, parent.experiment_id, parent.run_id,
                           layout=study.parallel.layout)
    for i, (arch, lr, errors) in enumerate(TRIALS):
        trial = SimpleNamespace(trial_id=f"trial{i}", config={"arch": arch, "seed": 0, "lr": lr},
                                last_result=None)
        tracker.on_trial_start(0, [], trial)
        for epoch, error in enumerate(errors, 1):
            result = {"epoch": epoch, "epochs_total": 2, "test_error": error,
                      "best_test_error": min(errors[:epoch]), "train_loss": 2 * error,
                      "train_error": error - 0.05, "lr": lr, "time_total_s": 3.0 * epoch}
            tracker.on_trial_result(0, [], trial, result)
            trial.last_result = result
        tracker.on_trial_complete(0, [], trial)
    parent.close("FINISHED", wait_s=10)
    children = MlflowClient(uri).search_runs(
        [parent.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    names = {run.info.run_name: run.info.run_id for run in children}
    return parent.experiment_id, parent.run_id, names


def expect_training_runs(page) -> None:
    """MLflow 3.17's experiment page is either the runs table under the heading "Runs" (model
    training) or the GenAI "Overview" (traces, token usage, cost)."""
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", name="Runs", exact=True)).to_be_visible()
    expect(page.get_by_role("columnheader", name="Run Name").first).to_be_visible()
    expect(page.get_by_role("heading", name="Overview", exact=True)).to_have_count(0)


def save(page, name: str, tmp_path: Path) -> None:
    page.screenshot(path=tmp_path / name)
    assert (tmp_path / name).stat().st_size > 10_000  # not a blank page
    folder = os.environ.get("MULTIRES_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tmp_path / name, Path(folder) / name)


def readable_table(page) -> None:
    """For the screenshot: the test errors instead of empty columns, whole run names."""
    from playwright.sync_api import expect

    page.get_by_role("button", name="Columns").click()
    for name in ("Dataset", "Source", "Models", "best_test_error", "final_test_error"):
        page.get_by_title(name, exact=True).click()
    page.keyboard.press("Escape")
    expect(page.get_by_placeholder("Search columns")).to_be_hidden()  # it blocks clicks
    expect(page.get_by_role("columnheader", name="final_test_error").first).to_be_visible()
    header = page.locator('[role=columnheader][col-id="attributes.`Run Name`"]').bounding_box()
    x, y = header["x"] + header["width"] - 2, header["y"] + header["height"] / 2
    page.mouse.move(x, y)  # drag the column's right edge
    page.mouse.down()
    page.mouse.move(x + 90, y, steps=5)
    page.mouse.up()


def test_experiment_page_lists_study_and_nested_trials(chromium, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import expect, sync_playwright

    server = MlflowServer(tmp_path)
    try:
        server.start()
        experiment_id, parent_id, trials = write_study(server.uri, tmp_path)
        assert set(trials) == {"d8-k2-w1-s0-lr0.0801", "d14-k1-w1-s0-lr0.0316",
                               "d14-k2-w1-s0-lr0.153"}
        expect.set_options(timeout=30_000)  # a busy two-core machine renders slowly
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 800})
                page.set_default_timeout(30_000)
                # MLflow 3.17 opens an experiment on the view its sidebar switch selects: GenAI
                # in a new browser, whatever the experiment's kind tag says (mlflow/mlflow#24498).
                # A user chooses "Model training" once (the browser keeps it); here on the list
                # of experiments, where no GenAI pop-up covers the switch.
                page.goto(f"{server.uri}/#/experiments")
                page.get_by_role("button", name="Model training", exact=True).click()
                expect(page.get_by_role("link", name="smoke", exact=True)).to_be_visible()
                page.goto(f"{server.uri}/#/experiments/{experiment_id}")
                expect_training_runs(page)
                try:  # the assistant panel, open by default, hides half of the table
                    page.get_by_role("button", name="Close", exact=True).click(timeout=5_000)
                except PlaywrightTimeout:
                    pass

                cells = page.get_by_role("gridcell")
                study = cells.get_by_role("link", name="smoke", exact=True)
                expect(study).to_be_visible()
                expect(page.get_by_text("4 matching runs")).to_be_visible()
                for name in trials:  # nested: hidden until the parent row is expanded
                    expect(cells.get_by_role("link", name=name, exact=True)).to_have_count(0)
                # (`has` is relative to the cell it filters.)
                parent_cell = cells.filter(has=page.get_by_role("link", name="smoke", exact=True))
                parent_cell.get_by_role("button").click()
                for name in trials:
                    expect(cells.get_by_role("link", name=name, exact=True)).to_be_visible()
                readable_table(page)
                save(page, "mlflow_study_runs.png", tmp_path)

                # One trial's run: its metrics, parameters and tags, and its parent.
                cells.get_by_role("link", name="d8-k2-w1-s0-lr0.0801", exact=True).click()
                expect(page.get_by_role("heading", name="d8-k2-w1-s0-lr0.0801")).to_be_visible()
                expect(page.get_by_text("Parent run", exact=True)).to_be_visible()
                expect(page.locator(f'a[href$="/runs/{parent_id}"]')).to_have_text("smoke")
                expect(page.get_by_role("status", name="architecture")).to_contain_text("d8-k2-w1")
                save(page, "mlflow_trial_run.png", tmp_path)
            finally:
                browser.close()
    finally:
        server.stop()
