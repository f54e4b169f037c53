"""Training events reach the Discord user: edits of the /train reply, a DM after the token expires, once."""

from __future__ import annotations

import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import redis

from app.contracts import TrainCompletedV1, TrainFailedV1, TrainProgressV1, TrainStartedV1, dump_event
from app.discord.state import TrainRecord, train_record_key
from tests.discord_support import Signer, command, settings_for, snowflake
from tests.fake_discord import FakeDiscord, Scripted
from tests.support import ServedApp, serve, wait_until
from worker.cli.redis_embedded import EmbeddedRedis, free_port

CHANNEL = "digits:events"
EDIT = r"^/webhooks/424242/[^/]+/messages/@original$"


def _serve_relaying(signer: Signer, fake: FakeDiscord, redis_url: str, **overrides: Any) -> ServedApp:
    values: dict[str, Any] = {"redis_url": redis_url, "discord_train_rate_per_hour": 0,
                              "discord_bot_token": "bot-secret"}
    values.update(overrides)
    served = serve(settings_for(signer, fake.api_base, **values))
    relay = served.app.state.discord.relay
    wait_until(relay.subscribed.is_set, what="the relay to subscribe")
    return served


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, fake: FakeDiscord, signer: Signer) -> Iterator[ServedApp]:
    served = _serve_relaying(signer, fake, redis_server.url)
    yield served
    served.stop()


@pytest.fixture
def r(redis_server: EmbeddedRedis, fake: FakeDiscord) -> Iterator[redis.Redis]:
    fake.reset()
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


class Job:
    """A /train started through the endpoint, and the events its worker would publish."""

    def __init__(self, api: ServedApp, signer: Signer, *, in_guild: bool = True) -> None:
        self.user_id = snowflake()
        self.token = f"tok-{snowflake()}"
        reply = api.post(signer, command("train", user_id=self.user_id, token=self.token, in_guild=in_guild))
        text = reply.json()["data"]["content"]
        found_request = re.search(r"request id `([^`]+)`", text)
        found_job = re.search(r"job id `([^`]+)`", text)
        assert found_request and found_job, text
        self.request_id, self.job_id = found_request.group(1), found_job.group(1)

    def _ids(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "user_id": int(self.user_id), "model_id": "mnist_resnet18_v1",
                "job_id": self.job_id}

    def started(self) -> str:
        return dump_event(TrainStartedV1(**self._ids(), total_epochs=2, device="cpu"))

    def progress(self, pct: float, epoch: int = 1) -> str:
        return dump_event(TrainProgressV1(**self._ids(), epoch=epoch, total_epochs=2, batch=int(pct), total_batches=100,
                                          loss=0.5 - pct / 1000, samples_per_sec=812.0, pct=pct))

    def completed(self, activated: bool = True) -> str:
        return dump_event(TrainCompletedV1(**self._ids(), val_acc=0.9812, test_acc=0.9803, version="v20260101-1",
                                           activated=activated))

    def failed(self) -> str:
        return dump_event(TrainFailedV1(**self._ids(), error_kind="system", message="CUDA out of memory\ntrace..."))

    def edit_path(self) -> str:
        return rf"^/webhooks/424242/{re.escape(self.token)}/messages/@original$"


def test_progress_and_completion_edit_the_train_reply(api: ServedApp, signer: Signer, r: redis.Redis,
                                                      fake: FakeDiscord) -> None:
    job = Job(api, signer)
    r.publish(CHANNEL, job.started())
    started = fake.wait_for("PATCH", job.edit_path())[0]
    assert "started" in started.json()["content"]
    assert started.json()["allowed_mentions"] == {"parse": []}
    assert started.headers["user-agent"].startswith("DiscordBot (")
    for pct in range(5, 100, 5):  # a burst of progress, faster than Discord should be edited
        r.publish(CHANNEL, job.progress(float(pct), epoch=1 if pct < 50 else 2))
        time.sleep(0.06)
    r.publish(CHANNEL, job.completed())
    edits = fake.wait_for("PATCH", job.edit_path(), count=2)
    wait_until(lambda: "finished" in fake.calls_to("PATCH", job.edit_path())[-1].json()["content"],
               what="the completion edit")
    edits = fake.calls_to("PATCH", job.edit_path())
    final = edits[-1].json()["content"]
    assert "Validation accuracy 98.12%" in final and "test accuracy 98.03%" in final
    assert "v20260101-1" in final and "now the active model" in final
    progress = [e for e in edits if "batch" in e.json()["content"]]
    assert progress, "at least one progress edit is shown"
    assert "█" in progress[0].json()["content"] and "loss" in progress[0].json()["content"]
    # At most one progress edit per interval (0.5 s here over ~1.2 s of events): not one per event.
    assert len(edits) <= 6, [e.json()["content"] for e in edits]
    gaps = [b.at - a.at for a, b in itertools.pairwise(edits[:-1])]
    assert all(gap >= 0.4 for gap in gaps), gaps
    time.sleep(0.7)
    assert len(fake.calls_to("PATCH", job.edit_path())) == len(edits), "nothing is edited after the result"


def test_failure_shows_a_short_reason(api: ServedApp, signer: Signer, r: redis.Redis, fake: FakeDiscord) -> None:
    job = Job(api, signer)
    r.publish(CHANNEL, job.failed())
    text = fake.wait_for("PATCH", job.edit_path())[0].json()["content"]
    assert "failed" in text and "CUDA out of memory" in text and "trace" not in text


