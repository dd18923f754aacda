"""The harness of the UI tests. Servers: one that dies early or never answers is reported with its
log and stopped, and stopping a server ends its whole process group (children included) and
nothing else. Browser: a missing Chromium or chromedriver is named with its install command.
Needs no browser, so it runs everywhere."""

import os
import signal
import sys
from pathlib import Path

import pytest

import ui_browser
from ui_servers import Server, ServerError, free_port, group_members, running


def _http_server_with_child(tmp_path: Path, port: int) -> Server:
    # A shell that leaves a long sleep in the background, then becomes an HTTP server: the
    # process tree that `dagster dev` makes, in miniature (a leader and a child it started).
    script = f"sleep 300 & exec {sys.executable} -m http.server --bind 127.0.0.1 {port}"
    return Server("http.server", ["sh", "-c", script], f"http://127.0.0.1:{port}/", os.environ,
                  tmp_path, tmp_path / "http.log", stop_signal=signal.SIGTERM, grace_s=5)


def test_stop_ends_the_leader_and_its_children(tmp_path: Path):
    server = _http_server_with_child(tmp_path, free_port())
    with running(server, timeout_s=30):
        members = group_members(server.pgid)
        assert server.pgid in members and len(members) == 2, f"expected the server and its sleep child: {members}"
        assert os.getpid() not in members, "the server must run in its own process group"
    assert group_members(server.pgid) == [], "a process of the stopped server's group survived"
    assert server.process.returncode is not None


def test_a_server_that_exits_early_is_reported_with_its_code_and_log(tmp_path: Path):
    port = free_port()
    command = [sys.executable, "-c", "import sys; print('bad config: no such store'); sys.exit(3)"]
    server = Server("broken", command, f"http://127.0.0.1:{port}/", os.environ, tmp_path, tmp_path / "broken.log")
    with pytest.raises(ServerError, match=r"broken exited with code 3 .*\n.*bad config: no such store"):
        with running(server, timeout_s=30):
            pass
    assert group_members(server.pgid) == []


def test_a_server_that_never_answers_times_out_and_is_stopped(tmp_path: Path):
    port = free_port()
    server = Server("silent", [sys.executable, "-c", "import time; time.sleep(300)"], f"http://127.0.0.1:{port}/",
                    os.environ, tmp_path, tmp_path / "silent.log", grace_s=5)
    with pytest.raises(ServerError, match=rf"silent: http://127.0.0.1:{port}/ did not answer within 2 s"):
        with running(server, timeout_s=2):
            pass
    assert group_members(server.pgid) == [], "the timed-out server must be stopped too"


def test_a_missing_chromium_or_driver_is_named_with_its_package(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(ui_browser, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setattr(ui_browser, "CHROMEDRIVER", tmp_path / "no-chromedriver")
    missing = ui_browser.missing_browser_parts()
    assert f"{tmp_path / 'no-chromium'} (apt-get install -y chromium)" in missing
    assert f"{tmp_path / 'no-chromedriver'} (apt-get install -y chromium-driver)" in missing
    outcome, reason = ui_browser.browser_verdict(missing, {"CI": "true"})
    assert outcome == "fail" and "no-chromium" in reason and "no-chromedriver" in reason
    assert ui_browser.browser_verdict(missing, {})[0] == "skip"
