"""Replicas converge through Redis: what one API replica activates, every replica serves. No shared disk.

The replica where an upload or an activation lands (its promotion gate has decided) publishes it;
every other replica follows the shared pointer. In Redis:

    digits:models:active                      the shared active pointer: model_id, version, the weights' sha256
    digits:models:blob:<model_id>/<version>   that version's bytes: hash {manifest, weights}
    digits:models:published                   "<model_id>/<version>", most recently activated first; trimmed
                                              to API__REPLICATE_KEEP entries, a blob leaving with its entry
    channel digits:models:activated           a nudge after each publish

A follower trusts nothing it fetched: the weights' sha256 must be the pointer's and the manifest's, the
manifest must be one this service serves, and the version then enters the store through the same safe
load and smoke test as an upload (`ModelServer.adopt`). It does not re-run the gate: the gate ran where
the version landed, and the pointer is its decision. Pub/sub is fire-and-forget, so each replica also
re-reads the pointer every API__REPLICATE_POLL_S: a missed nudge costs at most that.

Redis down: reads go on with the model being served; an activation made meanwhile is published when
Redis answers again (it then wins over the older pointer), and a Redis that comes back empty is seeded
with the version the replicas serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from datetime import UTC, datetime
from typing import Annotated, Final

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError
from redis.exceptions import RedisError

from app.contracts import VERSION_PATTERN, WEIGHTS_FILE, ManifestV1_1, ModelId, Sha256Hex
from app.files import write_atomic
from app.loading import CandidateError
from app.observability import REPLICATION_EVENTS
from app.preprocess import PREPROCESS_HASH
from app.serving import ModelServer
from app.store import StoredVersion, StoreError
from config.settings import Settings

ACTIVE_KEY: Final = "digits:models:active"
PUBLISHED_KEY: Final = "digits:models:published"
BLOB_PREFIX: Final = "digits:models:blob:"
CHANNEL: Final = "digits:models:activated"

# One atomic step, so that two replicas publishing at once never leave a pointer without its blob:
# store the blob, move it to the front of the published list, point at it, delete the blobs of the
# entries past KEEP, nudge. With only_if_absent (seeding an empty Redis) nothing happens when a pointer
# is already there.
# KEYS: active, published. ARGV: member, blob prefix, manifest, weights, pointer body, keep,
# only_if_absent ("1"/"0"), channel.
_PUBLISH: Final = """
if ARGV[7] == '1' and redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', ARGV[2] .. ARGV[1], 'manifest', ARGV[3], 'weights', ARGV[4])
redis.call('LREM', KEYS[2], 0, ARGV[1])
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('SET', KEYS[1], ARGV[5])
local keep = tonumber(ARGV[6])
local gone = redis.call('LRANGE', KEYS[2], keep, -1)
redis.call('LTRIM', KEYS[2], 0, keep - 1)
for _, member in ipairs(gone) do redis.call('DEL', ARGV[2] .. member) end
redis.call('PUBLISH', ARGV[8], ARGV[5])
return 1
"""

log = logging.getLogger("app.replication")


class SharedPointer(BaseModel):
    """The body of ACTIVE_KEY and of each nudge: which version every replica serves, and its weights' hash."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    model_id: ModelId
    version: Annotated[StrictStr, Field(pattern=VERSION_PATTERN)]
    sha256: Sha256Hex
    origin: str
    at: str

    @property
    def member(self) -> str:
        return f"{self.model_id}/{self.version}"


class RefusedError(Exception):
    """What Redis holds for the pointer must not be served; the message says why."""


