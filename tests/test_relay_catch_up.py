"""After a Redis gap the relay finishes the /train message from the job's own record, not only from pub/sub.

A real /train through the endpoint (a real RQ job), the local fake Discord, and a persistent embedded Redis
restarted under the relay. The final event is recorded in the job (as the worker records it once Redis is
back) but its publish never reaches the relay: only the catch-up after the resubscribe can show it.
"""

from __future__ import annotations

import time

import redis
from rq.job import Job as RqJob

from app.contracts import META_LAST_EVENT
from tests.discord_support import Signer
from tests.fake_discord import FakeDiscord
from tests.support import wait_until
from tests.test_discord_relay import CHANNEL, Job, _serve_relaying
from worker.cli.redis_embedded import EmbeddedRedis
from worker.events import save_meta


def test_a_result_that_fell_in_the_gap_still_ends_the_message(fake: FakeDiscord, signer: Signer) -> None:
    fake.reset()
    server = EmbeddedRedis(persistent=True).start()
    served = _serve_relaying(signer, fake, server.url)
    relay = served.app.state.discord.relay
    client = redis.Redis.from_url(server.url)
    try:
        job = Job(served, signer)
        client.publish(CHANNEL, job.started())
        assert "started" in fake.wait_for("PATCH", job.edit_path())[0].json()["content"]

        # The worker finished while the relay could not hear it: the result is in the job's record only.
        save_meta(RqJob.fetch(job.job_id, connection=client), {META_LAST_EVENT: job.completed()})
        time.sleep(0.5)
        assert len(fake.calls_to("PATCH", job.edit_path())) == 1, "pub/sub alone never tells the relay"

        client.close()
        server.halt()
        wait_until(lambda: not relay.subscribed.is_set(), what="the relay to notice the outage")
        server.start()  # same data: a restart, as a Redis with persistence does
        wait_until(relay.subscribed.is_set, timeout=30, what="the relay to resubscribe")

        wait_until(lambda: "finished" in fake.calls_to("PATCH", job.edit_path())[-1].json()["content"],
                   what="the catch-up edit")
        final = fake.calls_to("PATCH", job.edit_path())[-1].json()["content"]
        assert "Validation accuracy 98.12%" in final and "v20260101-1" in final
        time.sleep(0.7)
        assert len(fake.calls_to("PATCH", job.edit_path())) == 2, "the result is shown once"
    finally:
        client.close()
        served.stop()
        server.stop()


def test_a_job_still_running_after_the_gap_shows_its_latest_progress(fake: FakeDiscord, signer: Signer) -> None:
    fake.reset()
    server = EmbeddedRedis(persistent=True).start()
    served = _serve_relaying(signer, fake, server.url)
    relay = served.app.state.discord.relay
    client = redis.Redis.from_url(server.url)
    try:
        job = Job(served, signer)
        client.publish(CHANNEL, job.started())
        fake.wait_for("PATCH", job.edit_path())
        save_meta(RqJob.fetch(job.job_id, connection=client), {META_LAST_EVENT: job.progress(60.0, epoch=2)})
        client.close()
        server.halt()
        wait_until(lambda: not relay.subscribed.is_set(), what="the relay to notice the outage")
        server.start()
        wait_until(relay.subscribed.is_set, timeout=30, what="the relay to resubscribe")
        wait_until(lambda: "60%" in fake.calls_to("PATCH", job.edit_path())[-1].json()["content"],
                   what="the catch-up progress edit")
        # The job relay is still live: a later result published normally ends the message.
        client = redis.Redis.from_url(server.url)
        client.publish(CHANNEL, job.completed())
        wait_until(lambda: "finished" in fake.calls_to("PATCH", job.edit_path())[-1].json()["content"],
                   what="the completion edit")
    finally:
        client.close()
        served.stop()
        server.stop()
