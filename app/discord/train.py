"""`/train`: admit the interaction (once per id, within the user's hourly allowance), then enqueue the job.

It may block on Redis for a few milliseconds; the web adapter runs the handler in a worker thread.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import redis
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from app.contracts import DEFAULT_AUGMENT, DEFAULT_EPOCHS, DigitsTrainJobV1
from app.discord.interaction import Interaction, JsonObject, Reply, message, say
from app.discord.registration import TRAIN_EPOCHS_MAX, TRAIN_EPOCHS_MIN
from app.discord.state import TrainAdmissions, TrainRecord
from app.estimate import JobTooLongError
from app.queue import TrainingUnavailableError, enqueue_train
from config.settings import Settings

MSG_NOT_CONFIGURED: Final = "Training is not configured."
MSG_UNAVAILABLE: Final = "Training is unavailable right now. Please try again in a few minutes."

log = logging.getLogger("app.discord")


class TrainOptions(BaseModel):
    """The /train options, checked again here (the command definition's min/max are only a UI hint)."""

    model_config = ConfigDict(frozen=True)

    epochs: StrictInt = Field(DEFAULT_EPOCHS, ge=TRAIN_EPOCHS_MIN, le=TRAIN_EPOCHS_MAX)
    augment: StrictBool = DEFAULT_AUGMENT


def parse_train_options(options: dict[str, object]) -> TrainOptions | str:
    """The options, or what to tell the user about the first one that is wrong."""
    try:
        return TrainOptions.model_validate(options)
    except ValidationError as exc:
        if exc.errors()[0]["loc"] == ("epochs",):
            return f"`epochs` must be a whole number from {TRAIN_EPOCHS_MIN} to {TRAIN_EPOCHS_MAX}."
        return "`augment` must be true or false."


def format_wait(seconds: float) -> str:
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class TrainCommand:
    def __init__(self, settings: Settings, client: redis.Redis | None) -> None:
        self.settings = settings
        self.admissions = TrainAdmissions(client) if client is not None else None

    def __call__(self, interaction: Interaction, request_id: str) -> Reply:
        if self.admissions is None:
            return say(MSG_NOT_CONFIGURED)
        user_id, interaction_id, token = interaction.user_id, interaction.id, interaction.token
        if user_id is None or interaction_id is None or token is None:
            return say("Sorry, this request is missing who sent it; please try again.")
        options = parse_train_options(interaction.command.option_values())
        if isinstance(options, str):
            return say(options)
        record = TrainRecord(request_id=request_id, token=token, user_id=user_id, created_at=time.time())
        limit = self.settings.discord_train_rate_per_hour
        try:
            admission = self.admissions.admit(interaction_id, record, limit)
        except redis.RedisError as exc:
            log.warning("redis unavailable for /train: %s", exc)
            return say(MSG_UNAVAILABLE)
        if admission.verdict == "duplicate":
            return Reply(200, admission.previous or message("This request is already being handled."))
        if admission.verdict == "rate_limited":
            runs = "run" if limit == 1 else "runs"
            body = message(
                f"You can start {limit} training {runs} per hour. Try again in {format_wait(admission.wait_s)}."
            )
        else:
            body = self._enqueue(self.admissions, interaction_id, record, options)
        try:
            self.admissions.remember_reply(interaction_id, body)
        except redis.RedisError as exc:
            log.warning("could not remember the /train reply: %s", exc)
        return Reply(200, body)

    def _enqueue(
        self, admissions: TrainAdmissions, interaction_id: str, record: TrainRecord, options: TrainOptions
    ) -> JsonObject:
        job = DigitsTrainJobV1(
            request_id=record.request_id, user_id=record.user_id, epochs=options.epochs, augment=options.augment
        )
        try:
            job_id = enqueue_train(admissions.client, self.settings.rq.queue, job, train=self.settings.train)
        except JobTooLongError as exc:
            admissions.undo(interaction_id, record)  # refused: it does not count against the user's allowance
            return message(f"Training not started: {exc}")
        except (TrainingUnavailableError, redis.RedisError) as exc:
            log.warning("training not enqueued: %s", exc)
            admissions.undo(interaction_id, record)
            return message(MSG_UNAVAILABLE)
        log.info("training enqueued from Discord", extra={"job_id": job_id, "model_id": job.model_id})
        plural = "s" if options.epochs != 1 else ""
        return message(
            f"Training queued: {options.epochs} epoch{plural}, augmentation {'on' if options.augment else 'off'}. "
            f"I'll update this message as it runs.\nrequest id `{record.request_id}`\njob id `{job_id}`"
        )
