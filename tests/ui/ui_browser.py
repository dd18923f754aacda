"""Headless Debian Chromium driven by Selenium, and small helpers to read what a page shows.

Selenium gets explicit paths to /usr/bin/chromium and /usr/bin/chromedriver, so it never runs
Selenium Manager and never downloads a browser or a driver. Selenium is imported inside the
functions: this module must import (for its doctests) where Selenium is absent.
"""

import contextlib
import logging
import os
import signal
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, TypeVar

log = logging.getLogger(__name__)

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WINDOW = (1920, 1200)
# Flags for a root user in a container with no network: no sandbox (root), no GPU, and none of
# the background traffic (component updates, sync, QUIC) that would try to reach the internet.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)

T = TypeVar("T")


def missing_browser_parts() -> list[str]:
    """What the UI tests lack: the Debian packages' binaries or the `selenium` package."""
    missing = [f"{path} (apt-get install -y {package})" for path, package in
               ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")) if not path.is_file()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the Python package selenium (pip install -e '.[test]')")
    return missing


def running_in_ci(env: Mapping[str, str] = os.environ) -> bool:
    """True where the CI runner sets CI (to anything but '', 0 or false).

    >>> running_in_ci({"CI": "true"}), running_in_ci({"CI": "false"}), running_in_ci({})
    (True, False, False)
    """
    return env.get("CI", "").strip().lower() not in ("", "0", "false")


def browser_verdict(missing: list[str], env: Mapping[str, str] = os.environ) -> Optional[tuple[str, str]]:
    """None when the browser stack is complete, else ("fail" in CI or "skip" elsewhere, the reason).

    >>> browser_verdict([], {"CI": "true"}) is None
    True
    >>> browser_verdict(["/usr/bin/chromium (apt-get install -y chromium)"], {"CI": "true"})
    ('fail', 'the UI tests need /usr/bin/chromium (apt-get install -y chromium); CI must install them (see .ci/run)')
    >>> browser_verdict(["/usr/bin/chromium (apt-get install -y chromium)"], {})[0]
    'skip'
    """
    if not missing:
        return None
    reason = "the UI tests need " + "; ".join(missing)
    if running_in_ci(env):
        return "fail", reason + "; CI must install them (see .ci/run)"
    return "skip", reason


def start_chromium(user_data_dir: Path) -> Any:
    """A headless Chromium WebDriver with a fresh profile in `user_data_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    # Its own session, so chromedriver and the Chromium processes it starts form one process
    # group that `quit_chromium` can clean up by id.
    service = Service(executable_path=str(CHROMEDRIVER), popen_kw={"start_new_session": True})
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(60)
    return driver


def quit_chromium(driver: Any) -> None:
    """Close the browser, then end what is left of chromedriver's process group."""
    from ui_servers import group_members

    pgid = driver.service.process.pid
    try:
        driver.quit()
    finally:
        for pid in group_members(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_for(what: str, probe: Callable[[], Optional[T]], timeout_s: float = 30.0, every_s: float = 0.5) -> T:
    """Poll `probe` until it returns a truthy value and return it; TimeoutError names `what`.

    Exceptions from `probe` count as "not yet" (the page is still rendering), and the last one
    is named in the error.

    >>> wait_for("a number", lambda: 3)
    3
    >>> wait_for("nothing", lambda: None, timeout_s=0.05, every_s=0.01)
    Traceback (most recent call last):
    ...
    TimeoutError: nothing: not shown after 0 s
    """
    deadline = time.monotonic() + timeout_s
    last_error: Optional[BaseException] = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except Exception as error:  # noqa: BLE001 - the page may be mid-render; retried below
            last_error = error
        if time.monotonic() >= deadline:
            reason = f" (last error: {type(last_error).__name__}: {last_error})" if last_error else ""
            raise TimeoutError(f"{what}: not shown after {timeout_s:.0f} s{reason}")
        time.sleep(every_s)


def xpath_literal(text: str) -> str:
    """`text` as an XPath 1.0 string literal (XPath has no escapes).

    >>> xpath_literal("data")
    "'data'"
    >>> xpath_literal("it's")
    '"it\\'s"'
    """
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text:
        return f'"{text}"'
    parts = text.split("'")
    return "concat(" + ", \"'\", ".join(f"'{p}'" for p in parts) + ")"


def shown_name_matches(shown: str, full: str) -> bool:
    """Whether a label that the UI may have middle-truncated ('evalua…_embeddings') is `full`.

    >>> shown_name_matches("evalua…_embeddings", "evaluation_embeddings")
    True
    >>> shown_name_matches("mel_shards", "mel_shards")
    True
    >>> shown_name_matches("evalua…_embeddings", "evaluation_report")
    False
    """
    if "…" not in shown:
        return shown == full
    head, tail = shown.split("…", 1)
    return full.startswith(head) and full.endswith(tail) and len(full) > len(head) + len(tail)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels from a PNG file's IHDR chunk.

    >>> import tempfile, zlib
    >>> ihdr = struct.pack(">IIBBBBB", 600, 500, 8, 2, 0, 0, 0)
    >>> chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    >>> with tempfile.NamedTemporaryFile(suffix=".png", delete=False) as f:
    ...     _ = f.write(b"\\x89PNG\\r\\n\\x1a\\n" + chunk)
    >>> png_size(Path(f.name))
    (600, 500)
    """
    header = path.read_bytes()[:24]
    if header[:8] != b"\x89PNG\r\n\x1a\n" or header[12:16] != b"IHDR":
        raise ValueError(f"{path}: not a PNG file")
    width, height = struct.unpack(">II", header[16:24])
    return int(width), int(height)


class Screenshots:
    """Numbered screenshots of one test, in their own folder under test-artifacts/ui."""

    def __init__(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self.folder = folder
        self.n_taken = 0

    def take(self, driver: Any, name: str) -> Path:
        """Save the current page as `NN_<name>.png` and return its path."""
        self.n_taken += 1
        path = self.folder / f"{self.n_taken:02d}_{name}.png"
        if not driver.save_screenshot(str(path)):
            raise OSError(f"{path}: Chromium did not write the screenshot")
        log.info("screenshot %s", path)
        return path

    def save_failure(self, driver: Any) -> None:
        """The page as it was when the test failed: a screenshot and its HTML."""
        driver.save_screenshot(str(self.folder / "FAILED.png"))
        (self.folder / "FAILED.html").write_text(driver.page_source)
