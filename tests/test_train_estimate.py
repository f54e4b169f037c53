"""A job that cannot finish within the job timeout is refused at enqueue: 422 on POST /v1/train, a reply on /train.

The estimate is the newest measured speed a worker recorded in Redis (or TRAIN__ESTIMATE_IMAGES_PER_S before
any) x the images it trains per epoch x epochs. Here the measurement is written as a worker writes it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from app.contracts import DigitsTrainJobV1
from app.estimate import JOB_OVERHEAD_S, Throughput, latest_throughput, throughput_key
from tests.discord_support import Signer, command, settings_for, snowflake
from tests.fake_discord import FakeDiscord
from tests.support import ServedApp, serve
from tests.train_support import API_KEY
from worker.job import RunResult, throughput_write
from worker.outbox import RedisOutbox

KEY = {"X-Api-Key": API_KEY}


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def _record(conn: redis.Redis, *, train_seconds: float, samples: int = 55_000, epochs: int = 1,
            device: str = "cpu (2 threads, fp32)") -> None:
    """What a worker records after a job (worker.job.throughput_write through its outbox)."""
    result = RunResult(model_id="m", version="v", val_acc=0.9, test_acc=0.9, activated=True, uploaded=True,
                       artifacts_dir="/x", device=device, train_seconds=train_seconds, train_samples=samples,
                       epochs=epochs, arch="resnet18_1ch")
    assert RedisOutbox(conn).send(throughput_write("digits", result))


def test_a_measured_worker_speed_refuses_what_it_cannot_finish_with_422(
    served_app: Callable[..., ServedApp], redis_url: str, data_dir: Path, conn: redis.Redis,
) -> None:
    _record(conn, train_seconds=2750.0)  # 55,000 images in 2,750 s: 20 images/s, about 46 min an epoch
    measured = latest_throughput(conn, "digits")
    assert measured is not None and measured.images_per_s == pytest.approx(20.0)
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        r = client.post("/v1/train", headers=KEY, json={"epochs": 20})
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["code"] == "job_too_long" and body["request_id"]
        message = body["message"]
        assert "20 epochs would take about 15.4 h" in message and "20 images/s" in message
        assert "cpu (2 threads, fp32)" in message and "7.0 h" in message
        # The largest count that fits is named, and is accepted.
        found = re.search(r"at most (\d+) epochs fit", message)
        assert found, message
        fits = int(found.group(1))
        assert fits == int((25200 - JOB_OVERHEAD_S) * 20 / 55_000) == 9
        assert conn.llen("rq:queue:digits") == 0, "nothing was enqueued"
        assert client.post("/v1/train", headers=KEY, json={"epochs": fits + 1}).status_code == 422
        assert client.post("/v1/train", headers=KEY, json={"epochs": fits}).status_code == 202
        assert conn.llen("rq:queue:digits") == 1


def test_the_newest_measurement_wins_and_a_faster_worker_accepts_more(
    served_app: Callable[..., ServedApp], redis_url: str, data_dir: Path, conn: redis.Redis,
) -> None:
    _record(conn, train_seconds=2750.0)
    _record(conn, train_seconds=55.0, device="cuda:0 NVIDIA H200 (bf16)")  # 1,000 images/s, recorded later
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY)
    r = httpx.post(api.url + "/v1/train", headers=KEY, json={"epochs": 100}, timeout=30)
    assert r.status_code == 202, r.text
    assert len(conn.hgetall(throughput_key("digits"))) == 2  # one record per device and network


def test_before_any_measurement_the_stated_default_applies(
    served_app: Callable[..., ServedApp], redis_url: str, data_dir: Path, conn: redis.Redis,
) -> None:
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY,
                     train={"estimate_images_per_s": 60.0})
    with httpx.Client(base_url=api.url, timeout=30) as client:
        refused = client.post("/v1/train", headers=KEY, json={"epochs": 100})
        assert refused.status_code == 422
        assert "assumed before any job was measured (TRAIN__ESTIMATE_IMAGES_PER_S)" in refused.json()["message"]
        assert client.post("/v1/train", headers=KEY, json={"epochs": 1}).status_code == 202


def test_an_unreadable_record_is_ignored(conn: redis.Redis, redis_url: str) -> None:
    conn.hset(throughput_key("digits"), "junk", b"{not json")
    assert latest_throughput(conn, "digits") is None
    good = Throughput(device="cpu", arch="a", images_per_s=10.0, epoch_images=100)
    conn.hset(throughput_key("digits"), good.field, good.model_dump_json())
    assert latest_throughput(conn, "digits") == good


@pytest.fixture
def discord_api(redis_url: str, fake: FakeDiscord, signer: Signer) -> Iterator[ServedApp]:
    served = serve(settings_for(signer, fake.api_base, redis_url=redis_url, discord_train_rate_per_hour=1))
    yield served
    served.stop()


def test_discord_train_that_cannot_finish_is_refused_in_the_reply(
    discord_api: ServedApp, signer: Signer, conn: redis.Redis,
) -> None:
    _record(conn, train_seconds=2750.0)
    user = snowflake()
    reply = discord_api.post(signer, command("train", user_id=user,
                                             options=[{"name": "epochs", "type": 4, "value": 20}]))
    assert reply.status_code == 200
    data = reply.json()["data"]
    assert data["flags"] == 64  # only the caller sees it
    assert data["content"].startswith("Training not started: 20 epochs would take about 15.4 h")
    assert "at most 9 epochs fit" in data["content"]
    assert conn.llen("rq:queue:digits") == 0
    # A refusal does not use up the user's hourly allowance (1 here): a job that fits still starts.
    ok = discord_api.post(signer, command("train", user_id=user, options=[{"name": "epochs", "type": 4, "value": 2}]))
    assert "Training queued: 2 epochs" in ok.json()["data"]["content"]
    assert conn.llen("rq:queue:digits") == 1


def test_the_estimate_counts_what_the_worker_trains_per_epoch(conn: redis.Redis, redis_url: str) -> None:
    # A worker with TRAIN__LIMIT=64 trains 64 images an epoch: 100 epochs of it are quick even at 1 image/s.
    _record(conn, train_seconds=64.0, samples=64)
    from app.estimate import check_fits
    from config.settings import TrainSettings

    estimate = check_fits(conn, "digits", DigitsTrainJobV1(request_id="r", user_id=0, epochs=100), TrainSettings())
    assert estimate.epoch_images == 64 and estimate.seconds == pytest.approx(JOB_OVERHEAD_S + 6400)
