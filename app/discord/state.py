"""What the Discord side keeps in Redis, shared by every API replica: key names and the /train record."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

# Discord's own numbers: an interaction token works for 15 minutes after the interaction.
TOKEN_LIFETIME_S: Final = 15 * 60
# Stop editing a little early: an edit sent in the last seconds may land after expiry.
TOKEN_MARGIN_S: Final = 30
# A training job may wait, run up to 7 h and be retried twice: keep the record well beyond that.
TRAIN_RECORD_TTL_S: Final = 2 * 24 * 3600
# A replayed interaction id within this window is answered from memory, not enqueued again.
INTERACTION_DEDUPE_TTL_S: Final = 3600

_PREFIX: Final = "discord:"


def train_record_key(request_id: str) -> str:
    return f"{_PREFIX}train:{request_id}"


def interaction_key(interaction_id: str) -> str:
    return f"{_PREFIX}interaction:{interaction_id}"


def train_rate_key(user_id: int) -> str:
    return f"{_PREFIX}ratelimit:train:{user_id}"


def relay_owner_key(request_id: str) -> str:
    return f"{_PREFIX}relay:owner:{request_id}"


@dataclass(frozen=True)
class TrainRecord:
    """A /train interaction whose job's events should reach the user who asked."""

    request_id: str
    token: str
    user_id: int
    created_at: float  # Unix seconds when we received the interaction
    job_id: str | None = None

    def to_redis(self) -> dict[str, str]:
        fields = {
            "request_id": self.request_id,
            "token": self.token,
            "user_id": str(self.user_id),
            "created_at": repr(self.created_at),
        }
        if self.job_id is not None:
            fields["job_id"] = self.job_id
        return fields

    @classmethod
    def from_redis(cls, raw: Mapping[bytes, bytes]) -> TrainRecord | None:
        fields = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace") for k, v in raw.items()}
        try:
            return cls(
                request_id=fields["request_id"],
                token=fields["token"],
                user_id=int(fields["user_id"]),
                created_at=float(fields["created_at"]),
                job_id=fields.get("job_id") or None,
            )
        except (KeyError, ValueError):
            return None

    def token_alive(self, now: float) -> bool:
        return now - self.created_at < TOKEN_LIFETIME_S - TOKEN_MARGIN_S
