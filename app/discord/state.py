"""What the Discord side keeps in Redis, shared by every API replica: key names, records, and the Lua
scripts that change them atomically (admitting a /train, a /read's rate limit, claiming a job's relay).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Final, Literal

import pydantic.dataclasses
import redis
import redis.asyncio as aioredis
from pydantic import StrictFloat, StrictInt, StrictStr, TypeAdapter, ValidationError

# Discord's own numbers: an interaction token works for 15 minutes after the interaction.
TOKEN_LIFETIME_S: Final = 15 * 60
# Stop editing a little early: an edit sent in the last seconds may land after expiry.
TOKEN_MARGIN_S: Final = 30
# A training job may wait, run up to 7 h and be retried twice: keep the record well beyond that.
TRAIN_RECORD_TTL_S: Final = 2 * 24 * 3600
# A replayed interaction id within this window is answered from memory, not enqueued again.
INTERACTION_DEDUPE_TTL_S: Final = 3600
TRAIN_RATE_WINDOW_S: Final = 3600
READ_RATE_WINDOW_S: Final = 60
# How long one replica relays a job's events before another may take over (renewed by every event).
OWNER_LEASE_S: Final = 60

_PREFIX: Final = "discord:"
_PENDING: Final = b"pending"

JsonObject = dict[str, object]


def train_record_key(request_id: str) -> str:
    return f"{_PREFIX}train:{request_id}"


def interaction_key(interaction_id: str) -> str:
    return f"{_PREFIX}interaction:{interaction_id}"


def train_rate_key(user_id: int) -> str:
    return f"{_PREFIX}ratelimit:train:{user_id}"


def read_rate_key(user_id: int) -> str:
    return f"{_PREFIX}ratelimit:read:{user_id}"


def relay_owner_key(request_id: str) -> str:
    return f"{_PREFIX}relay:owner:{request_id}"


@pydantic.dataclasses.dataclass(frozen=True)
class TrainRecord:
    """A /train interaction whose job's events should reach the user who asked."""

    request_id: StrictStr
    token: StrictStr
    user_id: StrictInt
    created_at: StrictFloat  # Unix seconds when we received the interaction

    def to_json(self) -> bytes:
        return _RECORD.dump_json(self)

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> TrainRecord | None:
        if raw is None:
            return None
        try:
            return _RECORD.validate_json(raw)
        except ValidationError:
            return None

    def token_alive(self, now: float) -> bool:
        return now - self.created_at < TOKEN_LIFETIME_S - TOKEN_MARGIN_S


_RECORD: Final = TypeAdapter(TrainRecord)


# A per-user sliding window (a sorted set of admission times, Redis's TIME deciding, so every replica
# agrees): `in_window(key, window_ms, limit, member)` admits `member` and returns 0, or returns the
# milliseconds until the oldest admission leaves the window.
_WINDOW_LUA: Final = """
redis.replicate_commands()
local function in_window(key, window, limit, member)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZCARD', key) >= limit then
    local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    return math.max(1, tonumber(oldest[2]) + window - now)
  end
  redis.call('ZADD', key, now, member)
  redis.call('PEXPIRE', key, window)
  return 0
end
"""

# Admission of a /train, atomic and shared by every replica:
# 1. claim the interaction id (a replay gets {0, what we answered the first time});
# 2. the per-user sliding window, when a limit is set ({1, ms until a slot frees});
# 3. store the record the progress relay needs, before the job exists ({2, 0}).
_ADMIT_LUA: Final = _WINDOW_LUA + """
if not redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1]) then
  return {0, redis.call('GET', KEYS[1])}
end
local limit = tonumber(ARGV[3])
if limit > 0 then
  local wait = in_window(KEYS[2], tonumber(ARGV[2]), limit, ARGV[4])
  if wait > 0 then
    return {1, wait}
  end
end
redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6])
return {2, 0}
"""

# A /read, within the user's allowance per minute: 0, or the milliseconds until a slot frees.
_READ_RATE_LUA: Final = _WINDOW_LUA + """
return in_window(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
"""


class ReadRateLimit:
    """How many /read each user may send per minute, shared by every API replica."""

    def __init__(self, client: redis.Redis) -> None:
        self._admit = client.register_script(_READ_RATE_LUA)

    def wait_s(self, user_id: int, interaction_id: str, limit_per_minute: int) -> float:
        """0 when this /read is admitted (and counted), else the seconds until the user may read again."""
        answer = self._admit(
            keys=[read_rate_key(user_id)], args=[READ_RATE_WINDOW_S * 1000, limit_per_minute, interaction_id]
        )
        if not isinstance(answer, int):
            raise redis.ResponseError(f"read rate script answered {answer!r}")
        return answer / 1000


@dataclass(frozen=True)
class Admission:
    verdict: Literal["admitted", "duplicate", "rate_limited"]
    previous: JsonObject | None = None  # a duplicate: what we answered the first time, once known
    wait_s: float = 0.0  # rate limited: until the oldest run leaves the window


class TrainAdmissions:
    """The /train state of each interaction: its dedupe claim, the user's rate window, the relay record."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._admit = client.register_script(_ADMIT_LUA)

    def admit(self, interaction_id: str, record: TrainRecord, limit_per_hour: int) -> Admission:
        """One round trip: claim the interaction id, apply the per-user limit, store the relay record."""
        answer = self._admit(
            keys=[interaction_key(interaction_id), train_rate_key(record.user_id), train_record_key(record.request_id)],
            args=[INTERACTION_DEDUPE_TTL_S, TRAIN_RATE_WINDOW_S * 1000, limit_per_hour, interaction_id,
                  record.to_json(), TRAIN_RECORD_TTL_S],
        )
        if not isinstance(answer, list) or len(answer) != 2:
            raise redis.ResponseError(f"admission script answered {answer!r}")
        verdict, detail = answer
        if verdict == 0:
            return Admission("duplicate", previous=_stored_reply(detail))
        if verdict == 1:
            return Admission("rate_limited", wait_s=(detail if isinstance(detail, int) else 0) / 1000)
        return Admission("admitted")

    def remember_reply(self, interaction_id: str, body: JsonObject) -> None:
        """What a replay of this interaction will be answered (the claim keeps its expiry)."""
        self.client.set(interaction_key(interaction_id), json.dumps(body), xx=True, keepttl=True)

    def undo(self, interaction_id: str, record: TrainRecord) -> None:
        """Forget an admission, so that neither a retry nor the user's allowance pays for a job never queued."""
        with contextlib.suppress(redis.RedisError):
            self.client.delete(interaction_key(interaction_id), train_record_key(record.request_id))
            self.client.zrem(train_rate_key(record.user_id), interaction_id)


def _stored_reply(stored: object) -> JsonObject | None:
    if not isinstance(stored, bytes) or stored == _PENDING:
        return None
    try:
        body: object = json.loads(stored)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body if isinstance(body, dict) else None


# One round trip: take the lease if free, renew it if ours, else report someone else holds it.
_CLAIM_LUA: Final = """
local holder = redis.call('GET', KEYS[1])
if not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


async def claim_relay(client: aioredis.Redis, request_id: str, replica_id: str) -> bool:
    """Whether this replica relays the job's events (it took or renewed the job's lease)."""
    claimed: object = await client.eval(_CLAIM_LUA, 1, relay_owner_key(request_id), replica_id, OWNER_LEASE_S)
    return claimed == 1
