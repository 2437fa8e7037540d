"""What a first `serve` on a new machine meets before it serves: a port something else already holds, a
HOST that is not this machine's, a data folder the embedded PostgreSQL cannot use. Each is one line naming
what to change, never a traceback nor a log line of uvicorn's naming no setting."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bot.testing.processes import free_port
from bot.testing.processes import run_cli as bot

# Never reached: the listening check comes first, so that nothing (a database started, a webhook
# registered) is done for a process that could not serve anyway.
UNREACHABLE = "postgresql://nobody@127.0.0.1:9/none"


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process listens on (the developer's other server on 8000, say)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_port_in_use_stops_serve_in_one_line_naming_port(busy_port: int) -> None:
    result = bot("serve", env={"DATABASE_URL": UNREACHABLE, "PORT": str(busy_port)})
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"bot: PORT: cannot listen on 127.0.0.1:{busy_port}: ")
    assert "in use" in result.stderr


def test_a_port_in_use_given_on_the_command_line_names_the_option(busy_port: int) -> None:
    result = bot("serve", "--port", str(busy_port), env={"DATABASE_URL": UNREACHABLE})
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"bot: --port: cannot listen on 127.0.0.1:{busy_port}: ")


def test_a_metrics_port_in_use_stops_serve_in_one_line_naming_metrics_port(busy_port: int) -> None:
    env = {"DATABASE_URL": UNREACHABLE, "PORT": str(free_port()), "METRICS_PORT": str(busy_port)}
    result = bot("serve", env=env)
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"bot: METRICS_PORT: cannot listen on 127.0.0.1:{busy_port}: ")


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])
def test_a_host_this_machine_cannot_listen_on_stops_serve_in_one_line_naming_host(host: str) -> None:
    result = bot("serve", env={"DATABASE_URL": UNREACHABLE, "HOST": host, "PORT": str(free_port())})
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"bot: HOST: cannot listen on {host}:")


@pytest.mark.parametrize("port", ["0", "70000"])
def test_a_port_option_out_of_range_is_refused_by_the_parser_not_a_traceback(port: str) -> None:
    result = bot("serve", "--port", port, env={"DATABASE_URL": UNREACHABLE})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("bot serve: error: argument --port: ")


@pytest.mark.parametrize(
    ("folder", "cause"),
    [
        # Under a file, not a folder: as with a typo'd path, or one the user cannot write to.
        ("a-file/pg", "File exists"),
        # A folder of the user's own (initdb refuses it in twenty lines).
        ("documents", "it holds files but no PostgreSQL data"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_an_embedded_data_folder_that_cannot_be_used_is_one_line_naming_embedded_pg_dir(
    command: str, folder: str, cause: str, tmp_path: Path
) -> None:
    (tmp_path / "a-file").write_text("")
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "notes.txt").write_text("mine")
    data_dir = tmp_path / folder
    env = {"DATABASE_URL": "", "BOT_TOKEN": "", "EMBEDDED_PG_DIR": str(data_dir), "PORT": str(free_port())}
    result = bot(command, env=env)
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith(f"bot: EMBEDDED_PG_DIR: cannot start the embedded PostgreSQL in {data_dir}: ")
    assert cause in line
    assert (tmp_path / "documents" / "notes.txt").read_text() == "mine"
