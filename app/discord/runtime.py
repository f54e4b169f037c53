"""The Discord side of a running API: the REST client, the interaction handler and the progress relay."""

from __future__ import annotations

import redis

from app.discord.client import DiscordClient
from app.discord.protocol import InteractionHandler
from app.discord.relay import ProgressRelay
from app.prediction import DigitReader
from config.settings import Settings


class DiscordRuntime:
    def __init__(self, settings: Settings, redis_client: redis.Redis | None, reader: DigitReader) -> None:
        token = settings.discord_bot_token.get_secret_value() if settings.discord_bot_token else None
        self.client = DiscordClient(settings.discord_api_base, settings.discord_application_id, token)
        self.handler = InteractionHandler(settings, redis_client, self.client, reader)
        # Progress only means something where interactions can arrive and jobs can run.
        self.relay: ProgressRelay | None = None
        if settings.redis_url is not None and settings.discord_public_key is not None:
            self.relay = ProgressRelay(
                settings.redis_url,
                settings.digits_events_channel,
                self.client,
                interval_s=settings.discord_progress_interval_s,
                jobs=redis_client,
                redis_settings=settings.redis,
            )

    async def start(self) -> None:
        if self.relay is not None:
            await self.relay.start()

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.stop()
        await self.client.aclose()
