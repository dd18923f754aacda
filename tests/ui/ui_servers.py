"""Servers for the UI tests: subprocesses in their own process group, stopped by that group's id.

`dagster dev` and `mlflow server` each start a tree of processes (webserver, daemon, code
server, run workers; uvicorn and its job consumer). Starting the server with
`start_new_session=True` puts the whole tree in one process group whose id is the leader's PID,
so `stop()` can end exactly that tree, and never a process of another test or helper.
"""

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

log = logging.getLogger(__name__)

# Local servers are reached directly, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerError(RuntimeError):
    """A server did not come up; the message names the command, the reason and the log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now.

    >>> 1024 <= free_port() <= 65535
    True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, n_chars: int = 4000) -> str:
    """The last `n_chars` characters of a text file ('' when it does not exist)."""
    if not path.is_file():
        return ""
    return path.read_text(errors="replace")[-n_chars:]


def group_members(pgid: int) -> list[int]:
    """PIDs of the live (non-zombie) processes in process group `pgid`, from /proc.

    >>> os.getpid() in group_members(os.getpgid(0))
    True
    """
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        # Fields after the command name, which may itself hold spaces and parentheses.
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(stat.parent.name))
    return members


def _restore_sigint() -> None:
    # A shell's background job inherits SIGINT as ignored; Python then never raises
    # KeyboardInterrupt, and `dagster dev` would ignore the graceful stop below.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """One server process tree, bound to 127.0.0.1, with its output in `log_path`.

    `stop_signal` goes to the leader first (SIGINT makes `dagster dev` shut its children down
    cleanly); whatever is left of the group after `grace_s` gets SIGTERM, then SIGKILL.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        ready_url: str,
        env: Mapping[str, str],
        cwd: Path,
        log_path: Path,
        stop_signal: int = signal.SIGTERM,
        grace_s: float = 20.0,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.ready_url = ready_url
        self.env = dict(env)
        self.cwd = cwd
        self.log_path = log_path
        self.stop_signal = stop_signal
        self.grace_s = grace_s
        self.process: Optional[subprocess.Popen] = None

    @property
    def pgid(self) -> int:
        """The process group id: the leader's PID (it called setsid)."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def start(self, timeout_s: float = 120.0) -> "Server":
        """Start the server and wait until `ready_url` answers HTTP 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_restore_sigint,
            )
        log.info("%s: started pid %d: %s", self.name, self.process.pid, " ".join(self.command))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"{self.name} exited with code {self.process.returncode} before "
                                  f"{self.ready_url} answered:\n{log_tail(self.log_path)}")
            try:
                with _DIRECT.open(self.ready_url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise ServerError(f"{self.name}: {self.ready_url} did not answer within {timeout_s:.0f} s:\n"
                          f"{log_tail(self.log_path)}")

    def live_members(self) -> list[int]:
        """PIDs of the group's processes that are not zombies (read from /proc)."""
        return group_members(self.pgid)

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def stop(self) -> None:
        """Stop the leader gracefully, then end whatever is left of its process group."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s: pid %d ignored signal %d for %.0f s",
                            self.name, self.pgid, self.stop_signal, self.grace_s)
        # Children the leader did not take down (run workers, job consumers), and the leader
        # itself if it hung: TERM, a short wait, then KILL.
        if self.live_members():
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + 5.0
            while self.live_members() and time.monotonic() < deadline:
                time.sleep(0.2)
        if self.live_members():
            self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        log.info("%s: stopped process group %d", self.name, self.pgid)


@contextlib.contextmanager
def running(server: Server, timeout_s: float = 120.0) -> Iterator[Server]:
    """Start `server`, yield it, and stop it on the way out, also when starting or the body fails."""
    try:
        yield server.start(timeout_s)
    finally:
        server.stop()
