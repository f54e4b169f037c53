"""POST /v1/train and GET /v1/jobs/{id} on the real API process: auth, overrides, RQ options, 503s."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from rq.job import Job

from app.contracts import TRAIN_JOB_FUNC, DigitsTrainJobV1
from tests.serving_support import digit_png, install_model
from tests.support import ServedApp
from tests.train_support import API_KEY
from worker.cli.redis_embedded import free_port

ServeApp = Callable[..., ServedApp]
KEY = {"X-Api-Key": API_KEY}


def test_train_enqueues_with_the_contract_options_and_validated_overrides(
    served_app: ServeApp, redis_url: str, data_dir: Path
) -> None:
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        r = client.post("/v1/train", headers={**KEY, "X-Request-ID": "req-abc-1"},
                        json={"epochs": 2, "lr": 1, "augment": False, "user_id": 42, "model_id": "digits_b"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert body["request_id"] == "req-abc-1" and r.headers["X-Request-ID"] == "req-abc-1"
        job_id = body["job_id"]
        assert body["status_url"] == f"/v1/jobs/{job_id}"

        conn = redis.Redis.from_url(redis_url)
        job = Job.fetch(job_id, connection=conn)
        assert job.func_name == TRAIN_JOB_FUNC and job.origin == "digits"
        assert (job.timeout, job.result_ttl, job.failure_ttl) == (25200, 86400, 604800)
        assert job.retries_left == 2 and job.retry_intervals == [60, 300]
        payload = DigitsTrainJobV1.model_validate(job.args[0])
        assert payload == DigitsTrainJobV1(request_id="req-abc-1", user_id=42, model_id="digits_b", epochs=2,
                                           lr=1.0, augment=False)
        conn.close()

        status = client.get(f"/v1/jobs/{job_id}", headers=KEY).json()
        assert status["status"] == "queued" and status["stage"] == "queued"
        assert (status["request_id"], status["user_id"], status["model_id"]) == ("req-abc-1", 42, "digits_b")
        assert status["progress"] is None and status["result"] is None and status["error"] is None

        # No body at all: the /train defaults.
        r = client.post("/v1/train", headers=KEY)
        assert r.status_code == 202
        conn = redis.Redis.from_url(redis_url)
        defaults = DigitsTrainJobV1.model_validate(Job.fetch(r.json()["job_id"], connection=conn).args[0])
        conn.close()
        assert defaults == DigitsTrainJobV1(request_id=r.json()["request_id"], user_id=0)

        # No model yet and a training job waiting: a reader is told so, with the job to follow.
        latest = r.json()["job_id"]
        for answer in (client.post("/v1/read", files={"file": ("d.png", digit_png(), "image/png")}),
                       client.get("/readyz")):
            assert answer.status_code == 503 and answer.json()["code"] == "service_not_ready"
            assert f"a model is training now (job {latest}: waiting for a worker" in answer.json()["message"]


def test_train_refuses_bad_keys_and_bad_overrides(served_app: ServeApp, redis_url: str, data_dir: Path) -> None:
    api = served_app(redis_url=redis_url, data_dir=data_dir, handwriting_api_key=API_KEY)
    with httpx.Client(base_url=api.url, timeout=30) as client:
        assert client.post("/v1/train").status_code == 401
        r = client.post("/v1/train", headers={"X-Api-Key": "wrong"})
        assert r.status_code == 401 and r.json()["code"] == "unauthorized"
        for bad in ({"epochs": 0}, {"epochs": 101}, {"batch_size": 5000}, {"lr": 0}, {"lr": 1.5},
                    {"model_id": "../etc"}, {"epochs": "3"}, {"augment": 1}, {"notes": "x" * 501},
                    {"request_id": "mine"}, {"type": "other"}, {"unknown": 1}, {"user_id": -1}):
            r = client.post("/v1/train", headers=KEY, json=bad)
            assert r.status_code == 422, (bad, r.text)
            assert r.json()["code"] == "invalid_request", bad
        assert client.get("/v1/jobs/no-such-job").status_code == 404
        r = client.get("/v1/jobs/..%2F..%2Fetc")
        assert r.status_code == 404
    conn = redis.Redis.from_url(redis_url)
    assert conn.llen("rq:queue:digits") == 0, "nothing refused was enqueued"
    conn.close()


def test_train_without_a_key_configured_is_closed(served_app: ServeApp, redis_url: str, data_dir: Path) -> None:
    api = served_app(redis_url=redis_url, data_dir=data_dir)
    r = httpx.post(api.url + "/v1/train", headers={"X-Api-Key": ""}, timeout=30)
    assert r.status_code == 401


def test_without_redis_training_is_unavailable_and_reads_still_work(
    served_app: ServeApp, data_dir: Path
) -> None:
    install_model(data_dir, "v1", forced_digit=7)
    no_redis = served_app(data_dir=data_dir, handwriting_api_key=API_KEY)
    down_port = free_port()
    redis_down = served_app(data_dir=data_dir, handwriting_api_key=API_KEY,
                            redis_url=f"redis://127.0.0.1:{down_port}/0")
    for api, wording in ((no_redis, "not configured"), (redis_down, "cannot be reached")):
        with httpx.Client(base_url=api.url, timeout=30) as client:
            t0 = time.monotonic()
            r = client.post("/v1/train", headers=KEY, json={"epochs": 1})
            assert r.status_code == 503, r.text
            assert r.json()["code"] == "training_unavailable" and wording in r.json()["message"]
            assert time.monotonic() - t0 < 15
            assert client.get("/v1/jobs/abc").json()["code"] == "training_unavailable"
            assert client.get("/healthz").status_code == 200
            read = client.post("/v1/read", files={"file": ("d.png", digit_png(), "image/png")})
            assert read.status_code == 200, read.text
            assert read.json()["digit"] == 7
