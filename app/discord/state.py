"""What the Discord side keeps in Redis, shared by every API replica: key names and the /train record."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> TrainRecord | None:
        if raw is None:
            return None
        try:
            fields: object = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if not isinstance(fields, dict):
            return None
        request_id, token, user_id = fields.get("request_id"), fields.get("token"), fields.get("user_id")
        created_at = fields.get("created_at")
        if not (isinstance(request_id, str) and isinstance(token, str) and isinstance(user_id, int)
                and isinstance(created_at, int | float)):
            return None
        return cls(request_id, token, user_id, float(created_at))

    def token_alive(self, now: float) -> bool:
        return now - self.created_at < TOKEN_LIFETIME_S - TOKEN_MARGIN_S
