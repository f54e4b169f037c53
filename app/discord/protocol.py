"""The Discord interaction protocol as plain code: verify, route, build the response. No web framework here.

`InteractionHandler.handle(body, signature, timestamp, request_id)` takes the raw request and
returns a `Reply`: the status, the JSON body, and optionally work to run after the answer has been
sent (a deferred `/read`). It may block on Redis for a few milliseconds, so the web adapter calls it
in a worker thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import redis

from app.contracts import DigitsTrainJobV1
from app.discord.client import NO_MENTIONS, DiscordClient, DownloadError
from app.discord.commands import TRAIN_EPOCHS_MAX, TRAIN_EPOCHS_MIN
from app.discord.state import (
    INTERACTION_DEDUPE_TTL_S,
    TRAIN_RECORD_TTL_S,
    TrainRecord,
    interaction_key,
    train_rate_key,
    train_record_key,
)
from app.discord.verify import VerifyResult, verify_request
from app.preprocess import PreprocessError, sniff_image_type
from app.queue import TrainingUnavailableError, enqueue_train
from app.serving import ModelNotReadyError, ModelServer, Prediction, PredictionTimeoutError
from config.settings import Settings

# Interaction types and response types (Discord API v10).
PING: Final = 1
APPLICATION_COMMAND: Final = 2
MESSAGE_COMPONENT: Final = 3
AUTOCOMPLETE: Final = 4
MODAL_SUBMIT: Final = 5

PONG: Final = 1
CHANNEL_MESSAGE_WITH_SOURCE: Final = 4
DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE: Final = 5
AUTOCOMPLETE_RESULT: Final = 8
EPHEMERAL: Final = 1 << 6

MSG_NOT_CONFIGURED: Final = "Training is not configured."
MSG_UNAVAILABLE: Final = "Training is unavailable right now. Please try again in a few minutes."
MSG_NO_MODEL: Final = "No model is trained yet, so I can't read digits. Start one with /train."
MSG_UNCERTAIN_HINT: Final = (
    "I'm not sure about this one. A single dark digit on plain paper, photographed straight on and "
    "cropped close, reads best."
)

_PENDING: Final = b"pending"

# Admission of a /train, atomic and shared by every replica (clocks agree: Redis's TIME decides):
# 1. claim the interaction id (a replay gets {0, what we answered the first time});
# 2. the per-user sliding one-hour window, when a limit is set ({1, ms until a slot frees});
# 3. store the record the progress relay needs, before the job exists ({2, 0}).
_ADMIT_LUA: Final = """
redis.replicate_commands()
if not redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1]) then
  return {0, redis.call('GET', KEYS[1])}
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local window = tonumber(ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
  if redis.call('ZCARD', KEYS[2]) >= limit then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {1, math.max(1, tonumber(oldest[2]) + window - now)}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[4])
  redis.call('PEXPIRE', KEYS[2], window)
