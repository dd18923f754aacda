"""The MLflow UI, driven in headless Chromium, on the SQLite store of two short `encoder_model` runs.

A module fixture materializes the data assets for `demo_tiny` and then `encoder_model` twice
(tiny model, a few steps, seeds 1 and 2) into a temporary work folder and MLflow store, in this
process; `mlflow server` then serves that store on 127.0.0.1. The tests open the experiment,
a run's metrics (the loss curve) and artifacts (the UMAP PNG, the checkpoint), and compare the
two runs. What the UI shows is compared with what MlflowClient and the artifact files hold.
Screenshots: test-artifacts/ui/<test name>/.
"""

import re
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from ui_browser import Screenshots, png_size, wait_for, xpath_literal
from ui_servers import Server, free_port, running

EXPERIMENT = "spkenc"
TINY = {"hidden_size": 32, "n_layers": 1, "embedding_size": 32, "speakers_per_batch": 8,
        "utterances_per_speaker": 4}
N_STEPS = 4
SEEDS = (1, 2)

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def human_size(n_bytes: int) -> str:
    """A file size as the MLflow artifact view prints it (1024-based, two decimals).

    >>> human_size(152309), human_size(14776), human_size(900)
    ('148.74KB', '14.43KB', '900B')
    """
    size, unit = float(n_bytes), "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            break
        size /= 1024
    return f"{n_bytes}B" if unit == "B" else f"{size:.2f}{unit}"


