"""`/read image:<file>`: defer at once, then download, check and read the image, and edit the reply."""

from __future__ import annotations

import logging
from typing import Final

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
from app.prediction import DigitReader, ModelNotReadyError, Prediction, PredictionTimeoutError
from app.preprocess import PreprocessError, sniff_image_type
from config.settings import Settings

MSG_NO_MODEL: Final = "No model is trained yet, so I can't read digits. Start one with /train."
MSG_UNCERTAIN_HINT: Final = (
    "I'm not sure about this one. A single dark digit on plain paper, photographed straight on and "
    "cropped close, reads best."
)

log = logging.getLogger("app.discord")


def format_prediction(pred: Prediction) -> str:
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
    def __init__(self, settings: Settings, client: DiscordClient, reader: DigitReader) -> None:
        self.settings = settings
        self.client = client
        self.reader = reader

    def __call__(self, interaction: Interaction, request_id: str) -> Reply:
        if not self.settings.discord_application_id:
            return say("Reading images needs DISCORD_APPLICATION_ID to be set on the server.")
        token = interaction.token
        attachment = interaction.command.attachment("image")
        if token is None or attachment is None:
            return say("Attach a PNG or JPEG image of one handwritten digit: /read image:<file>.")
        deferred: JsonObject = {"type": DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE}
        if not self.settings.discord_read_public:
            deferred["data"] = {"flags": EPHEMERAL}

        async def follow_up() -> None:
            content = await self.read_attachment(attachment, request_id)
            # Right after a defer the original can 404 for a moment (discord-api-docs#7220).
            await self.client.edit_original(token, {"content": content}, not_found_retries=3)

        return Reply(200, deferred, background=follow_up)

    async def read_attachment(self, attachment: Attachment, request_id: str) -> str:
        """Download, check and read one attachment; always returns the text to show the user."""
        cap = self.settings.api.read_max_bytes
        too_large = f"That file is too large: the limit is {cap / (1024 * 1024):.0f} MB."
        if attachment.size is not None and attachment.size > cap:
            return too_large
        try:
            data = await self.client.download(
                attachment.url, max_bytes=cap, timeout_s=self.settings.discord_download_timeout_s
            )
        except DownloadError as exc:
            if exc.kind == "too_large":
                return too_large
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
        except PredictionTimeoutError:
            return "I'm too busy to read that right now. Please try again in a moment."
        except Exception:
            log.exception("reading a Discord attachment failed")
            return f"Something went wrong reading that image (request id `{request_id}`)."
        return format_prediction(prediction)
