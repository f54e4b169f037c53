"""`/read image:<file>`: within the user's allowance per minute, defer at once, then download (only from
`DISCORD_ATTACHMENT_ORIGINS`), check and read the image, and edit the reply.

The allowance is kept in Redis (app.discord.state); reads do not depend on Redis, so while it is
away or not configured the limit is not applied. It may block on Redis for a few milliseconds; the
web adapter runs the handler in a worker thread.
"""

from __future__ import annotations

import logging
from typing import Final

import redis

from app.discord.client import DiscordClient, DownloadError
from app.discord.interaction import (
    DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE,
    EPHEMERAL,
    Attachment,
    Interaction,
    JsonObject,
    Reply,
    say,
)
from app.discord.state import ReadRateLimit
from app.discord.train import format_wait
from app.prediction import (
    DigitReader,
    ModelNotReadyError,
    PredictionTimeoutError,
    Reading,
    ReadOverloadedError,
)
from app.preprocess import PreprocessError, sniff_image_type
from config.settings import Settings

MSG_NO_MODEL: Final = "No model is trained yet, so I can't read digits. Start one with /train."
MSG_UNCERTAIN_HINT: Final = (
    "I'm not sure about this one. A single dark digit on plain paper, photographed straight on and "
    "cropped close, reads best."
)

log = logging.getLogger("app.discord")


def format_prediction(pred: Reading) -> str:
    ranked = sorted(range(len(pred.probs)), key=lambda i: pred.probs[i], reverse=True)[:3]
    top3 = " · ".join(f"{i} ({pred.probs[i]:.1%})" for i in ranked)
    lines = [
        f"I read **{pred.digit}** · confidence {pred.confidence:.1%}",
        f"Top 3: {top3}",
        f"Model `{pred.model_id}` version `{pred.version}`",
    ]
    if pred.uncertain:
        lines.append(MSG_UNCERTAIN_HINT)
    return "\n".join(lines)


class ReadCommand:
    def __init__(
        self, settings: Settings, client: DiscordClient, reader: DigitReader, redis_client: redis.Redis | None = None
    ) -> None:
        self.settings = settings
        self.client = client
        self.reader = reader
        self.rate = ReadRateLimit(redis_client) if redis_client is not None else None

    def __call__(self, interaction: Interaction, request_id: str) -> Reply:
        if not self.settings.discord_application_id:
            return say("Reading images needs DISCORD_APPLICATION_ID to be set on the server.")
        token = interaction.token
        attachment = interaction.command.attachment("image")
        if token is None or attachment is None:
            return say("Attach a PNG or JPEG image of one handwritten digit: /read image:<file>.")
        wait_s = self._wait_s(interaction, request_id)
        if wait_s > 0:
            limit = self.settings.discord_read_rate_per_minute
            return say(f"You can read {limit} images per minute. Try again in {format_wait(wait_s)}.")
        deferred: JsonObject = {"type": DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE}
        if not self.settings.discord_read_public:
            deferred["data"] = {"flags": EPHEMERAL}

        async def follow_up() -> None:
            content = await self.read_attachment(attachment, request_id)
            # Right after a defer the original can 404 for a moment (discord-api-docs#7220).
            await self.client.edit_original(token, {"content": content}, not_found_retries=3)

        return Reply(200, deferred, background=follow_up)

    def _wait_s(self, interaction: Interaction, request_id: str) -> float:
        """0 when this /read is within the user's allowance (or no limit applies), else seconds to wait."""
        limit = self.settings.discord_read_rate_per_minute
        user_id = interaction.user_id
        if self.rate is None or limit == 0 or user_id is None:
            return 0.0
        try:
            return self.rate.wait_s(user_id, interaction.id or request_id, limit)
        except redis.RedisError as exc:
            log.warning("redis unavailable for the /read rate limit, not applied: %s", exc)
            return 0.0

    async def read_attachment(self, attachment: Attachment, request_id: str) -> str:
        """Download, check and read one attachment; always returns the text to show the user."""
        cap = self.settings.api.read_max_bytes
        too_large = f"That file is too large: the limit is {cap / (1024 * 1024):.0f} MB."
        if attachment.size is not None and attachment.size > cap:
            return too_large
        try:
            data = await self.client.download(
                attachment.url, max_bytes=cap, timeout_s=self.settings.discord_download_timeout_s,
                origins=self.settings.attachment_origins,
            )
        except DownloadError as exc:
            if exc.kind == "too_large":
                return too_large
            if exc.kind == "forbidden":
                log.warning("attachment refused: %s", exc.message)
                return "I only download attachments from Discord's own CDN, and this one isn't there."
            log.info("attachment download failed: %s", exc.message)
            return f"I couldn't download that attachment ({exc.message}). Please try again."
        if sniff_image_type(data) is None:
            return "That file isn't a PNG or JPEG image. Please attach a photo or scan of one digit."
        try:
            prediction = await self.reader.read_digit(data)
        except PreprocessError as exc:
            return f"I couldn't read a digit in that image: {exc.message}"
        except ModelNotReadyError:
            return MSG_NO_MODEL
        except (PredictionTimeoutError, ReadOverloadedError):
            return "I'm too busy to read that right now. Please try again in a moment."
        except Exception:
            log.exception("reading a Discord attachment failed")
            return f"Something went wrong reading that image (request id `{request_id}`)."
        return format_prediction(prediction.reading)