def blob_key(member: str) -> str:
    return BLOB_PREFIX + member


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Replicator:
    """Publishes this replica's activations to Redis and follows the shared pointer."""

    def __init__(self, settings: Settings, models: ModelServer) -> None:
        if settings.redis_url is None:
            raise ValueError("replication needs REDIS_URL")
        self.redis_url = settings.redis_url
        self.keep = settings.api.replicate_keep
        self.poll_s = settings.api.replicate_poll_s
        self.max_weights = settings.api.model_max_bytes
        self.models = models
        self.replica_id = uuid.uuid4().hex[:12]
        self._client: aioredis.Redis | None = None
        self._pending: StoredVersion | None = None  # activated here, not yet published
        self._refused: bytes | None = None  # the pointer body last refused: not fetched again until it changes
        self._reachable = True
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._client = self._connect()
        self.models.on_activated = self.activated_here
        self.models.fetch_missing = self.fetch_missing
        self._tasks = [
            asyncio.create_task(self._reconcile_forever(), name="replication-reconcile"),
            asyncio.create_task(self._listen_forever(), name="replication-listen"),
        ]

    async def stop(self) -> None:
        self.models.on_activated = None
        self.models.fetch_missing = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    # --- this replica's activations ------------------------------------------------------------

    async def activated_here(self, stored: StoredVersion) -> None:
        """`ModelServer.on_activated`: publish what was just activated here. Never fails the activation:
        with Redis unreachable it is published by a later round."""
        self._pending = stored
        await self._publish_pending()

    async def _publish_pending(self) -> None:
        stored = self._pending
        if stored is None:
            return
        try:
            await self._publish(stored, only_if_absent=False)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return
        except RefusedError as exc:
            REPLICATION_EVENTS.labels(event="refused").inc()
            log.error("not publishing %s %s: %s", stored.model_id, stored.version, exc)
        else:
            self._reachable_again()
        if self._pending is stored:
            self._pending = None

    async def _publish(self, stored: StoredVersion, *, only_if_absent: bool) -> bool:
        """Put the version's bytes and the pointer to it in Redis, trim what Redis holds, nudge the others.

        With `only_if_absent` (seeding an empty Redis), only if no pointer is there yet.
        """
        client = self._require_client()
        try:
            weights = await asyncio.to_thread(stored.weights_path.read_bytes)
        except OSError as exc:  # pruned or damaged here meanwhile: nothing to publish, not a Redis problem
            raise RefusedError(f"its weights cannot be read: {exc}") from exc
        sha256 = await asyncio.to_thread(sha256_hex, weights)
        if stored.manifest.weights_sha256 not in (None, sha256):
            raise RefusedError(f"the stored weights' sha256 is {sha256}, its manifest says "
                               f"{stored.manifest.weights_sha256}; the local copy is damaged")
        manifest = stored.manifest.model_copy(update={"weights_sha256": sha256})
        pointer = SharedPointer(model_id=stored.model_id, version=stored.version, sha256=sha256,
                                origin=self.replica_id, at=datetime.now(UTC).isoformat())
        body = pointer.model_dump_json().encode()
        done = await client.eval(
            _PUBLISH, 2, ACTIVE_KEY, PUBLISHED_KEY,
            pointer.member, BLOB_PREFIX, manifest.model_dump_json(), weights, body, self.keep,
            "1" if only_if_absent else "0", CHANNEL,
        )
        if done != 1:
            return False  # another replica seeded first; this one follows it
        REPLICATION_EVENTS.labels(event="published").inc()
        log.info("published %s %s (sha256 %s) for the other replicas", pointer.model_id, pointer.version,
                 sha256[:12], extra={"model_id": pointer.model_id, "version": pointer.version})
        return True

    # --- following the shared pointer ----------------------------------------------------------

    async def reconcile(self) -> None:
        """One round: publish what is pending here, seed an empty Redis, or follow the shared pointer."""
        client = self._require_client()
        if self._pending is not None:
            await client.ping()  # cheap, before reading the weights again while Redis is still away
            async with self.models.changing():
                await self._publish_pending()
            return
        raw = await client.get(ACTIVE_KEY)
        self._reachable_again()
        served = self.models.active_manifest()
        if not isinstance(raw, bytes):
            if served is not None:  # a new or emptied Redis: seed it with what is served here
                async with self.models.changing():
                    try:
                        current = await asyncio.to_thread(self.models.store.get, served.model_id, served.version)
                        await self._publish(current, only_if_absent=True)
                    except (StoreError, RefusedError) as exc:
                        log.warning("cannot seed Redis with %s %s: %s", served.model_id, served.version, exc)
            return
        if raw == self._refused:
            return
        try:
            pointer = SharedPointer.model_validate_json(raw)
        except ValidationError as exc:
            self._refuse(raw, f"the shared pointer is malformed: {exc.errors()[:1]}")
            return
        if served is not None and (served.model_id, served.version) == (pointer.model_id, pointer.version) \
                and served.weights_sha256 in (None, pointer.sha256):
            return
        async with self.models.changing():
            # Re-read under the lock: an activation here, or a newer pointer, wins over what was read.
            if self._pending is not None or await client.get(ACTIVE_KEY) != raw:
                return
            await self._follow(pointer, raw)

    async def _follow(self, pointer: SharedPointer, raw: bytes) -> None:
        try:
            if await asyncio.to_thread(self._holds, pointer):
                await self.models.serve_stored(pointer.model_id, pointer.version)
            else:
                await self._receive(pointer.model_id, pointer.version, pointer.sha256, serve=True)
        except (RefusedError, CandidateError, StoreError) as exc:
            self._refuse(raw, f"{pointer.model_id} {pointer.version}: {exc}")
            return
        self._refused = None
        REPLICATION_EVENTS.labels(event="received").inc()
        log.info("now serving %s %s, activated on replica %s", pointer.model_id, pointer.version, pointer.origin,
                 extra={"model_id": pointer.model_id, "version": pointer.version})

    async def fetch_missing(self, model_id: str, version: str) -> bool:
        """`ModelServer.fetch_missing`: a rollback landed here for a version this replica does not hold;
        store it from Redis (active or recent versions only), checked like any other. The caller holds
        `changing()`. False when Redis does not hold it or it fails a check."""
        try:
            await self._receive(model_id, version, None, serve=False)
        except (RefusedError, CandidateError, StoreError, RedisError, OSError) as exc:
            log.warning("cannot fetch %s %s from Redis for an activation: %s", model_id, version, exc)
            return False
        REPLICATION_EVENTS.labels(event="received").inc()
        return True

    async def _receive(self, model_id: str, version: str, sha256: str | None, *, serve: bool) -> None:
        """Fetch a version from Redis, check it, and give it to the store through `ModelServer.adopt`."""
        manifest, weights, received = await self._fetch(model_id, version, sha256)
        store = self.models.store
        incoming = await asyncio.to_thread(store.new_incoming)
        try:
            await asyncio.to_thread(write_atomic, incoming / WEIGHTS_FILE, weights)
            await self.models.adopt(incoming, manifest, received, serve=serve)
        finally:
            await asyncio.to_thread(store.discard, incoming)

    def _holds(self, pointer: SharedPointer) -> bool:
        """Whether the local store has this version with exactly these weights (checked, not assumed)."""
        try:
            stored = self.models.store.get(pointer.model_id, pointer.version)
            return sha256_hex(stored.weights_path.read_bytes()) == pointer.sha256
        except (StoreError, OSError):
            return False

    async def _fetch(self, model_id: str, version: str, sha256: str | None) -> tuple[ManifestV1_1, bytes, str]:
        """A version's manifest, weights and their sha256 from Redis. Checked against `sha256` (the
        pointer's) when given, always against the hash in the manifest published with them, and against
        this service."""
        client = self._require_client()
        key = blob_key(f"{model_id}/{version}")
        size = await client.hstrlen(key, "weights")
        if not size:
            raise RefusedError("Redis does not hold its weights (trimmed, or never published)")
        if size > self.max_weights:
            raise RefusedError(f"its weights are {size} bytes, over API__MODEL_MAX_BYTES ({self.max_weights})")
        raw_manifest, weights = await client.hmget(key, ["manifest", "weights"])
        if not (isinstance(raw_manifest, bytes) and isinstance(weights, bytes)):
            raise RefusedError("Redis holds an incomplete copy")
        received = await asyncio.to_thread(sha256_hex, weights)
        if sha256 is not None and received != sha256:
            raise RefusedError(f"the weights received hash to {received}, the shared pointer says {sha256}")
        try:
            manifest = ManifestV1_1.model_validate_json(raw_manifest)
        except ValidationError as exc:
            raise RefusedError(f"its manifest is not a valid manifest v1.1: {exc.errors()[:1]}") from exc
        if (manifest.model_id, manifest.version) != (model_id, version):
            raise RefusedError(f"its manifest names {manifest.model_id} {manifest.version}")
        if manifest.weights_sha256 != received:
            raise RefusedError(f"the weights received hash to {received}, their manifest says "
                               f"{manifest.weights_sha256}")
        if manifest.preprocess_hash != PREPROCESS_HASH:
            raise RefusedError("it was trained on other preprocessing than this service's")
        return manifest, weights, received

    def _refuse(self, raw: bytes, reason: str) -> None:
        self._refused = raw
        REPLICATION_EVENTS.labels(event="refused").inc()
        log.error("not following the shared active model: %s", reason)

    # --- the loops -----------------------------------------------------------------------------

    async def _reconcile_forever(self) -> None:
        while True:
            try:
                await self.reconcile()
            except (RedisError, OSError) as exc:
                self._unreachable(exc)
            except Exception:
                REPLICATION_EVENTS.labels(event="error").inc()
                log.exception("model replication round failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_s):
                    await self._wake.wait()
            self._wake.clear()

    async def _listen_forever(self) -> None:
        """Wake the reconciler on each nudge; resubscribe (with back-off) whenever the subscription drops."""
        backoff = 0.5
        while True:
            client = self._connect()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(CHANNEL)
                backoff = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._wake.set()
            except (RedisError, OSError):
                pass  # the reconciler reports Redis being unreachable, and catches up by polling meanwhile
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()  # the subscription's connection included
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    def _unreachable(self, exc: BaseException) -> None:
        REPLICATION_EVENTS.labels(event="error").inc()
        if self._reachable:
            self._reachable = False
            log.warning("Redis unreachable for model replication (%s); serving the current model meanwhile", exc)

    def _reachable_again(self) -> None:
        if not self._reachable:
            self._reachable = True
            log.info("Redis reachable again for model replication")

    def _connect(self) -> aioredis.Redis:
        # A blob is up to API__MODEL_MAX_BYTES: a long socket timeout for its transfer, a short one to connect.
        return aioredis.Redis.from_url(
            self.redis_url, socket_connect_timeout=2.0, socket_timeout=30.0, health_check_interval=15
        )

    def _require_client(self) -> aioredis.Redis:
        if self._client is None:
            raise RuntimeError("the replicator is not running")
        return self._client