def test_events_of_jobs_not_started_from_discord_are_left_alone(api: ServedApp, r: redis.Redis,
                                                                 fake: FakeDiscord) -> None:
    stranger = TrainStartedV1(request_id="from-http", user_id=1, model_id="m", job_id="j", total_epochs=1)
    r.publish(CHANNEL, dump_event(stranger))
    r.publish(CHANNEL, b"not json at all")
    time.sleep(0.5)
    assert fake.calls == []


def _age_interaction(r: redis.Redis, job: Job, minutes: float) -> None:
    key = train_record_key(job.request_id)
    record = TrainRecord.from_json(r.get(key))
    assert record is not None
    r.set(key, replace(record, created_at=time.time() - minutes * 60).to_json(), keepttl=True)


def test_after_the_token_expires_the_result_arrives_as_a_dm(api: ServedApp, signer: Signer, r: redis.Redis,
                                                            fake: FakeDiscord) -> None:
    job = Job(api, signer)
    _age_interaction(r, job, 16)
    r.publish(CHANNEL, job.progress(50.0))
    r.publish(CHANNEL, job.completed(activated=False))
    opened = fake.wait_for("POST", r"^/users/@me/channels$")[0]
    assert opened.json() == {"recipient_id": job.user_id}
    assert opened.headers["authorization"] == "Bot bot-secret"
    sent = fake.wait_for("POST", rf"^/channels/9{job.user_id}/messages$")[0]
    assert "finished" in sent.json()["content"] and "not activated" in sent.json()["content"]
    assert sent.json()["allowed_mentions"] == {"parse": []}
    assert fake.calls_to("PATCH", EDIT) == [], "a dead token is not used"
    assert len(fake.calls_to("POST", r"^/channels/")) == 1, "progress is not sent by DM"


def test_a_token_discord_no_longer_accepts_falls_back_to_a_dm(api: ServedApp, signer: Signer, r: redis.Redis,
                                                              fake: FakeDiscord) -> None:
    job = Job(api, signer)
    _age_interaction(r, job, 1)  # not young: no 404 retries
    fake.script("PATCH", EDIT, Scripted(401, {"message": "Invalid Webhook Token", "code": 50027}))
    r.publish(CHANNEL, job.failed())
    sent = fake.wait_for("POST", r"^/channels/[^/]+/messages$")[0]
    assert "failed" in sent.json()["content"]
    assert len(fake.calls_to("PATCH", EDIT)) == 1


def test_an_edit_that_is_rate_limited_waits_retry_after(api: ServedApp, signer: Signer, r: redis.Redis,
                                                        fake: FakeDiscord) -> None:
    job = Job(api, signer)
    fake.script("PATCH", EDIT, Scripted(429, {"message": "rate limited", "retry_after": 0.4, "global": False},
                                        {"Retry-After": "1"}))
    r.publish(CHANNEL, job.completed())
    first, second = fake.wait_for("PATCH", job.edit_path(), count=2)
    assert second.at - first.at >= 0.35
    assert "finished" in second.json()["content"]


def test_without_a_bot_token_an_expired_result_is_dropped_quietly(redis_server: EmbeddedRedis, signer: Signer,
                                                                  r: redis.Redis, fake: FakeDiscord) -> None:
    # Its own channel, so that the module's other replica (which has a bot token) stays out of it.
    served = _serve_relaying(signer, fake, redis_server.url, discord_bot_token=None,
                             digits_events_channel="digits:events:no-bot")
    try:
        job = Job(served, signer)
        _age_interaction(r, job, 20)
        r.publish("digits:events:no-bot", job.completed())
        time.sleep(0.8)
    finally:
        served.stop()
    assert fake.calls == []


def test_with_two_replicas_each_event_is_relayed_once(api: ServedApp, redis_server: EmbeddedRedis, signer: Signer,
                                                      r: redis.Redis, fake: FakeDiscord) -> None:
    second = _serve_relaying(signer, fake, redis_server.url)
    try:
        job = Job(second, signer)
        r.publish(CHANNEL, job.started())
        fake.wait_for("PATCH", job.edit_path())
        r.publish(CHANNEL, job.completed())
        fake.wait_for("PATCH", job.edit_path(), count=2)
        time.sleep(0.7)
    finally:
        second.stop()
    edits = [c.json()["content"] for c in fake.calls_to("PATCH", job.edit_path())]
    assert len(edits) == 2, edits
    assert "started" in edits[0] and "finished" in edits[1]


def test_the_relay_resubscribes_after_a_redis_outage(fake: FakeDiscord, signer: Signer) -> None:
    fake.reset()
    port = free_port()
    server = EmbeddedRedis(port=port).start()
    served = _serve_relaying(signer, fake, server.url)
    relay = served.app.state.discord.relay
    try:
        server.stop()
        wait_until(lambda: not relay.subscribed.is_set(), what="the relay to notice the outage")
        server = EmbeddedRedis(port=port).start()
        wait_until(relay.subscribed.is_set, timeout=20, what="the relay to resubscribe")
        job = Job(served, signer)
        client = redis.Redis.from_url(server.url)
        client.publish(CHANNEL, job.completed())
        client.close()
        assert "finished" in fake.wait_for("PATCH", job.edit_path())[0].json()["content"]
    finally:
        served.stop()
        server.stop()
