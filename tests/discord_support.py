"""Helpers for the Discord tests: a real Ed25519 signer, interaction payloads, their settings."""

from __future__ import annotations

import time
from typing import Any

from nacl.signing import SigningKey

from config.settings import Settings, origin_of
from tests.support import TEST_GATE_SIZE


class Signer:
    """Signs requests the way Discord does, with a fresh key pair per test run."""

    def __init__(self) -> None:
        self.key = SigningKey.generate()
        self.public_key = self.key.verify_key.encode().hex()

    def sign(self, body: bytes, timestamp: str | None = None) -> dict[str, str]:
        ts = timestamp if timestamp is not None else str(int(time.time()))
        signature = self.key.sign(ts.encode() + body).signature.hex()
        return {"X-Signature-Ed25519": signature, "X-Signature-Timestamp": ts, "Content-Type": "application/json"}


_counter = iter(range(10**6))


def snowflake() -> str:
    """A unique, realistic-looking 64-bit id."""
    return str(1_200_000_000_000_000_000 + int(time.time() * 1000) % 10**9 * 1000 + next(_counter))


def command(name: str, *, user_id: str, options: list[dict[str, Any]] | None = None, in_guild: bool = True,
            interaction_id: str | None = None, token: str | None = None,
            resolved: dict[str, Any] | None = None) -> dict[str, Any]:
    user = {"id": user_id, "username": "tester", "global_name": "@everyone"}
    data: dict[str, Any] = {"id": snowflake(), "name": name, "type": 1}
    if options is not None:
        data["options"] = options
    if resolved is not None:
        data["resolved"] = resolved
    interaction: dict[str, Any] = {
        "id": interaction_id or snowflake(),
        "application_id": "424242",
        "type": 2,
        "token": token or f"tok-{snowflake()}",
        "version": 1,
        "data": data,
        "context": 0 if in_guild else 1,
    }
    if in_guild:
        interaction["guild_id"] = "777"
        interaction["member"] = {"user": user, "roles": []}
    else:
        interaction["user"] = user
    return interaction


def read_command(url: str, *, user_id: str, size: int, filename: str = "digit.png",
                 content_type: str | None = "image/png", token: str | None = None) -> dict[str, Any]:
    attachment_id = snowflake()
    attachment: dict[str, Any] = {"id": attachment_id, "filename": filename, "size": size, "url": url,
                                  "proxy_url": url}
    if content_type is not None:
        attachment["content_type"] = content_type
    return command("read", user_id=user_id, token=token,
                   options=[{"name": "image", "type": 11, "value": attachment_id}],
                   resolved={"attachments": {attachment_id: attachment}})


def settings_for(signer: Signer | None, api_base: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "discord_public_key": signer.public_key if signer else None,
        "discord_application_id": "424242",
        "discord_api_base": api_base,
        "discord_attachment_origins": origin_of(api_base),  # the fake serves attachments too
        "discord_progress_interval_s": 0.5,
        "log_level": "WARNING",
        "api": {"gate_size": TEST_GATE_SIZE},
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)

