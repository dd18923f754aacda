"""The Dagster web UI, driven in headless Chromium as a user would drive it.

`dagster dev` runs on 127.0.0.1 against `pipelines.definitions`, with a temporary DAGSTER_HOME
and work folder, and a corpus registry holding only the committed demo corpus. The tests open
the asset graph, launch the data assets for the `demo_tiny` partition from the UI, wait for the
run, and read the `mel_shards` asset page. What the UI shows is compared with what the Dagster
instance and the files on disk hold. Screenshots: test-artifacts/ui/<test name>/.
"""

import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from ui_browser import Screenshots, shown_name_matches, wait_for, xpath_literal
from ui_servers import Server, free_port, running

REPO = Path(__file__).resolve().parents[2]
GROUPS = {
    "data": ["raw_corpus", "trimmed_wavs", "mel_shards"],
    "training": ["encoder_model"],
    "evaluation": ["evaluation_embeddings", "verification_report"],
}
TERMINAL_RUN_STATUSES = ("Success", "Failure", "Canceled")

pytestmark = [pytest.mark.ui, pytest.mark.slow]


@pytest.fixture(scope="module")
def dagster_ui(chromium_available: None, demo_registry: Path, artifacts_dir: Path,
               tmp_path_factory: pytest.TempPathFactory, ui_env: dict) -> Iterator[dict]:
    """`dagster dev` on a free 127.0.0.1 port, with the demo partition registered beforehand."""
    root = tmp_path_factory.mktemp("dagster_ui")
    home, work_dir = root / "dagster_home", root / "work"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {**ui_env, "DAGSTER_HOME": str(home), "SPKENC_WORK_DIR": str(work_dir), "SPKENC_CORPORA": str(demo_registry),
           "MLFLOW_TRACKING_URI": f"sqlite:///{work_dir / 'mlflow.db'}"}
    sync = subprocess.run([sys.executable, "-m", "pipelines.corpora", "sync"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert sync.returncode == 0, f"python -m pipelines.corpora sync failed:\n{sync.stderr[-3000:]}"
    port = free_port()
    command = [sys.executable, "-m", "dagster", "dev", "-m", "pipelines.definitions",
               "-h", "127.0.0.1", "-p", str(port)]
    server = Server("dagster dev", command, f"http://127.0.0.1:{port}/server_info", env, REPO,
                    artifacts_dir / "dagster_dev.log", stop_signal=signal.SIGINT, grace_s=30)
    with running(server, timeout_s=240):
        yield {"url": f"http://127.0.0.1:{port}", "home": home, "work_dir": work_dir}


def _open(driver: Any, url: str) -> None:
    """Open a page and dismiss the "Join the Dagster community" dialog of a fresh profile."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    try:
        skip = wait_for("the community dialog",
                        lambda: driver.find_element(By.XPATH, "//button[normalize-space()='Skip']"), 4)
    except TimeoutError:
        return
    skip.click()


def _collapsed_groups(driver: Any) -> dict[str, int]:
    """{group name: asset count} of the collapsed group boxes of the lineage graph.

    A box reads "data\\n3" once loaded, "data\\n3 assets (fetching statuses)" before.
    """
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, "[class*='CollapsedGroupNode_collapsedGroupNodeBox']")
    return {lines[0]: int(lines[-1].split()[0]) for lines in (box.text.split("\n") for box in boxes)}


_GRAPH_LAYOUT_JS = """
const out = {groups: [], assets: []};
for (const fo of document.querySelectorAll('svg foreignObject')) {
  const box = {x: +fo.getAttribute('x'), y: +fo.getAttribute('y'),
               w: +fo.getAttribute('width'), h: +fo.getAttribute('height')};
  const header = fo.querySelector('[class*="ExpandedGroupNode_groupNodeHeaderBox"] [data-tooltip]');
  const asset = fo.querySelector('[class*="AssetNode_assetName"]');
  if (header) out.groups.push({name: header.getAttribute('data-tooltip'), ...box});
  else if (asset) out.assets.push({name: asset.innerText.trim(), ...box});
}
return out;
"""


def _group_box(driver: Any, name: str) -> Any:
    """The collapsed box of group `name` on the lineage graph (None while not drawn)."""
    from selenium.webdriver.common.by import By

    boxes = driver.find_elements(By.CSS_SELECTOR, "[class*='CollapsedGroupNode_collapsedGroupNodeBox']")
    return next((b for b in boxes if b.text.split("\n")[0] == name), None)


def _asset_node_texts(driver: Any) -> dict[str, str]:
    """{asset name: the text of its node} for the asset nodes drawn in full (not minimal) on the graph."""
    from selenium.webdriver.common.by import By

    nodes = driver.find_elements(By.CSS_SELECTOR, "[class*='AssetNode_assetNodeContainer']")
    return {n.find_element(By.CSS_SELECTOR, "[class*='AssetNode_assetName']").text.strip(): n.text for n in nodes}


def _graph_menu(driver: Any, item: str, target: Any = None) -> None:
    """Right-click `target` (default: a blank corner of the graph) and choose `item` from the menu."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    actions = ActionChains(driver)
    if target is None:
        slider = driver.find_element(By.CSS_SELECTOR, "[class*='SVGViewport_zoomSliderContainer']")
        viewport = slider.find_element(By.XPATH, "..")
        width, height = viewport.size["width"], viewport.size["height"]
        # Offsets count from the centre: this is the bottom left corner, clear of the graph.
        actions.move_to_element_with_offset(viewport, -width // 2 + 60, height // 2 - 60)
    else:
        actions.move_to_element(target)
    actions.context_click().perform()
    menu_item = f"//*[@role='menu' or contains(@class, 'bp5-menu')]//*[normalize-space(text())={xpath_literal(item)}]"
    entry = wait_for(f"the menu item {item!r}", lambda: driver.find_element(By.XPATH, menu_item), 15)
    entry.click()


def _inside(inner: dict, outer: dict) -> bool:
    return (outer["x"] <= inner["x"] and inner["x"] + inner["w"] <= outer["x"] + outer["w"]
            and outer["y"] <= inner["y"] and inner["y"] + inner["h"] <= outer["y"] + outer["h"])


def test_asset_graph_shows_the_six_assets_in_their_groups(dagster_ui: dict, browser: Any, shots: Screenshots):
    from selenium.webdriver.common.by import By

    _open(browser, dagster_ui["url"] + "/")
    browser.find_element(By.XPATH, "//a[normalize-space()='Lineage']").click()
    collapsed = wait_for("three collapsed asset groups",
                         lambda: (c := _collapsed_groups(browser)) and len(c) == len(GROUPS) and c, 60)
    shots.take(browser, "lineage_groups")
    assert collapsed == {name: len(assets) for name, assets in GROUPS.items()}

    _graph_menu(browser, "Expand all groups")
    layout = wait_for("six asset nodes",
                      lambda: (g := browser.execute_script(_GRAPH_LAYOUT_JS)) and len(g["assets"]) == 6 and g, 30)
    shots.take(browser, "lineage_expanded")

    groups = {g["name"]: g for g in layout["groups"]}
    assert sorted(groups) == sorted(GROUPS), f"group boxes shown: {sorted(groups)}"
    for group, assets in GROUPS.items():
        for asset in assets:
            shown = [a for a in layout["assets"] if shown_name_matches(a["name"], asset)]
            assert len(shown) == 1, f"{asset}: nodes shown {[a['name'] for a in layout['assets']]}"
            assert _inside(shown[0], groups[group]), f"{asset} is drawn outside the {group!r} group box"


def _run_status(driver: Any) -> str:
    """The status tag at the top of a run page ('' while none shows)."""
    from selenium.webdriver.common.by import By

    tags = driver.find_elements(By.CSS_SELECTOR, ".BaseTag")
    texts = [t.text.strip() for t in tags[:6]]
    return next((t for t in texts if t in TERMINAL_RUN_STATUSES or t in ("Queued", "Starting", "Started")), "")


def _launch_data_assets(driver: Any, shots: Screenshots) -> str:
    """Right-click the data group, choose "Materialize assets (3)", pick demo_tiny, launch; return the run page URL."""
    from selenium.webdriver.common.by import By

    data_box = wait_for("the collapsed data group", lambda: _group_box(driver, "data"), 60)
    _graph_menu(driver, f"Materialize assets ({len(GROUPS['data'])})", target=data_box)
    dialog = wait_for("the launch dialog", lambda: driver.find_element(By.CSS_SELECTOR, "[role='dialog']"), 30)
    assert "Launch runs to materialize 3 assets" in dialog.text
    dialog.find_element(By.XPATH, ".//*[contains(text(), 'Select a partition')]").click()
    option = wait_for("the demo_tiny partition option", lambda: driver.find_element(By.XPATH, "//*[@title='demo_tiny']"), 15)
    option.click()
    launch = wait_for("the 'Launch 1 run' button",
                      lambda: dialog.find_element(By.XPATH, ".//button[normalize-space()='Launch 1 run']"), 15)
    shots.take(driver, "launch_dialog")
    launch.click()
    view = wait_for("the 'Launched run' toast", lambda: driver.find_element(
        By.XPATH, "//*[contains(@class, 'Toaster')]//a[contains(@href, '/runs/')]"), 30)
    shots.take(driver, "launched")
    return view.get_attribute("href")


def _wait_for_run(driver: Any, run_url: str, timeout_s: float) -> str:
    """Watch the run page until the run ends (reloading now and then); return its status."""
    driver.get(run_url)
    status = ""

    def ended() -> str:
        nonlocal status
        status = _run_status(driver)
        if status in TERMINAL_RUN_STATUSES:
            return status
        return ""

    waited = 0.0
    while waited < timeout_s:
        try:
            return wait_for("the run to end", ended, timeout_s=min(30.0, timeout_s - waited), every_s=1.0)
        except TimeoutError:
            waited += 30.0
            driver.refresh()
    raise TimeoutError(f"{run_url}: the run had not ended after {timeout_s:.0f} s (status {status!r})")


def _metadata_row(driver: Any, key: str) -> str:
    """The value cell of metadata entry `key` in the asset page's metadata table."""
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.XPATH, f"//tr[td[1][normalize-space()={xpath_literal(key)}]]")
    return row.find_elements(By.TAG_NAME, "td")[-1].text.strip()


def test_data_assets_materialize_from_the_ui_and_mel_shards_shows_metadata_and_checks(
    dagster_ui: dict, browser: Any, shots: Screenshots, demo_dir: Path
):
    import dagster as dg
    from selenium.webdriver.common.by import By

    from pipelines.assets.data import mel_shards

    _open(browser, dagster_ui["url"] + "/asset-groups")
    run_url = _launch_data_assets(browser, shots)
    status = _wait_for_run(browser, run_url, timeout_s=480)
    shots.take(browser, "run_finished")
    run_id = run_url.rstrip("/").rsplit("/", 1)[-1]
    with dg.DagsterInstance.from_config(str(dagster_ui["home"])) as instance:
        run = instance.get_run_by_id(run_id)
        assert run is not None, f"the UI linked to run {run_id}, which the instance does not hold"
        assert status == "Success", f"run {run_id} ended {status} ({run.status}); see {shots.folder}"
        assert run.status == dg.DagsterRunStatus.SUCCESS and run.tags.get("dagster/partition") == "demo_tiny"
        assert sorted(k.to_user_string() for k in run.asset_selection) == sorted(GROUPS["data"])
        event = instance.get_latest_materialization_event(dg.AssetKey("mel_shards"))
        assert event is not None and event.run_id == run_id
        metadata = event.asset_materialization.metadata
        checks = {spec.name: instance.get_latest_asset_check_evaluation_record(spec.key)
                  for spec in mel_shards.check_specs}

    shards = sorted((dagster_ui["work_dir"] / "mels" / "demo_tiny").glob("*.parquet"))
    speakers = sorted(p.name for p in demo_dir.iterdir() if p.is_dir())
    assert [p.stem for p in shards] == speakers, "one mel shard per demo speaker"

    _open(browser, dagster_ui["url"] + "/assets/mel_shards")
    wait_for("the metadata table", lambda: _metadata_row(browser, "n_speakers"), 60)
    shots.take(browser, "mel_shards_overview")
    assert _metadata_row(browser, "n_speakers") == str(len(speakers)) == str(metadata["n_speakers"].value)
    for key, value in metadata.items():
        if isinstance(value, (dg.IntMetadataValue, dg.PathMetadataValue)):
            shown = _metadata_row(browser, key)
            expected = str(value.value) if isinstance(value, dg.IntMetadataValue) else value.path
            assert shown == expected, f"metadata {key}: the UI shows {shown!r}, the instance holds {expected!r}"

    browser.find_element(By.XPATH, "//a[normalize-space()='Checks']").click()
    heading = wait_for("the check list", lambda: browser.find_element(
        By.XPATH, "//span[starts-with(normalize-space(.), 'Checks (')]"), 30)
    assert heading.text.strip() == f"Checks ({len(checks)})"
    shots.take(browser, "mel_shards_checks")
    for name, record in checks.items():
        assert record is not None and record.run_id == run_id, f"check {name} has no evaluation from run {run_id}"
        # The list shows each check's name, and under it its latest result: Succeeded or Failed.
        shown = browser.find_element(By.XPATH, f"//div[@title={xpath_literal(name)}]/following-sibling::span[1]").text
        assert shown.upper() == record.status.value, f"check {name}: the UI shows {shown!r}, the instance {record.status}"

    # Back on the lineage graph, the data group now shows its partition filled.
    _open(browser, dagster_ui["url"] + "/asset-groups")
    data_box = wait_for("the collapsed data group", lambda: _group_box(browser, "data"), 60)
    _graph_menu(browser, "Filter to this group", target=data_box)
    filled = wait_for("the data assets' partition status", lambda: (nodes := _asset_node_texts(browser))
                      and all("100% filled" in nodes.get(a, "") for a in GROUPS["data"]) and nodes, 60)
    assert sorted(filled) == sorted(GROUPS["data"])
    shots.take(browser, "data_group_materialized")
