"""POST /discord/interactions over real HTTP: signatures, PING, routing, and /train against a real Redis."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from rq import Queue
from rq.job import Job

from tests.discord_support import Signer, command, settings_for, snowflake
from tests.fake_discord import FakeDiscord
from tests.support import ServedApp, serve
from worker.cli.redis_embedded import EmbeddedRedis, free_port

EPHEMERAL = 64


@pytest.fixture(scope="module")
def api(redis_server: EmbeddedRedis, fake: FakeDiscord, signer: Signer) -> Iterator[ServedApp]:
    served = serve(settings_for(signer, fake.api_base, redis_url=redis_server.url, discord_train_rate_per_hour=3))
    yield served
    served.stop()


@pytest.fixture
def r(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def content(response: Any) -> str:
    body = response.json()
    assert body["type"] == 4
    assert body["data"]["flags"] == EPHEMERAL
    assert body["data"]["allowed_mentions"] == {"parse": []}
    text: str = body["data"]["content"]
    return text


def ids_in(text: str) -> tuple[str, str]:
    request = re.search(r"request id `([^`]+)`", text)
    job = re.search(r"job id `([^`]+)`", text)
    assert request and job, text
    return request.group(1), job.group(1)


def job_payload(r: redis.Redis, job_id: str) -> dict[str, Any]:
    job = Job.fetch(job_id, connection=r)
    assert job.origin == "digits"
    payload = job.args[0] if job.args else next(iter(job.kwargs.values()))
    return payload if isinstance(payload, dict) else json.loads(payload)


# -- verification ---------------------------------------------------------------------------------


def test_ping_is_answered_with_pong(api: ServedApp, signer: Signer) -> None:
    response = api.post(signer, {"type": 1, "id": snowflake(), "application_id": "424242", "token": "t"})
    assert response.status_code == 200
    assert response.json() == {"type": 1}


def _signed(signer: Signer, body: bytes) -> dict[str, str]:
    return signer.sign(body)


@pytest.mark.parametrize(
    "tamper",
    ["no signature", "no timestamp", "no headers", "non-hex", "short", "long", "wrong key", "body changed",
     "timestamp changed", "empty body"],
)
def test_anything_not_signed_by_discord_is_401(api: ServedApp, signer: Signer, tamper: str) -> None:
    body = b'{"type":1}'
    headers = signer.sign(body)
    sig, ts = headers["X-Signature-Ed25519"], headers["X-Signature-Timestamp"]
    if tamper == "no signature":
        del headers["X-Signature-Ed25519"]
    elif tamper == "no timestamp":
        del headers["X-Signature-Timestamp"]
    elif tamper == "no headers":
        headers = {"Content-Type": "application/json"}
    elif tamper == "non-hex":
        headers["X-Signature-Ed25519"] = "g" * 128
    elif tamper == "short":
        headers["X-Signature-Ed25519"] = sig[:64]
    elif tamper == "long":
        headers["X-Signature-Ed25519"] = sig + "ab"
    elif tamper == "wrong key":
        headers = Signer().sign(body, ts)
    elif tamper == "body changed":
        body = b'{"type":2}'
    elif tamper == "timestamp changed":
        headers["X-Signature-Timestamp"] = str(int(ts) + 1)
    elif tamper == "empty body":
        body = b""
    import httpx

    response = httpx.post(api.url + "/discord/interactions", content=body, headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.json()["code"] == "unauthorized"


def test_a_body_over_the_cap_is_413(api: ServedApp, signer: Signer) -> None:
    body = b'{"type":1,"pad":"' + b"x" * (1024 * 1024) + b'"}'
    response = api.post(signer, body)
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"


def test_a_signed_body_that_is_not_json_is_401(api: ServedApp, signer: Signer) -> None:
    assert api.post(signer, b"\xff\xfenot json").status_code == 401
    assert api.post(signer, b"{truncated").status_code == 401


def test_without_a_public_key_the_endpoint_says_why(fake: FakeDiscord, signer: Signer) -> None:
    served = serve(settings_for(None, fake.api_base))
    try:
        response = served.post(signer, {"type": 1})
    finally:
        served.stop()
    assert response.status_code == 503
    assert "DISCORD_PUBLIC_KEY" in response.json()["message"]


def test_stale_timestamps_are_refused_when_a_window_is_configured(fake: FakeDiscord, signer: Signer) -> None:
    import httpx

    served = serve(settings_for(signer, fake.api_base, discord_timestamp_max_age_s=60))
    try:
        body = b'{"type":1}'
        stale = httpx.post(served.url + "/discord/interactions", content=body,
                           headers=signer.sign(body, str(int(time.time()) - 3600)), timeout=10)
        fresh = served.post(signer, body)
    finally:
        served.stop()
    assert stale.status_code == 401
    assert fresh.status_code == 200


# -- routing --------------------------------------------------------------------------------------


def test_unknown_commands_and_interaction_types_get_a_polite_ephemeral_reply(api: ServedApp, signer: Signer) -> None:
    unknown = api.post(signer, command("dance", user_id=snowflake()))
    assert unknown.status_code == 200
    assert "/dance" in content(unknown)
    button = api.post(signer, {"type": 3, "id": snowflake(), "token": "t", "data": {"custom_id": "x"}})
    assert button.status_code == 200
    assert "Sorry" in content(button)


# -- /train ---------------------------------------------------------------------------------------


def test_train_enqueues_a_real_job_and_shows_its_ids(api: ServedApp, signer: Signer, r: redis.Redis) -> None:
    user = snowflake()
    started = time.perf_counter()
    response = api.post(signer, command("train", user_id=user))
    elapsed = time.perf_counter() - started
    assert response.status_code == 200
    assert elapsed < 3.0
    request_id, job_id = ids_in(content(response))
    assert response.headers["X-Request-ID"] == request_id
    payload = job_payload(r, job_id)
    assert payload["type"] == "digits.train.v1"
    assert payload["request_id"] == request_id
    assert payload["user_id"] == int(user)
    assert (payload["model_id"], payload["epochs"], payload["batch_size"], payload["lr"], payload["seed"],
            payload["augment"], payload["notes"]) == ("mnist_resnet18_v1", 1, 256, 0.0015, 42, True,
                                                      "requested via /train")


def test_train_from_a_dm_takes_the_user_from_user_id(api: ServedApp, signer: Signer, r: redis.Redis) -> None:
    user = snowflake()
    response = api.post(signer, command("train", user_id=user, in_guild=False))
    _, job_id = ids_in(content(response))
    assert job_payload(r, job_id)["user_id"] == int(user)


def test_train_options_are_applied_and_checked_again(api: ServedApp, signer: Signer, r: redis.Redis) -> None:
    user = snowflake()
    chosen = api.post(signer, command("train", user_id=user, options=[
        {"name": "epochs", "type": 4, "value": 3}, {"name": "augment", "type": 5, "value": False}]))
    _, job_id = ids_in(content(chosen))
    payload = job_payload(r, job_id)
    assert (payload["epochs"], payload["augment"]) == (3, False)
    for bad in (0, 21, True, "5", 2.5):
        options = [{"name": "epochs", "type": 4, "value": bad}]
        refused = api.post(signer, command("train", user_id=user, options=options))
        assert "from 1 to 20" in content(refused)
        assert "job id" not in content(refused)


def test_train_is_rate_limited_per_user_with_the_wait_in_the_reply(api: ServedApp, signer: Signer) -> None:
    user = snowflake()
    for _ in range(3):
        assert "job id" in content(api.post(signer, command("train", user_id=user)))
    limited = content(api.post(signer, command("train", user_id=user)))
    assert "3 training runs per hour" in limited
    assert re.search(r"try again in (59|60) min", limited, re.IGNORECASE), limited
    # Another user is not affected.
    assert "job id" in content(api.post(signer, command("train", user_id=snowflake())))


def test_train_limit_is_shared_by_every_api_replica(
    api: ServedApp, redis_server: EmbeddedRedis, fake: FakeDiscord, signer: Signer
) -> None:
    other = serve(settings_for(signer, fake.api_base, redis_url=redis_server.url, discord_train_rate_per_hour=3))
    try:
        user = snowflake()
        for replica in (api, other, api):
            assert "job id" in content(replica.post(signer, command("train", user_id=user)))
        for replica in (other, api):
            limited = content(replica.post(signer, command("train", user_id=user)))
            assert "3 training runs per hour" in limited and "job id" not in limited
    finally:
        other.stop()


def test_the_same_interaction_delivered_twice_enqueues_once(api: ServedApp, signer: Signer, r: redis.Redis) -> None:
    interaction = command("train", user_id=snowflake())
    first = content(api.post(signer, interaction))
    second = content(api.post(signer, interaction))
    assert first == second
    _, job_id = ids_in(first)
    user_id = int(interaction["member"]["user"]["id"])
    mine = [job.id for job in Queue("digits", connection=r).get_jobs() if job_payload(r, job.id)["user_id"] == user_id]
    assert mine == [job_id]


def test_the_same_interaction_delivered_at_once_by_several_retries_enqueues_once(
    api: ServedApp, signer: Signer, r: redis.Redis
) -> None:
    interaction = command("train", user_id=snowflake())
    at_once = threading.Barrier(4)
    replies: list[str] = []

    def deliver() -> None:
        at_once.wait()
        replies.append(content(api.post(signer, interaction)))

    threads = [threading.Thread(target=deliver) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 4
    answered = {ids_in(reply) for reply in replies if "job id" in reply}
    assert len(answered) == 1, replies  # one job, named the same way to whoever got an answer with it
    assert all("job id" in reply or "already being handled" in reply for reply in replies), replies
    user_id = int(interaction["member"]["user"]["id"])
    mine = [job.id for job in Queue("digits", connection=r).get_jobs() if job_payload(r, job.id)["user_id"] == user_id]
    assert mine == [next(iter(answered))[1]]


def test_without_redis_training_is_not_configured(fake: FakeDiscord, signer: Signer) -> None:
    served = serve(settings_for(signer, fake.api_base))
    try:
        response = served.post(signer, command("train", user_id=snowflake()))
    finally:
        served.stop()
    assert content(response) == "Training is not configured."


def test_with_redis_down_training_is_unavailable_right_now(fake: FakeDiscord, signer: Signer) -> None:
    served = serve(settings_for(signer, fake.api_base, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        started = time.perf_counter()
        response = served.post(signer, command("train", user_id=snowflake()))
        elapsed = time.perf_counter() - started
    finally:
        served.stop()
    assert response.status_code == 200
    assert "unavailable right now" in content(response)
    assert elapsed < 3.0
