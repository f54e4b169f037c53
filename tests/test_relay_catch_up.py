"""After a Redis gap the relay finishes the /train message from the job's own record, not only from pub/sub.

A real /train through the endpoint (a real RQ job), the local fake Discord, and a persistent embedded Redis
restarted under the relay. The job's last event is recorded (as the worker records it once Redis is back)
but its publish never reaches the relay: only the catch-up after the resubscribe can show it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis
from rq.job import Job as RqJob

from app.contracts import META_LAST_EVENT
from app.discord.relay import ProgressRelay
from tests.discord_support import Signer
from tests.fake_discord import FakeDiscord
from tests.support import ServedApp, wait_until
from tests.test_discord_relay import CHANNEL, Job, _serve_relaying
from worker.cli.redis_embedded import EmbeddedRedis
from worker.events import save_meta


@dataclass
class Relaying:
    server: EmbeddedRedis
    served: ServedApp
    relay: ProgressRelay

    def started_job(self, signer: Signer, fake: FakeDiscord) -> Job:
        """A /train whose `started` event was shown."""
        job = Job(self.served, signer)
        with redis.Redis.from_url(self.server.url) as client:
            client.publish(CHANNEL, job.started())
        assert "started" in fake.wait_for("PATCH", job.edit_path())[0].json()["content"]
        return job

    def record(self, job: Job, last_event: str) -> None:
        """What the worker writes to the job's meta; nothing is published."""
        with redis.Redis.from_url(self.server.url) as client:
            save_meta(RqJob.fetch(job.job_id, connection=client), {META_LAST_EVENT: last_event})

    def restart_redis(self) -> None:
        self.server.halt()
        wait_until(lambda: not self.relay.subscribed.is_set(), what="the relay to notice the outage")
        self.server.start()  # same data: a restart, as a Redis with persistence does
        wait_until(self.relay.subscribed.is_set, timeout=30, what="the relay to resubscribe")


@pytest.fixture
def relaying(fake: FakeDiscord, signer: Signer) -> Iterator[Relaying]:
    fake.reset()
    server = EmbeddedRedis(persistent=True).start()
    served = _serve_relaying(signer, fake, server.url)
    yield Relaying(server, served, served.app.state.discord.relay)
    served.stop()
    server.stop()


def _last_edit(fake: FakeDiscord, job: Job) -> str:
    content: str = fake.calls_to("PATCH", job.edit_path())[-1].json()["content"]
    return content


def test_a_result_that_fell_in_the_gap_still_ends_the_message(relaying: Relaying, fake: FakeDiscord,
                                                              signer: Signer) -> None:
    job = relaying.started_job(signer, fake)
    relaying.record(job, job.completed())  # the worker finished while the relay could not hear it
    time.sleep(0.5)
    assert len(fake.calls_to("PATCH", job.edit_path())) == 1, "pub/sub alone never tells the relay"

    relaying.restart_redis()
    wait_until(lambda: "finished" in _last_edit(fake, job), what="the catch-up edit")
    assert "Validation accuracy 98.12%" in _last_edit(fake, job) and "v20260101-1" in _last_edit(fake, job)
    time.sleep(0.7)
    assert len(fake.calls_to("PATCH", job.edit_path())) == 2, "the result is shown once"


def test_a_job_still_running_after_the_gap_shows_its_latest_progress(relaying: Relaying, fake: FakeDiscord,
                                                                      signer: Signer) -> None:
    job = relaying.started_job(signer, fake)
    relaying.record(job, job.progress(60.0, epoch=2))
    relaying.restart_redis()
    wait_until(lambda: "60%" in _last_edit(fake, job), what="the catch-up progress edit")
    # The job's relay is still live: a result published normally ends the message.
    with redis.Redis.from_url(relaying.server.url) as client:
        client.publish(CHANNEL, job.completed())
    wait_until(lambda: "finished" in _last_edit(fake, job), what="the completion edit")
