"""`digits discord-sync`: the command definitions Discord receives, what it reports, and readable failures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from config.settings import get_settings
from tests.fake_discord import FakeDiscord, Scripted, rate_limited
from worker.cli import main


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeDiscord]:
    server = FakeDiscord().start()
    yield server
    server.stop()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def sync(
    fake: FakeDiscord, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Result]:
    """Runs `digits discord-sync ARGS` (the console script's `main`) against the fake Discord."""

    def run(*args: str, token: str = "bot-secret") -> Result:
        monkeypatch.setenv("DISCORD_APPLICATION_ID", "424242")
        monkeypatch.setenv("DISCORD_BOT_TOKEN", token)
        monkeypatch.setenv("DISCORD_API_BASE", fake.api_base)
        get_settings.cache_clear()
        try:
            code = main(["discord-sync", *args])
        finally:
            get_settings.cache_clear()
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def test_guild_sync_puts_the_commands_and_reports_what_changed(fake: FakeDiscord, sync: Callable[..., Result]) -> None:
    fake.reset()
    first = sync("--guild", "777")
    assert first.returncode == 0, first.stderr
    assert "guild 777" in first.stdout
    assert "added: /train, /read" in first.stdout
    put = fake.calls_to("PUT", r"^/applications/424242/guilds/777/commands$")
    assert len(put) == 1
    assert put[0].headers["authorization"] == "Bot bot-secret"
    assert put[0].headers["user-agent"].startswith("DiscordBot (")
    commands = {c["name"]: c for c in put[0].json()}
    assert set(commands) == {"train", "read"}
    train_options = {o["name"]: o for o in commands["train"]["options"]}
    epochs = train_options["epochs"]
    assert (epochs["type"], epochs["required"], epochs["min_value"], epochs["max_value"]) == (4, False, 1, 20)
    assert train_options["augment"]["type"] == 5 and train_options["augment"]["required"] is False
    image = commands["read"]["options"][0]
    assert (image["name"], image["type"], image["required"]) == ("image", 11, True)
    for c in put[0].json():
        assert 1 <= len(c["description"]) <= 100 and c["name"].islower()

    again = sync("--guild", "777")
    assert again.returncode == 0
    assert "unchanged: /train, /read" in again.stdout and "added" not in again.stdout


def test_global_sync_overwrites_and_names_removed_commands(fake: FakeDiscord, sync: Callable[..., Result]) -> None:
    fake.reset()
    fake.commands["global"] = [{"id": "1", "type": 1, "name": "old", "description": "gone soon"},
                               {"id": "2", "type": 1, "name": "read", "description": "outdated text", "options": []}]
    result = sync()
    assert result.returncode == 0, result.stderr
    assert "global" in result.stdout
    assert "removed: /old" in result.stdout and "updated: /read" in result.stdout and "added: /train" in result.stdout
    assert len(fake.calls_to("PUT", r"^/applications/424242/commands$")) == 1


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (Scripted(401, {"message": "401: Unauthorized", "code": 0}), "DISCORD_BOT_TOKEN"),
        (Scripted(403, {"message": "Missing Access", "code": 50001}), "applications.commands"),
        (rate_limited(12.5), "try again in 12.5 s"),
        (Scripted(400, {"message": "Invalid Form Body", "code": 50035,
                        "errors": {"0": {"name": {"_errors": [{"code": "BASE_TYPE_BAD_LENGTH"}]}}}}),
         "BASE_TYPE_BAD_LENGTH"),
    ],
)
def test_refusals_fail_with_a_readable_message(fake: FakeDiscord, sync: Callable[..., Result], answer: Scripted,
                                               expected: str) -> None:
    fake.reset()
    fake.script("PUT", r"/commands$", answer)
    result = sync("--guild", "777")
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(fake.calls_to("PUT", r"/commands$")) == 1, "a refusal is not retried"


def test_missing_configuration_is_explained(fake: FakeDiscord, sync: Callable[..., Result]) -> None:
    result = sync(token="")
    assert result.returncode == 1
    assert "DISCORD_BOT_TOKEN is not set" in result.stderr
    bad_guild = sync("--guild", "my-server")
    assert bad_guild.returncode == 1 and "numeric guild id" in bad_guild.stderr
