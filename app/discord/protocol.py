"""The Discord interaction protocol as plain code: verify → route → reply. No web framework here.

`InteractionHandler.handle(body, signature, timestamp, request_id)` takes the raw request and
returns a `Reply`: the status, the JSON body, and optionally work to run after the answer has been
sent (a deferred `/read`). `/train` may block on Redis for a few milliseconds, so the web adapter
calls it in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import redis
from pydantic import ValidationError

from app.discord.client import DiscordClient
from app.discord.interaction import (
    APPLICATION_COMMAND,
    AUTOCOMPLETE,
    AUTOCOMPLETE_RESULT,
    PING,
    PONG,
    Interaction,
    Reply,
    error,
    say,
)
from app.discord.read import ReadCommand
from app.discord.train import TrainCommand
from app.discord.verify import VerifyResult, verify_request
from app.prediction import DigitReader
from config.settings import Settings


class InteractionHandler:
    def __init__(
        self, settings: Settings, redis_client: redis.Redis | None, client: DiscordClient, reader: DigitReader
    ) -> None:
        self.settings = settings
        self.commands: dict[str, Callable[[Interaction, str], Reply]] = {
            "train": TrainCommand(settings, redis_client),
            "read": ReadCommand(settings, client, reader, redis_client),
        }

    def handle(self, body: bytes, signature: str | None, timestamp: str | None, request_id: str) -> Reply:
        public_key = self.settings.discord_public_key
        if public_key is None:
            return error(503, "discord_not_configured",
                         "Discord interactions are disabled: DISCORD_PUBLIC_KEY is not set on the server.", request_id)
        verdict = verify_request(
            body, signature, timestamp, public_key, max_age_s=self.settings.discord_timestamp_max_age_s
        )
        if verdict is not VerifyResult.OK:
            return error(401, "unauthorized", verdict.value, request_id)
        try:
            document: object = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(401, "unauthorized", "the signed body is not JSON", request_id)
        try:
            interaction = Interaction.model_validate(document)
        except ValidationError:
            return error(400, "bad_request", "not a Discord interaction", request_id)
        return self.route(interaction, request_id)

    def route(self, interaction: Interaction, request_id: str) -> Reply:
        if interaction.type == PING:
            return Reply(200, {"type": PONG})
        if interaction.type == AUTOCOMPLETE:
            return Reply(200, {"type": AUTOCOMPLETE_RESULT, "data": {"choices": []}})
        if interaction.type != APPLICATION_COMMAND:
            return say("Sorry, I don't handle that kind of interaction. Try /read or /train.")
        name = interaction.command.name
        command = self.commands.get(name) if name is not None else None
        if command is not None:
            return command(interaction, request_id)
        shown = f"/{name[:32]}" if name else "that command"
        return say(f"Sorry, I don't know {shown}. I understand /read and /train.")