@pytest.fixture(scope="module")
def mlflow_runs(chromium_available: None, demo_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two finished `encoder_model` runs in a temporary SQLite store.

    Returns {store, root, runs}; each run: id, name, seed, final_loss, loss_history, artifact_dir.
    """
    import dagster as dg
    import torch
    from mlflow import MlflowClient

    from pipelines.assets.data import mel_shards, raw_corpus, trimmed_wavs
    from pipelines.assets.training import encoder_model
    from pipelines.corpora import corpus_partitions
    from pipelines.mlflow_resource import MlflowResource
    from pipelines.resources import SpkencPaths

    root = tmp_path_factory.mktemp("mlflow_ui")
    work_dir = root / "work"
    store = f"sqlite:///{work_dir / 'mlflow.db'}"
    resources = {
        "paths": SpkencPaths(work_dir=str(work_dir), corpora_file=str(demo_registry)),
        "mlflow": MlflowResource(tracking_uri=store, artifact_root=str(work_dir / "mlartifacts"),
                                 experiment_name=EXPERIMENT),
    }
    one_worker = {"config": {"workers": 1}}
    data_config = {"ops": {"trimmed_wavs": one_worker, "mel_shards": one_worker}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (root / "dagster_home").mkdir()
        with dg.DagsterInstance.local_temp(str(root / "dagster_home")) as instance:
            instance.add_dynamic_partitions(corpus_partitions.name, ["demo_tiny"])
            data = dg.materialize([raw_corpus, trimmed_wavs, mel_shards], partition_key="demo_tiny",
                                  instance=instance, resources=resources, run_config=data_config)
            assert data.success
            runs = []
            for seed in SEEDS:
                config = {**TINY, "steps": N_STEPS, "log_every": 1, "save_every": N_STEPS, "umap_every": N_STEPS,
                          "seed": seed, "run_name": f"ui-seed-{seed}"}
                result = dg.materialize([encoder_model], instance=instance, resources=resources,
                                        run_config={"ops": {"encoder_model": {"config": config}}})
                value = result.output_for_node("encoder_model")
                runs.append({"id": value["mlflow_run_id"], "name": config["run_name"], "seed": seed})
    finally:
        torch.set_num_threads(threads)
    client = MlflowClient(tracking_uri=store)
    for run in runs:
        info = client.get_run(run["id"])
        assert info.info.status == "FINISHED", f"MLflow run {run['id']} is {info.info.status}"
        history = sorted(client.get_metric_history(run["id"], "loss"), key=lambda m: m.step)
        run.update(final_loss=info.data.metrics["loss"], loss_history=[m.value for m in history],
                   artifact_dir=Path(info.info.artifact_uri.removeprefix("file://")))
    return {"store": store, "root": root, "runs": runs}


@pytest.fixture(scope="module")
def mlflow_ui(mlflow_runs: dict, artifacts_dir: Path, ui_env: dict) -> Iterator[str]:
    """`mlflow server` on a free 127.0.0.1 port over the runs' SQLite store; yields its base URL."""
    port = free_port()
    root = mlflow_runs["root"]
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", mlflow_runs["store"],
               "--default-artifact-root", (root / "server-artifacts").as_uri(),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server = Server("mlflow server", command, f"http://127.0.0.1:{port}/health", ui_env, root,
                    artifacts_dir / "mlflow_server.log", grace_s=20)
    with running(server, timeout_s=180):
        yield f"http://127.0.0.1:{port}"


def _click(driver: Any, element: Any) -> None:
    """Click like a user; where one of MLflow's first-visit popovers covers the target, click through it."""
    from selenium.common.exceptions import ElementClickInterceptedException

    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    try:
        element.click()
    except ElementClickInterceptedException:
        driver.execute_script("arguments[0].click();", element)


def _find(driver: Any, what: str, xpath: str, timeout_s: float = 30.0) -> Any:
    """The first element at `xpath`, waiting up to `timeout_s` for it."""
    from selenium.webdriver.common.by import By

    return wait_for(what, lambda: driver.find_element(By.XPATH, xpath), timeout_s)


def _open_training_runs(driver: Any, base_url: str, runs: list[dict]) -> None:
    """Experiments list -> the spkenc experiment -> its runs table (MLflow 3 may open its GenAI view first)."""
    from selenium.webdriver.common.by import By

    driver.get(base_url + "/#/experiments")

    def experiment_link() -> Any:
        # The list's link goes to #/experiments/<id>; breadcrumbs with the same name go deeper.
        links = driver.find_elements(By.XPATH, f"//a[normalize-space()={xpath_literal(EXPERIMENT)}]")
        return next((a for a in links if re.search(r"#/experiments/\d+$", a.get_attribute("href") or "")), None)

    _click(driver, wait_for(f"the {EXPERIMENT} experiment in the experiments list", experiment_link, 60))

    def runs_listed() -> bool:
        return all(driver.find_elements(By.XPATH, f"//a[normalize-space()={xpath_literal(r['name'])}]") for r in runs)

    try:
        wait_for("the runs table", runs_listed, 10)
    except TimeoutError:
        _click(driver, driver.find_element(By.XPATH, "//*[@role='button'][normalize-space()='Model training']"))
        wait_for("the runs table after switching to 'Model training'", runs_listed, 60)
    for close in driver.find_elements(By.XPATH, "//button[@aria-label='Close']"):  # the assistant side panel
        _click(driver, close)


def _loss_chart_points(driver: Any) -> int:
    """How many markers the 'loss' chart card draws (one per logged step); 0 while not drawn."""
    from selenium.webdriver.common.by import By

    cards = driver.find_elements(By.XPATH, "//*[@data-testid='experiment-view-compare-runs-card']"
                                           "[.//*[normalize-space(text())='loss']]")
    return len(cards[0].find_elements(By.CSS_SELECTOR, "svg.main-svg g.points path.point")) if cards else 0


def _artifact_preview(driver: Any) -> Any:
    """The previewed artifact image (MLflow loads it as a blob), once it has pixels; else None."""
    from selenium.webdriver.common.by import By

    return next((i for i in driver.find_elements(By.CSS_SELECTOR, "img[src^='blob:']")
                 if int(i.get_attribute("naturalWidth") or 0) > 0 and i.size["width"] > 0), None)


def test_run_page_shows_the_metrics_loss_curve_and_artifacts(mlflow_ui: str, mlflow_runs: dict, browser: Any,
                                                             shots: Screenshots):
    from selenium.webdriver.common.by import By

    run = mlflow_runs["runs"][0]
    _open_training_runs(browser, mlflow_ui, mlflow_runs["runs"])
    shots.take(browser, "experiment_runs")
    _click(browser, browser.find_element(By.XPATH, f"//a[normalize-space()={xpath_literal(run['name'])}]"))

    # Overview: the metrics table holds the last logged loss.
    row = _find(browser, "the run's metrics table", "//*[@role='row'][.//a[normalize-space()='loss']]", 60)
    assert run["id"] in browser.current_url
    shown_loss = float(row.find_elements(By.XPATH, ".//*[@role='cell']")[-1].text)
    assert shown_loss == pytest.approx(run["final_loss"], rel=1e-9), f"the run page shows loss {shown_loss}"
    shots.take(browser, "run_overview")

    # Model metrics: the loss curve, one point per logged step.
    _click(browser, _find(browser, "the 'Model metrics' tab", "//button[normalize-space()='Model metrics']"))
    n_points = wait_for("the loss chart", lambda: _loss_chart_points(browser), 60)
    assert len(run["loss_history"]) == N_STEPS
    assert n_points == N_STEPS, f"the loss chart draws {n_points} points, {N_STEPS} steps were logged"
    shots.take(browser, "run_loss_curve")

    # Artifacts: the UMAP PNG previews at its real size, the checkpoint is listed with its size.
    umaps = sorted((run["artifact_dir"] / "umap").glob("*.png"))
    checkpoint = run["artifact_dir"] / "checkpoint" / "encoder.pt"
    assert umaps and checkpoint.is_file(), f"artifacts of run {run['id']}: {sorted(run['artifact_dir'].rglob('*'))}"
    _click(browser, _find(browser, "the 'Artifacts' tab", "//button[normalize-space()='Artifacts']"))
    for folder in ("umap", "checkpoint"):
        _click(browser, _find(browser, f"the {folder}/ folder",
                              f"//div[normalize-space()={xpath_literal(folder)}][i[contains(@class, 'fa-folder')]]"))
    _click(browser, _find(browser, "the UMAP file", f"//div[normalize-space()={xpath_literal(umaps[-1].name)}]"))
    image = wait_for("the UMAP preview", lambda: _artifact_preview(browser), 30)
    shown_size = (int(image.get_attribute("naturalWidth")), int(image.get_attribute("naturalHeight")))
    assert shown_size == png_size(umaps[-1]), f"the preview is {shown_size}, {umaps[-1].name} is {png_size(umaps[-1])}"
    shots.take(browser, "run_umap_artifact")

    _click(browser, browser.find_element(By.XPATH, "//div[normalize-space()='encoder.pt']"))
    _find(browser, "the checkpoint's path", "//*[normalize-space(text())='checkpoint/encoder.pt']")
    expected = human_size(checkpoint.stat().st_size)
    _find(browser, f"the checkpoint's size {expected}", f"//*[normalize-space(text())={xpath_literal(expected)}]")
    shots.take(browser, "run_checkpoint_artifact")


# The comparison's metrics are a virtualized grid: the names in one column of absolutely placed
# cells, the values in another. A metric's values are the value cells level with its name.
_METRIC_ROW_JS = """
const name = arguments[0];
const link = [...document.querySelectorAll('a[title="Plot chart"]')].find(a => a.textContent.trim() === name);
if (!link) return null;
const row = link.getBoundingClientRect();
return [...document.querySelectorAll('[role=grid] *')]
  .filter(c => c.children.length === 0 && c.innerText.trim() !== '')
  .filter(c => Math.abs(c.getBoundingClientRect().top - row.top) < 5 && c.getBoundingClientRect().left > row.left)
  .map(c => c.innerText.trim());
"""


def test_compare_the_two_runs(mlflow_ui: str, mlflow_runs: dict, browser: Any, shots: Screenshots):
    from selenium.webdriver.common.by import By

    runs = mlflow_runs["runs"]
    _open_training_runs(browser, mlflow_ui, runs)
    row_boxes = "//input[@type='checkbox' and contains(@aria-label, 'toggle row selection')]"
    boxes = browser.find_elements(By.XPATH, row_boxes)
    assert len(boxes) == len(runs), f"{len(boxes)} selectable rows for {len(runs)} runs"
    for box in boxes:
        _click(browser, box)
    _click(browser, _find(browser, "the Compare button", "//button[normalize-space()='Compare']", 15))

    _find(browser, "the comparison", "//*[normalize-space(text())='Comparing 2 Runs from 1 Experiment']", 60)
    assert "compare-runs" in browser.current_url
    page = browser.find_element(By.TAG_NAME, "body").text
    for run in runs:
        assert run["id"] in page and run["name"] in page, f"run {run['name']} ({run['id']}) is not compared"
    seed_row = browser.find_element(By.XPATH, "//tr[th[normalize-space()='seed'] or td[1][normalize-space()='seed']]")
    shown_seeds = sorted(int(c.text) for c in seed_row.find_elements(By.XPATH, "./td")[-len(runs):])
    assert shown_seeds == sorted(SEEDS)
    shown_losses = sorted(float(v) for v in browser.execute_script(_METRIC_ROW_JS, "loss"))
    expected_losses = sorted(r["final_loss"] for r in runs)
    assert shown_losses == pytest.approx(expected_losses, abs=5e-4), "the comparison rounds loss to 3 decimals"
    wait_for("the parallel coordinates plot of seed and loss",
             lambda: browser.find_elements(By.CSS_SELECTOR, "svg.main-svg"), 60)
    shots.take(browser, "compare_runs")

    # The runs table's chart view draws both runs' loss curves on one chart.
    _open_training_runs(browser, mlflow_ui, runs)
    _click(browser, browser.find_element(By.XPATH, "//input[@value='CHART']/ancestor::label[1]"))
    legends = [f"{r['name']} (loss)" for r in runs]

    def loss_chart_has_both_runs() -> bool:
        cards = browser.find_elements(By.XPATH, "//*[@data-testid='experiment-view-compare-runs-card']")
        return any(card.text.split("\n")[0] == "loss" and all(legend in card.text.split("\n") for legend in legends)
                   for card in cards)

    wait_for(f"the loss chart with {legends}", loss_chart_has_both_runs, 60)
    shots.take(browser, "runs_chart_view")
