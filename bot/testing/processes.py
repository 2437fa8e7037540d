"""Bot server processes for tests and benchmarks: `python -m bot serve` as a PaaS would run it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

__all__ = ["BotProcess", "free_port", "interrupt", "run_cli"]


def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` to the end, with `env` on top of this process's environment minus the bot's
    own variables (a developer's DATABASE_URL or BOT_TOKEN must not leak into a test's command) and the
    terminal's size: the output is captured, not shown on a terminal (pytest-xdist's workers were seen to
    inherit a COLUMNS=80 set at the C level, as readline does, cutting `dead-letters`' table to 80)."""
    leaks = ("DATABASE_URL", "BOT_TOKEN", "WEBHOOK_SECRET", "COLUMNS", "LINES")
    clean = {k: v for k, v in os.environ.items() if k not in leaks}
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def interrupt(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    """Ctrl-C (SIGINT) and wait for the exit; returns the exit status. One still running after `timeout`
    is killed before TimeoutExpired is raised: a `poll` left behind would go on long-polling the test
    worker's fake Bot API, confirming (so dropping) the updates of the tests after it."""
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class BotProcess:
    """One `python -m bot serve` on a free loopback port, with its output kept in a log file.

    `command` runs another server with the same environment contract instead (the benchmark's grammY bot).
    """

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        port: int | None = None,
        *,
        python: str = sys.executable,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        """`python` and `cwd`: another installation of the bot (a clean venv with the wheel), run from a
        folder where `python -m bot` cannot pick up the checkout instead."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._env = {**os.environ, **env, "HOST": "127.0.0.1", "PORT": str(self.port)}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            list(command) if command is not None else [python, "-m", "bot", "serve"],
            env=self._env,
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group, so that `kill` and `close` reach what it started too: a command run
            # through `sh -c` (a platform's command line) leaves the shell as the parent of the bot, and
            # killing only the shell left the bot serving after its test (seen in a CI run).
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bot exited with {self.proc.returncode}:\n{self.output()[-5000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"bot not ready within {timeout} s:\n{self.output()[-5000:]}")

    def output(self) -> str:
        """Everything the process logged (its stdout and stderr)."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def logged(self, text: str, timeout: float = 10.0) -> str:
        """The output once it holds `text`. The bot writes its lines from a queue (bot.logs), so a line
        logged before /readyz answered may still be on its way to the file when wait_ready returns: a
        clean-clone CI run read the log without uvicorn's 'Started server process' line so."""
        deadline = time.monotonic() + timeout
        while text not in (output := self.output()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{text!r} not logged within {timeout} s:\n{output[-5000:]}")
            time.sleep(0.05)
        return output

    def kill(self) -> None:
        """SIGKILL to the process and everything it started: no shutdown code runs, as when a PaaS host
        dies."""
        with contextlib.suppress(ProcessLookupError):  # (all of them gone already)
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 30.0, signum: int = signal.SIGTERM) -> int:
        """SIGTERM (or `signum`: Fly sends SIGINT unless told otherwise), as a platform sends before stopping
        a process; returns the exit status."""
        self.proc.send_signal(signum)
        return self.proc.wait(timeout)

    def close(self) -> None:
        # Even when the process itself has exited: what it started may still run.
        self.kill()
        self._log.close()

    def __enter__(self) -> BotProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
