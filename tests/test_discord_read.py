"""/read image:<attachment>: defer at once, then download, check, predict and edit the original response."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.discord_support import Signer, read_command, settings_for, snowflake
from tests.fake_discord import FakeDiscord, not_found, rate_limited
from tests.images import draw_digit, encode
from tests.serving_support import API_KEY, manifest, upload_files, weights_bytes
from tests.support import ServedApp, serve
from worker.cli.redis_embedded import free_port

EDIT = r"^/webhooks/424242/[^/]+/messages/@original$"
CLOSED = f"http://127.0.0.1:{free_port()}"  # an allowed origin where nothing listens
PNG = encode(draw_digit("7"))


def install_model(served: ServedApp, *, confidence: float | None = None) -> None:
    """A randomly initialised ResNet-18 (always answering 7), through the real admin upload endpoint."""
    data, files = upload_files(manifest(version=f"v-{snowflake()}"), weights_bytes(7, confidence))
    response = httpx.post(served.url + "/v1/admin/models/upload", data=data, files=files,
                          headers={"X-Api-Key": API_KEY}, timeout=60)
    assert response.status_code in (200, 201), response.text


@pytest.fixture(scope="module")
def api(fake: FakeDiscord, signer: Signer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServedApp]:
    data_dir: Path = tmp_path_factory.mktemp("read-data")
    served = serve(settings_for(signer, fake.api_base, data_dir=data_dir, handwriting_api_key=API_KEY,
                                discord_attachment_origins=f"{fake.url},{CLOSED}",
                                api={"read_max_bytes": 64 * 1024, "model_poll_s": 0}))
    install_model(served)
    yield served
    served.stop()


@pytest.fixture(autouse=True)
def _clean(fake: FakeDiscord) -> None:
    fake.reset()


def read(api: ServedApp, signer: Signer, fake: FakeDiscord, url: str, *, size: int,
         content_type: str | None = "image/png") -> str:
    """Sends /read, checks the immediate ephemeral defer, returns the text of the edit that follows."""
    token = f"tok-{snowflake()}"
    response = api.post(signer, read_command(url, user_id=snowflake(), size=size, content_type=content_type,
                                             token=token))
    assert response.status_code == 200
    assert response.json() == {"type": 5, "data": {"flags": 64}}
    edit = fake.wait_for("PATCH", rf"^/webhooks/424242/{token}/messages/@original$", timeout=15)[-1]
    assert edit.json()["allowed_mentions"] == {"parse": []}
    assert edit.headers["user-agent"].startswith("DiscordBot (")
    text: str = edit.json()["content"]
    return text


def test_read_answers_with_digit_confidence_top3_and_version(api: ServedApp, signer: Signer,
                                                             fake: FakeDiscord) -> None:
    url = fake.add_file("seven.png", PNG)
    text = read(api, signer, fake, url, size=len(PNG))
    assert text.startswith("I read **7** · confidence 100.0%")
    assert "Top 3: 7 (100.0%) · " in text
    assert "Model `mnist_resnet18_v1` version `v-" in text
    assert "not sure" not in text
    assert len(fake.calls_to("GET", r"^/attachments/seven.png$")) == 1


def test_an_uncertain_answer_comes_with_a_hint(fake: FakeDiscord, signer: Signer, tmp_path: Path) -> None:
    served = serve(settings_for(signer, fake.api_base, data_dir=tmp_path, handwriting_api_key=API_KEY,
                                api={"model_poll_s": 0}))
    try:
        install_model(served, confidence=0.4)
        url = fake.add_file("seven.png", PNG)
        text = read(served, signer, fake, url, size=len(PNG))
    finally:
        served.stop()
    assert "I read **7** · confidence 40.0%" in text
    assert "I'm not sure about this one" in text


def test_a_file_declared_too_large_is_refused_without_downloading(api: ServedApp, signer: Signer,
                                                                  fake: FakeDiscord) -> None:
    url = fake.add_file("huge.png", PNG)
    text = read(api, signer, fake, url, size=10 * 1024 * 1024)
    assert "too large" in text and "limit" in text
    assert fake.calls_to("GET", r"^/attachments/") == []


def test_a_file_larger_than_declared_is_cut_off(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    big = PNG + b"\0" * (80 * 1024)
    url = fake.add_file("liar.png", big)
    assert "too large" in read(api, signer, fake, url, size=1000)


def test_a_file_that_is_not_an_image_is_named_as_such(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    url = fake.add_file("notes.png", b"these are not the pixels you are looking for", "image/png")
    assert "isn't a PNG or JPEG" in read(api, signer, fake, url, size=45, content_type=None)


def test_an_unreachable_attachment_gets_a_clear_message(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    closed = f"{CLOSED}/attachments/gone.png"
    assert "couldn't download" in read(api, signer, fake, closed, size=100)
    expired = fake.add_file("expired.png", b"", status=404)
    assert "couldn't download" in read(api, signer, fake, expired, size=100)


def test_a_slow_attachment_times_out(fake: FakeDiscord, signer: Signer, tmp_path: Path) -> None:
    served = serve(settings_for(signer, fake.api_base, data_dir=tmp_path, discord_download_timeout_s=0.5,
                                handwriting_api_key=API_KEY, api={"model_poll_s": 0}))
    try:
        install_model(served)
        url = fake.add_file("slow.png", PNG, delay_s=2.0)
        text = read(served, signer, fake, url, size=len(PNG))
    finally:
        served.stop()
    assert "took too long" in text


def test_without_a_model_the_user_is_told_to_train_first(fake: FakeDiscord, signer: Signer, tmp_path: Path) -> None:
    served = serve(settings_for(signer, fake.api_base, data_dir=tmp_path, discord_read_public=True,
                                api={"model_poll_s": 0}))
    try:
        url = fake.add_file("seven.png", PNG)
        token = f"tok-{snowflake()}"
        response = served.post(signer, read_command(url, user_id=snowflake(), size=len(PNG), token=token))
        assert response.json() == {"type": 5}, "configured public: the defer is not ephemeral"
        text = fake.wait_for("PATCH", rf"/webhooks/424242/{token}/")[0].json()["content"]
    finally:
        served.stop()
    assert "No model is trained yet" in text and "/train" in text


def test_an_edit_that_404s_right_after_the_defer_is_retried(api: ServedApp, signer: Signer,
                                                            fake: FakeDiscord) -> None:
    fake.script("PATCH", EDIT, not_found(10008), not_found(10008))
    url = fake.add_file("seven.png", PNG)
    token = f"tok-{snowflake()}"
    api.post(signer, read_command(url, user_id=snowflake(), size=len(PNG), token=token))
    edits = fake.wait_for("PATCH", rf"/webhooks/424242/{token}/", count=3)
    assert edits[-1].json()["content"].startswith("I read **")
    assert 0.2 <= edits[1].at - edits[0].at < 2.0


def test_an_edit_that_is_rate_limited_honours_retry_after(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    fake.script("PATCH", EDIT, rate_limited(0.6))
    url = fake.add_file("seven.png", PNG)
    token = f"tok-{snowflake()}"
    api.post(signer, read_command(url, user_id=snowflake(), size=len(PNG), token=token))
    first, second = fake.wait_for("PATCH", rf"/webhooks/424242/{token}/", count=2)
    assert second.at - first.at >= 0.55
    assert second.json()["content"].startswith("I read **")


def test_a_read_without_an_attachment_is_answered_at_once(api: ServedApp, signer: Signer, fake: FakeDiscord) -> None:
    response = api.post(signer, read_command("ftp://x", user_id=snowflake(), size=1) | {"data": {"name": "read"}})
    body = response.json()
    assert body["type"] == 4 and body["data"]["flags"] == 64
    assert "Attach a PNG or JPEG" in body["data"]["content"]
