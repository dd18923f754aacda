"""Issue 7, part 5: the Dagster webserver and the MLflow server listen on 127.0.0.1 only,
both in every command README.md shows and by default."""

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hostile_corpus import REPO, child_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ui"))
from ui_servers import group_members  # noqa: E402

SERVER = re.compile(r"\b(dagster dev|dagster-webserver|mlflow ui|mlflow server)\b")
BIN = Path(sys.executable).parent


def readme_server_commands() -> list[str]:
    """Every server command inside a fenced block of README.md, continuation lines joined."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            if SERVER.search(line):
                commands.append(" ".join(line.split()))
    return commands


def test_every_server_command_in_the_readme_binds_to_localhost():
    commands = readme_server_commands()
    assert commands, "README.md shows no server command"
    for command in commands:
        words = shlex.split(command)
        hosts = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-h", "--host")]
        hosts += [w.split("=", 1)[1] for w in words if w.startswith("--host=")]
        assert hosts == ["127.0.0.1"], f"README.md shows {command!r}: it must pass --host 127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the sockets in LISTEN state on `port`, from /proc/net/tcp{,6}."""
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
            else:  # four little-endian 32-bit words
                words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def _server_commands(tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, argv) for each README command and for both servers with no host given."""
    port = "{port}"
    runs = [("mlflow server, default host", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp}/m.db",
                                             "--port", port, "--workers", "1"]),
            ("dagster-webserver, default host", [str(BIN / "dagster-webserver"), "-m", "pipelines.definitions", "-p", port])]
    for command in readme_server_commands():
        # The variables the README's commands use, pointed into the test's folder (unexpanded,
        # MLflow would make a folder literally named "$SPKENC_WORK_DIR" in the repository).
        for variable, value in (("$SPKENC_WORK_DIR", tmp / "work"), ("$PWD/work", tmp), ("$PWD", tmp)):
            command = command.replace(variable, str(value))
        words = shlex.split(command)
        words = [port if re.fullmatch(r"\d{4,5}", w) and words[i - 1] in ("-p", "--port") else w for i, w in enumerate(words)]
        if "-p" not in words and "--port" not in words:
            words += ["--port", port]
        if words[0] == "dagster" and "-m" not in words:
            words += ["-m", "pipelines.definitions"]
        runs.append((f"README: {command}", [str(BIN / words[0]), *words[1:]]))
    return runs


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group this test started (the server and its workers), then SIGKILL
    whatever of the group is still alive 15 s later.

    The whole group is waited for, not only its leader: `dagster dev` can exit on SIGTERM
    before its code server does, which a wait on the leader alone would leave running."""
    if proc.poll() is None or group_members(proc.pid):
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while (proc.poll() is None or group_members(proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def processes_started_under(folder: Path) -> list[int]:
    """Pids of live processes whose environment names `folder` (our servers and their helpers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(folder).encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_server_commands(Path("/tmp")))),
                         ids=[name for name, _ in _server_commands(Path("/tmp"))])
def test_the_server_listens_on_localhost_only(index, tmp_path):
    name, argv = _server_commands(tmp_path)[index]
    port = _free_port()
    argv = [w.replace("{port}", str(port)) for w in argv]
    (tmp_path / "dagster_home").mkdir()
    env = child_env(DAGSTER_HOME=str(tmp_path / "dagster_home"), SPKENC_WORK_DIR=str(tmp_path / "work"),
                    MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path}/m.db")
    log = tmp_path / "server.log"
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not listening_addresses(port) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        addresses = listening_addresses(port)
        assert addresses, f"{name}: nothing listens on port {port}: {log.read_text()[-3000:]}"
        assert addresses == {"127.0.0.1"}, f"{name} listens on {addresses}"
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        _stop(proc)
    deadline = time.monotonic() + 15
    while processes_started_under(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_started_under(tmp_path) == [], f"{name}: processes left running after the stop"
