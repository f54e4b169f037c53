"""The Discord edge against strangers: stale signatures, attachments from elsewhere, a flood of /read.

Real Ed25519 signatures, the real app on loopback, the fake Discord (API and CDN) on loopback, and a
second fake standing for any other server an attacker could name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from config.settings import DEFAULT_DISCORD_ATTACHMENT_ORIGINS, Settings
from tests.discord_support import Signer, read_command, settings_for, snowflake
from tests.fake_discord import FakeDiscord, Scripted
from tests.images import draw_digit, encode
from tests.serving_support import install_model
from tests.support import ServedApp, serve

PNG = encode(draw_digit("7"))
NOT_CDN = "I only download attachments from Discord's own CDN"


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[FakeDiscord]:
    """Another server on loopback, on another origin (a port is part of the origin)."""
    server = FakeDiscord().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(fake: FakeDiscord, signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    data_dir: Path = tmp_path_factory.mktemp("discord-edge")
    install_model(data_dir, forced_digit=7)
    served = serve(settings_for(signer, fake.api_base, data_dir=data_dir, api={"model_poll_s": 0}))
    yield served
    served.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeDiscord, elsewhere: FakeDiscord) -> None:
    fake.reset()
    elsewhere.reset()


def read_text(api: ServedApp, signer: Signer, fake: FakeDiscord, url: str, *, user_id: str | None = None) -> str:
    token = f"tok-{snowflake()}"
    response = api.post(signer, read_command(url, user_id=user_id or snowflake(), size=len(PNG), token=token))
    assert response.json()["type"] == 5, response.json()
    text: str = fake.wait_for("PATCH", rf"^/webhooks/424242/{token}/messages/@original$", timeout=15)[-1].json()[
        "content"]
    return text


# --- the signed timestamp ------------------------------------------------------------------------------


def test_the_timestamp_window_is_on_by_default(fake: FakeDiscord, signer: Signer) -> None:
    assert Settings(_env_file=None).discord_timestamp_max_age_s == 300
    served = serve(settings_for(signer, fake.api_base))  # the window as configured by default
    body = b'{"type":1}'
    try:
        answers = {
            age: httpx.post(served.url + "/discord/interactions", content=body, timeout=10,
                            headers=signer.sign(body, ts)).status_code
            for age, ts in (("epoch+1", "1"), ("an hour ago", str(int(time.time()) - 3600)),
                            ("an hour ahead", str(int(time.time()) + 3600)), ("now", str(int(time.time()))))
        }
    finally:
        served.stop()
    assert answers == {"epoch+1": 401, "an hour ago": 401, "an hour ahead": 401, "now": 200}


# --- attachments only from the allowed origins -------------------------------------------------------------


def test_an_attachment_elsewhere_is_never_fetched(api: ServedApp, signer: Signer, fake: FakeDiscord,
                                                  elsewhere: FakeDiscord) -> None:
    url = elsewhere.add_file("seven.png", PNG)
    assert NOT_CDN in read_text(api, signer, fake, url)
    assert elsewhere.calls == []


def test_a_redirect_to_another_origin_is_not_followed(api: ServedApp, signer: Signer, fake: FakeDiscord,
                                                      elsewhere: FakeDiscord) -> None:
    target = elsewhere.add_file("seven.png", PNG)
    fake.script("GET", r"^/attachments/hop.png$", Scripted(302, None, {"Location": target}))
    assert NOT_CDN in read_text(api, signer, fake, fake.url + "/attachments/hop.png")
    assert len(fake.calls_to("GET", r"^/attachments/hop.png$")) == 1
    assert elsewhere.calls == []


def test_a_redirect_within_the_origins_is_followed(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    fake.add_file("seven.png", PNG)
    fake.script("GET", r"^/attachments/moved.png$", Scripted(301, None, {"Location": "/attachments/seven.png"}))
    assert read_text(api, signer, fake, fake.url + "/attachments/moved.png").startswith("I read **7**")


def test_endless_redirects_within_the_origins_end(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    loop = Scripted(302, None, {"Location": "/attachments/loop.png"})
    fake.script("GET", r"^/attachments/loop.png$", *[loop] * 10)
    assert "couldn't download" in read_text(api, signer, fake, fake.url + "/attachments/loop.png")
    assert len(fake.calls_to("GET", r"^/attachments/loop.png$")) == 4  # the URL and 3 redirects


@pytest.mark.parametrize("entry", ["https://cdn.discordapp.com/attachments", "cdn.discordapp.com",
                                   "ftp://cdn.discordapp.com", "https://user@cdn.discordapp.com", ""])
def test_an_origins_entry_that_is_not_an_origin_is_refused_at_start(entry: str) -> None:
    with pytest.raises(ValidationError, match="scheme://host"):
        Settings(_env_file=None, discord_attachment_origins=f"https://media.discordapp.net,{entry}")


def test_origins_are_normalised() -> None:
    settings = Settings(_env_file=None, discord_attachment_origins=" HTTPS://CDN.discordapp.com:443/ ,http://127.0.0.1:8081")
    assert settings.attachment_origins == {"https://cdn.discordapp.com", "http://127.0.0.1:8081"}
    assert Settings(_env_file=None).attachment_origins == set(DEFAULT_DISCORD_ATTACHMENT_ORIGINS.split(","))


# --- a flood of /read ----------------------------------------------------------------------------------------


def test_a_flood_of_read_is_limited_per_user(fake: FakeDiscord, signer: Signer, redis_url: str,
                                             tmp_path: Path) -> None:
    install_model(tmp_path, forced_digit=7)
    served = serve(settings_for(signer, fake.api_base, data_dir=tmp_path, redis_url=redis_url,
                                discord_read_rate_per_minute=2, api={"model_poll_s": 0}))
    url = fake.add_file("seven.png", PNG)
    flooder, other = snowflake(), snowflake()
    try:
        answers = [served.post(signer, read_command(url, user_id=flooder, size=len(PNG))).json() for _ in range(4)]
        someone_else = served.post(signer, read_command(url, user_id=other, size=len(PNG))).json()
        fake.wait_for("PATCH", r"^/webhooks/424242/", count=3, timeout=15)
    finally:
        served.stop()
    assert [a["type"] for a in answers] == [5, 5, 4, 4]  # two deferred reads, then answered at once
    refusal = answers[2]["data"]
    assert refusal["flags"] == 64 and "You can read 2 images per minute. Try again in" in refusal["content"]
    assert someone_else["type"] == 5
    assert len(fake.calls_to("GET", r"^/attachments/seven.png$")) == 3  # refused reads download nothing
