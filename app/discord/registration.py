"""The slash commands we offer, and `digits discord-sync`: bulk-overwrite them, globally or in one guild.

A bulk overwrite (`PUT .../commands`) makes Discord's set exactly this list: commands not listed are
removed. Guild commands update at once; global ones can take a while to reach every client.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import httpx

from app.contracts import DEFAULT_AUGMENT, DEFAULT_EPOCHS
from app.discord.client import USER_AGENT, describe_failure
from app.discord.interaction import JsonObject

OPTION_INTEGER: Final = 4
OPTION_BOOLEAN: Final = 5
OPTION_ATTACHMENT: Final = 11
CHAT_INPUT: Final = 1

TRAIN_EPOCHS_MIN: Final = 1
TRAIN_EPOCHS_MAX: Final = 20

COMMANDS: Final[tuple[JsonObject, ...]] = (
    {
        "type": CHAT_INPUT,
        "name": "train",
        "description": "Train a new digit-reading model on MNIST; progress appears in the reply",
        "options": [
            {
                "type": OPTION_INTEGER,
                "name": "epochs",
                "description": f"Passes over the training data ({TRAIN_EPOCHS_MIN}-{TRAIN_EPOCHS_MAX}, "
                               f"default {DEFAULT_EPOCHS})",
                "required": False,
                "min_value": TRAIN_EPOCHS_MIN,
                "max_value": TRAIN_EPOCHS_MAX,
            },
            {
                "type": OPTION_BOOLEAN,
                "name": "augment",
                "description": f"Augment the training images (default {'on' if DEFAULT_AUGMENT else 'off'})",
                "required": False,
            },
        ],
    },
    {
        "type": CHAT_INPUT,
        "name": "read",
        "description": "Read a handwritten digit from an image",
        "options": [
            {
                "type": OPTION_ATTACHMENT,
                "name": "image",
                "description": "A PNG or JPEG photo or scan of one handwritten digit",
                "required": True,
            },
        ],
    },
)


class SyncError(Exception):
    """`discord-sync` could not finish; the message says why and what to do."""


@dataclass
class SyncReport:
    scope: str
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"Registered {len(COMMANDS)} commands ({self.scope})."]
        for label, names in (("added", self.added), ("updated", self.updated), ("removed", self.removed),
                             ("unchanged", self.unchanged)):
            if names:
                out.append(f"  {label}: " + ", ".join("/" + n for n in names))
        return out


def _comparable(command: Mapping[str, object]) -> JsonObject:
    """The parts of a command we define, in a form where Discord's echo and our definition compare equal."""

    def clean_option(option: object) -> object:
        if not isinstance(option, dict):
            return option
        keys = ("type", "name", "description", "required", "min_value", "max_value")
        cleaned = {k: option[k] for k in keys if k in option}
        if cleaned.get("required") is False:
            del cleaned["required"]  # Discord omits `required` when it is false
        return cleaned

    options = command.get("options")
    return {
        "type": command.get("type", CHAT_INPUT),
        "name": command.get("name"),
        "description": command.get("description"),
        "options": [clean_option(o) for o in options] if isinstance(options, list) else [],
    }


def diff_commands(
    scope: str, before: Sequence[Mapping[str, object]], after: Sequence[Mapping[str, object]]
) -> SyncReport:
    report = SyncReport(scope=scope)
    old = {str(c.get("name")): _comparable(c) for c in before}
    for command in after:
        name = str(command.get("name"))
        if name not in old:
            report.added.append(name)
        elif old[name] != _comparable(command):
            report.updated.append(name)
        else:
            report.unchanged.append(name)
    wanted = {str(c.get("name")) for c in after}
    report.removed = sorted(n for n in old if n not in wanted)
    return report


def _explain(response: httpx.Response, action: str) -> SyncError:
    failure = describe_failure(response)
    if response.status_code == 401:
        hint = "Discord refused the bot token: check DISCORD_BOT_TOKEN (the bot's token, not the public key)."
    elif response.status_code == 403:
        hint = ("Discord forbids this: the token must belong to DISCORD_APPLICATION_ID, and for --guild the app "
                "must be installed in that guild with the applications.commands scope.")
    elif response.status_code == 429:
        wait = f"{failure.retry_after:.1f} s" if failure.retry_after is not None else "a while"
        hint = f"Discord is rate limiting command registration: try again in {wait}."
    elif response.status_code == 404:
        hint = "Unknown application or guild: check DISCORD_APPLICATION_ID and --guild."
    else:
        hint = "Discord refused the request."
    detail = f"{response.status_code} {failure.message}" + (f" (code {failure.code})" if failure.code else "")
    if response.status_code == 400:
        try:
            errors: object = response.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            errors = None
        if isinstance(errors, dict) and "errors" in errors:
            detail += ": " + json.dumps(errors["errors"])[:800]
    return SyncError(f"could not {action}: {detail}. {hint}")


def sync_commands(
    *,
    api_base: str,
    application_id: str | None,
    bot_token: str | None,
    guild_id: str | None = None,
    timeout_s: float = 15.0,
) -> SyncReport:
    """Bulk-overwrite the commands; returns what changed. Raises SyncError with a readable message."""
    if not application_id:
        raise SyncError("DISCORD_APPLICATION_ID is not set (the Application ID on the app's General Information page).")
    if not bot_token:
        raise SyncError("DISCORD_BOT_TOKEN is not set (Bot page of the app: Reset Token).")
    if guild_id is not None and not guild_id.isdigit():
        raise SyncError(f"--guild must be a numeric guild id, not {guild_id!r}.")
    path = f"/applications/{application_id}" + (f"/guilds/{guild_id}" if guild_id else "") + "/commands"
    scope = f"guild {guild_id}" if guild_id else "global; clients may take a while to show changes"
    headers = {"Authorization": f"Bot {bot_token}", "User-Agent": USER_AGENT}
    with httpx.Client(base_url=api_base.rstrip("/"), headers=headers, timeout=timeout_s) as http:
        try:
            existing = http.get(path)
            if existing.status_code != 200:
                raise _explain(existing, "read the registered commands")
            before: object = existing.json()
            written = http.put(path, json=list(COMMANDS))
            if written.status_code not in (200, 201):
                raise _explain(written, "register the commands")
            after: object = written.json()
        except httpx.HTTPError as exc:
            raise SyncError(f"could not reach Discord at {api_base}: {exc}") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SyncError(f"Discord answered with something other than JSON: {exc}") from exc
    before_list = [c for c in before if isinstance(c, dict)] if isinstance(before, list) else []
    after_list = [c for c in after if isinstance(c, dict)] if isinstance(after, list) else list(COMMANDS)
    return diff_commands(scope, before_list, after_list)
