"""The interaction handler as a plain function: raw signed bytes in, a `Reply` out, no web server.

Real parts: Ed25519 signatures, the embedded Redis and RQ's queue; the reader is the real (unstarted)
model server, which none of these interactions reach.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue

from app.discord.interaction import Reply
from app.discord.protocol import InteractionHandler
from app.discord.runtime import DiscordRuntime
from app.discord.state import TrainRecord, train_record_key
from app.serving import ModelServer
from tests.discord_support import Signer, command, settings_for, snowflake


@pytest.fixture
def handler(redis_url: str, signer: Signer, tmp_path: Path) -> Iterator[InteractionHandler]:
    settings = settings_for(signer, "http://127.0.0.1:9", redis_url=redis_url, data_dir=tmp_path)
    connection = redis.Redis.from_url(redis_url)
    runtime = DiscordRuntime(settings, connection, ModelServer(settings))
    yield runtime.handler
    asyncio.run(runtime.stop())
    connection.close()


def send(handler: InteractionHandler, signer: Signer, payload: dict[str, Any] | bytes,
         request_id: str = "req-1") -> Reply:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = signer.sign(body)
    return handler.handle(body, headers["X-Signature-Ed25519"], headers["X-Signature-Timestamp"], request_id)


def content(reply: Reply) -> str:
    assert reply.status == 200
    assert reply.body["type"] == 4
    data = reply.body["data"]
    assert isinstance(data, dict) and data["flags"] == 64
    text = data["content"]
    assert isinstance(text, str)
    return text


def test_ping_is_answered_with_pong(handler: InteractionHandler, signer: Signer) -> None:
    reply = send(handler, signer, {"type": 1, "id": snowflake()})
    assert (reply.status, reply.body, reply.background) == (200, {"type": 1}, None)


def test_a_body_signed_by_anyone_else_is_401(handler: InteractionHandler, signer: Signer) -> None:
    body = b'{"type":1}'
    forged = Signer().sign(body)
    reply = handler.handle(body, forged["X-Signature-Ed25519"], forged["X-Signature-Timestamp"], "req-forged")
    assert reply.status == 401
    assert reply.body == {"code": "unauthorized", "message": "invalid request signature", "request_id": "req-forged"}
    assert handler.handle(body, None, None, "req-none").status == 401


def test_train_enqueues_one_job_and_records_who_asked(handler: InteractionHandler, signer: Signer,
                                                       redis_url: str) -> None:
    user, token = snowflake(), f"tok-{snowflake()}"
    interaction = command("train", user_id=user, token=token,
                          options=[{"name": "epochs", "type": 4, "value": 2}])
    first = content(send(handler, signer, interaction, request_id="req-train"))
    assert "Training queued: 2 epochs, augmentation on" in first
    assert "request id `req-train`" in first
    # Discord retries a delivery it thinks failed: the replay is answered the same and enqueues nothing.
    assert content(send(handler, signer, interaction, request_id="req-replay")) == first
    connection = redis.Redis.from_url(redis_url)
    try:
        jobs = Queue("digits", connection=connection).get_jobs()
        record = TrainRecord.from_json(connection.get(train_record_key("req-train")))
    finally:
        connection.close()
    assert len(jobs) == 1 and f"job id `{jobs[0].id}`" in first
    payload = jobs[0].args[0]
    assert (payload["request_id"], payload["user_id"], payload["epochs"]) == ("req-train", int(user), 2)
    assert record is not None and (record.token, record.user_id) == (token, int(user))


def test_a_document_that_is_not_an_interaction_is_400(handler: InteractionHandler, signer: Signer) -> None:
    for shape in (b"[]", b'"hello"', b'{"id": "1"}', b'{"type": "2"}', b'{"type": 2.0}'):
        reply = send(handler, signer, shape, request_id="req-shape")
        assert reply.status == 400, shape
        assert reply.body["code"] == "bad_request"


def test_fields_of_the_wrong_shape_read_as_absent(handler: InteractionHandler, signer: Signer) -> None:
    nobody = command("train", user_id=snowflake()) | {"member": "nobody"}
    assert "missing who sent it" in content(send(handler, signer, nobody))
    huge_id = command("train", user_id=str(2**64))
    assert "missing who sent it" in content(send(handler, signer, huge_id))
    no_attachment = command("read", user_id=snowflake(), options=[{"name": "image", "type": 11, "value": "9"}],
                            resolved={"attachments": {"9": {"url": 42}}})
    assert "Attach a PNG or JPEG" in content(send(handler, signer, no_attachment))
    nameless = {"type": 2, "id": snowflake(), "token": "t", "data": {"name": ["train"]}}
    assert "I don't know that command" in content(send(handler, signer, nameless))