end
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
return {2, 0}
"""
_DUPLICATE: Final = 0
_ADMITTED: Final = 2
_RATE_WINDOW_MS: Final = 3600 * 1000

log = logging.getLogger("app.discord")

JsonObject = dict[str, object]


@dataclass(frozen=True)
class Reply:
    status: int
    body: JsonObject
    # Runs after the answer is on its way to Discord (follow-ups must not race the initial response).
    background: Callable[[], Awaitable[None]] | None = None


def message(content: str, *, ephemeral: bool = True) -> JsonObject:
    data: JsonObject = {"content": content[:2000], "allowed_mentions": dict(NO_MENTIONS)}
    if ephemeral:
        data["flags"] = EPHEMERAL
    return {"type": CHANNEL_MESSAGE_WITH_SOURCE, "data": data}


def error_body(code: str, text: str, request_id: str) -> JsonObject:
    return {"code": code, "message": text, "request_id": request_id}


def format_wait(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


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


def _dict(value: object, key: str) -> Mapping[str, object] | None:
    if isinstance(value, dict):
        inner = value.get(key)
        if isinstance(inner, dict):
            return inner
    return None


def _str(value: Mapping[str, object] | None, key: str) -> str | None:
    if value is None:
        return None
    inner = value.get(key)
    return inner if isinstance(inner, str) and inner else None


def user_id_of(interaction: Mapping[str, object]) -> int | None:
    """`member.user.id` in a guild, `user.id` in DMs; snowflakes arrive as strings of digits."""
    member = _dict(interaction, "member")
    user = _dict(member, "user") if member is not None else _dict(interaction, "user")
    raw = _str(user, "id")
    if raw is None or not raw.isdigit() or len(raw) > 20:
        return None
    value = int(raw)
    return value if value < 2**64 else None


def _options(data: Mapping[str, object] | None) -> dict[str, object]:
    found: dict[str, object] = {}
    raw = data.get("options") if data is not None else None
    if isinstance(raw, list):
        for option in raw:
            if isinstance(option, dict) and isinstance(option.get("name"), str):
                found[str(option["name"])] = option.get("value")
    return found


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 1
    augment: bool = True


def parse_train_options(data: Mapping[str, object] | None) -> TrainOptions | str:
    """The /train options, checked again here (the command definition's min/max are only a UI hint)."""
    options = _options(data)
    defaults = TrainOptions()
    epochs = options.get("epochs", defaults.epochs)
    augment = options.get("augment", defaults.augment)
    if not isinstance(epochs, int) or isinstance(epochs, bool) or not TRAIN_EPOCHS_MIN <= epochs <= TRAIN_EPOCHS_MAX:
        return f"`epochs` must be a whole number from {TRAIN_EPOCHS_MIN} to {TRAIN_EPOCHS_MAX}."
    if not isinstance(augment, bool):
        return "`augment` must be true or false."
    return TrainOptions(epochs=epochs, augment=augment)


@dataclass(frozen=True)
class Attachment:
    url: str
    size: int | None
    filename: str


def attachment_of(data: Mapping[str, object] | None, option: str = "image") -> Attachment | None:
    attachment_id = _options(data).get(option)
    resolved = _dict(data, "resolved") if data is not None else None
    attachments = _dict(resolved, "attachments") if resolved is not None else None
    if not isinstance(attachment_id, str) or attachments is None:
        return None
    found = attachments.get(attachment_id)
    if not isinstance(found, dict) or not isinstance(found.get("url"), str):
        return None
    size = found.get("size")
    filename = found.get("filename")
    return Attachment(
        url=str(found["url"]),
        size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        filename=filename if isinstance(filename, str) else "attachment",
    )


class InteractionHandler:
    def __init__(
        self, settings: Settings, redis_client: redis.Redis | None, reader: ModelServer, client: DiscordClient
    ) -> None:
        self.settings = settings
        self.redis = redis_client
        self.reader = reader
        self.client = client
        self._admit_script = redis_client.register_script(_ADMIT_LUA) if redis_client is not None else None

    # -- entry point -------------------------------------------------------------------------------

    def handle(self, body: bytes, signature: str | None, timestamp: str | None, request_id: str) -> Reply:
        public_key = self.settings.discord_public_key
        if public_key is None:
            return Reply(503, error_body(
                "discord_not_configured",
                "Discord interactions are disabled: DISCORD_PUBLIC_KEY is not set on the server.",
                request_id,
            ))
        verdict = verify_request(
            body, signature, timestamp, public_key, max_age_s=self.settings.discord_timestamp_max_age_s
        )
        if verdict is not VerifyResult.OK:
            return Reply(401, error_body("unauthorized", verdict.value, request_id))
        try:
            interaction: object = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return Reply(401, error_body("unauthorized", "the signed body is not JSON", request_id))
        if not isinstance(interaction, dict) or not isinstance(interaction.get("type"), int):
            return Reply(400, error_body("bad_request", "not a Discord interaction", request_id))
        return self.route(interaction, request_id)

    def route(self, interaction: Mapping[str, object], request_id: str) -> Reply:
        kind = interaction.get("type")
        if kind == PING:
            return Reply(200, {"type": PONG})
        if kind == AUTOCOMPLETE:
            return Reply(200, {"type": AUTOCOMPLETE_RESULT, "data": {"choices": []}})
        if kind != APPLICATION_COMMAND:
            return Reply(200, message("Sorry, I don't handle that kind of interaction. Try /read or /train."))
        data = _dict(interaction, "data")
        name = _str(data, "name")
        if name == "train":
            return self.train(interaction, data, request_id)
        if name == "read":
            return self.read(interaction, data, request_id)
        shown = f"/{name[:32]}" if name else "that command"
        return Reply(200, message(f"Sorry, I don't know {shown}. I understand /read and /train."))

    # -- /train ------------------------------------------------------------------------------------

    def train(self, interaction: Mapping[str, object], data: Mapping[str, object] | None, request_id: str) -> Reply:
        client = self.redis
        if client is None:
            return Reply(200, message(MSG_NOT_CONFIGURED))
        user_id = user_id_of(interaction)
        interaction_id = _str(interaction, "id")
        token = _str(interaction, "token")
        if user_id is None or interaction_id is None or token is None:
            return Reply(200, message("Sorry, this request is missing who sent it; please try again."))
        options = parse_train_options(data)
        if isinstance(options, str):
            return Reply(200, message(options))
        key = interaction_key(interaction_id)
        record = TrainRecord(request_id=request_id, token=token, user_id=user_id, created_at=time.time())
        try:
            admitted = self._admit(client, key, record, interaction_id)
        except redis.RedisError as exc:
            log.warning("redis unavailable for /train: %s", exc)
            return Reply(200, message(MSG_UNAVAILABLE))
        if isinstance(admitted, Reply):
            return admitted
        body = self._enqueue_job(client, key, record, interaction_id, options)
        try:
            client.set(key, json.dumps(body), xx=True, keepttl=True)
        except redis.RedisError as exc:
            log.warning("could not remember the /train reply: %s", exc)
        return Reply(200, body)

    def _admit(self, client: redis.Redis, key: str, record: TrainRecord, interaction_id: str) -> Reply | None:
        """One round trip: claim the interaction id, apply the per-user limit, store the relay record."""
        limit = self.settings.discord_train_rate_per_hour
        script = self._admit_script or client.register_script(_ADMIT_LUA)
        answer = script(
            keys=[key, train_rate_key(record.user_id), train_record_key(record.request_id)],
            args=[INTERACTION_DEDUPE_TTL_S, _RATE_WINDOW_MS, limit, interaction_id, record.to_json(),
                  TRAIN_RECORD_TTL_S],
        )
        if not isinstance(answer, list) or len(answer) != 2:
            raise redis.ResponseError(f"admission script answered {answer!r}")
        verdict, detail = answer
        if verdict == _ADMITTED:
            return None
        if verdict == _DUPLICATE:
            return Reply(200, self._previous_reply(detail))
        wait_ms = detail if isinstance(detail, int) else 0
        runs = "run" if limit == 1 else "runs"
        body = message(f"You can start {limit} training {runs} per hour. Try again in {format_wait(wait_ms / 1000)}.")
        client.set(key, json.dumps(body), xx=True, keepttl=True)
        return Reply(200, body)

    def _enqueue_job(
        self, client: redis.Redis, key: str, record: TrainRecord, interaction_id: str, options: TrainOptions
    ) -> JsonObject:
        job = DigitsTrainJobV1(
            request_id=record.request_id, user_id=record.user_id, epochs=options.epochs, augment=options.augment
        )
        try:
            job_id = enqueue_train(client, self.settings.rq.queue, job)
        except (TrainingUnavailableError, redis.RedisError) as exc:
            log.warning("training not enqueued: %s", exc)
            # Undo the admission, so that neither a retry nor the user's hourly allowance pays for it.
            with contextlib.suppress(redis.RedisError):
                client.delete(key, train_record_key(record.request_id))
                client.zrem(train_rate_key(record.user_id), interaction_id)
            return message(MSG_UNAVAILABLE)
        log.info("training enqueued from Discord", extra={"job_id": job_id, "model_id": job.model_id})
        augment = "on" if options.augment else "off"
        return message(
            f"Training queued: {options.epochs} epoch{'s' if options.epochs != 1 else ''}, augmentation {augment}. "
            f"I'll update this message as it runs.\nrequest id `{record.request_id}`\njob id `{job_id}`"
        )

    @staticmethod
    def _previous_reply(stored: object) -> JsonObject:
        if isinstance(stored, bytes) and stored != _PENDING:
            try:
                body: object = json.loads(stored)
            except (json.JSONDecodeError, UnicodeDecodeError):
                body = None
            if isinstance(body, dict):
                return body
        return message("This request is already being handled.")

    # -- /read -------------------------------------------------------------------------------------

    def read(self, interaction: Mapping[str, object], data: Mapping[str, object] | None, request_id: str) -> Reply:
        if not self.settings.discord_application_id:
            return Reply(200, message("Reading images needs DISCORD_APPLICATION_ID to be set on the server."))
        token = _str(interaction, "token")
        attachment = attachment_of(data)
        if token is None or attachment is None:
            return Reply(200, message("Attach a PNG or JPEG image of one handwritten digit: /read image:<file>."))
        ephemeral = not self.settings.discord_read_public
        deferred: JsonObject = {"type": DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE}
        if ephemeral:
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
