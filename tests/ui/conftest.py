"""Fixtures of the browser tests: headless Chromium, screenshots under test-artifacts/ui.

Where Chromium, chromedriver or Selenium is missing, the UI tests fail with the install command
in CI (env CI set) and skip with that reason elsewhere.
"""

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from ui_browser import Screenshots, browser_verdict, missing_browser_parts, quit_chromium, start_chromium

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "ui"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    # Keep each phase's report on the test item, so fixtures can tell a failed test in teardown.
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session")
def chromium_available() -> None:
    """Fail (CI) or skip (elsewhere) when the browser stack is not installed."""
    verdict = browser_verdict(missing_browser_parts())
    if verdict is None:
        return
    outcome, reason = verdict
    if outcome == "fail":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """test-artifacts/ui: screenshots and server logs of the UI tests (gitignored)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def ui_env() -> dict:
    """The environment of the servers: this one, with the usage reporting of both tools off."""
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
            "DAGSTER_DISABLE_TELEMETRY": "true"}


@pytest.fixture(scope="session")
def demo_registry(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus registry with only the committed demo corpus, whatever corpora.yaml holds."""
    path = tmp_path_factory.mktemp("registry") / "corpora.yaml"
    path.write_text(
        "corpora:\n"
        "  demo_tiny:\n"
        f"    root: {demo_dir}\n"
        "    layout: speaker_folders\n"
        "    role: train\n"
        "    heldout_fraction: 0.2\n"
    )
    return path


@pytest.fixture
def shots(request: pytest.FixtureRequest, artifacts_dir: Path) -> Screenshots:
    """Numbered screenshots of this test, in test-artifacts/ui/<test name>/."""
    return Screenshots(artifacts_dir / request.node.name)


@pytest.fixture
def browser(request: pytest.FixtureRequest, chromium_available: None, shots: Screenshots,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh headless Chromium (new profile); on failure the page is saved next to the screenshots."""
    driver = start_chromium(tmp_path_factory.mktemp("chromium_profile"))
    try:
        yield driver
    finally:
        try:
            if _failed(request):
                shots.save_failure(driver)
        finally:
            quit_chromium(driver)
