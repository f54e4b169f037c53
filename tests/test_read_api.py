"""POST /v1/read and the read-side endpoints, through the real app with real (random) ResNet-18 weights.

Every error code an existing client maps is produced here by the input that causes it.
"""

from __future__ import annotations

import base64
import io
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.preprocess import PREPROCESS_HASH
from tests.serving_support import digit_png, install_model, make_settings, png_bytes, running_app
from tests.support import ServedApp

pytestmark = pytest.mark.anyio

PNG = digit_png()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def client(data_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The API serving a model that always answers 7."""
    install_model(data_dir, "v7", forced_digit=7)
    async with running_app(make_settings(data_dir)) as c:
        yield c


async def read(
    client: httpx.AsyncClient, data: bytes, content_type: str = "image/png", **params: str
) -> httpx.Response:
    return await client.post("/v1/read", params=params, files={"file": ("digit", data, content_type)})


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code, body
    assert body["request_id"] == response.headers["X-Request-ID"]
    assert isinstance(body["message"], str) and body["message"]
    return str(body["message"])


# --- answers ---------------------------------------------------------------------------------------


async def test_read_answers_the_digit_with_the_model_that_computed_it(client: httpx.AsyncClient) -> None:
    response = await read(client, PNG)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["digit"] == 7
    assert body["model_id"] == "mnist_resnet18_v1" and body["version"] == "v7"
    assert len(body["probs"]) == 10 and abs(sum(body["probs"]) - 1.0) < 1e-4
    assert body["confidence"] == max(body["probs"]) and body["uncertain"] is False
    assert "visual_png_b64" not in body


async def test_latency_is_whole_milliseconds_as_the_gateway_bot_parses_it(client: httpx.AsyncClient) -> None:
    # The bot reads it with int(str(value)): "19.07" would fail every read it makes.
    latency = (await read(client, PNG)).json()["latency_ms"]  # json: 19 stays an int, 19.07 a float
    assert isinstance(latency, int) and not isinstance(latency, bool) and latency >= 0
    assert int(str(latency)) == latency
    schema = (await client.get("/openapi.json")).json()["components"]["schemas"]["ReadResponse"]
    assert schema["properties"]["latency_ms"]["type"] == "integer"


async def test_image_type_comes_from_the_bytes_not_the_declared_type(client: httpx.AsyncClient) -> None:
    jpeg = io.BytesIO()
    Image.open(io.BytesIO(PNG)).convert("RGB").save(jpeg, format="JPEG", quality=90)
    assert (await read(client, PNG, content_type="image/jpeg")).status_code == 200
    assert (await read(client, jpeg.getvalue(), content_type="application/octet-stream")).status_code == 200


async def test_visualize_returns_the_28x28_the_model_saw_enlarged(client: httpx.AsyncClient) -> None:
    body = (await read(client, PNG, visualize="true")).json()
    img = Image.open(io.BytesIO(base64.b64decode(body["visual_png_b64"])))
    assert img.format == "PNG" and img.size == (224, 224)
    pixels = np.asarray(img)
    assert pixels.max() > 200 and pixels[:16, :16].max() == 0  # white ink, centred on black


async def test_invert_auto_finds_the_ink_on_dark_or_light_paper(client: httpx.AsyncClient) -> None:
    async def seen(image: bytes, **invert: str) -> np.ndarray:
        response = await read(client, image, visualize="1", **invert)
        assert response.status_code == 200, (invert, response.text)
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["visual_png_b64"]))))

    light_on_dark = digit_png(dark_on_light=False)
    for image, right, wrong in ((PNG, "true", "false"), (light_on_dark, "false", "true")):
        expected = await seen(image, invert=right)
        # Auto (asked for, or by default) sees exactly what the image's own polarity gives, not the other:
        # forced the other way, the paper of this clean drawing is the "ink" of an empty page (400).
        assert_error(await read(client, image, invert=wrong), 400, "preprocessing_failed")
        for auto in ({"invert": "auto"}, {"invert": ""}, {}):
            assert np.array_equal(await seen(image, **auto), expected), (right, auto)
        assert expected[:16, :16].max() == 0 and expected.max() > 200  # white ink on black
    assert_error(await read(client, PNG, invert="sideways"), 422, "invalid_request")


async def test_confidence_under_the_threshold_is_uncertain(data_dir: Path) -> None:
    install_model(data_dir, "unsure", forced_digit=3, confidence=0.6)
    async with running_app(make_settings(data_dir)) as client:
        body = (await read(client, PNG)).json()
    assert body["digit"] == 3 and abs(body["confidence"] - 0.6) < 1e-4 and body["uncertain"] is True
    install_model(data_dir, "sure", forced_digit=3, confidence=0.9)
    async with running_app(make_settings(data_dir)) as client:
        body = (await read(client, PNG)).json()
    assert abs(body["confidence"] - 0.9) < 1e-4 and body["uncertain"] is False


async def test_test_time_augmentation_when_enabled_still_answers_one_distribution(data_dir: Path) -> None:
    install_model(data_dir, "tta", forced_digit=3, confidence=0.8)
    async with running_app(make_settings(data_dir, tta=True)) as client:
        body = (await read(client, PNG)).json()
    assert body["digit"] == 3 and abs(body["confidence"] - 0.8) < 1e-4 and abs(sum(body["probs"]) - 1) < 1e-4


async def test_request_id_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/read", files={"file": ("d.png", PNG, "image/png")},
                                 headers={"X-Request-ID": "trace-abc-123"})
    assert response.headers["X-Request-ID"] == "trace-abc-123"


# --- refusals --------------------------------------------------------------------------------------


async def test_no_model_is_503_service_not_ready_saying_how_to_get_one(data_dir: Path) -> None:
    async with running_app(make_settings(data_dir)) as client:
        message = assert_error(await read(client, PNG), 503, "service_not_ready")
        assert "make run" in message and "/v1/train" in message and "/v1/admin/models/upload" in message
        assert_error(await client.get("/readyz"), 503, "service_not_ready")
        assert (await client.get("/v1/models/active")).json() == {"model_loaded": False}
        assert (await client.get("/healthz")).status_code == 200


async def test_bytes_that_are_no_image_are_unsupported_media_type(client: httpx.AsyncClient) -> None:
    gif = b"GIF89a" + b"\x00" * 64
    assert_error(await read(client, gif, content_type="image/png"), 415, "unsupported_media_type")
    assert_error(await read(client, b"%PDF-1.4 not an image"), 415, "unsupported_media_type")


async def test_a_broken_png_is_invalid_image(client: httpx.AsyncClient) -> None:
    broken = PNG[:8] + b"\x00garbage" * 20
    assert_error(await read(client, broken), 400, "invalid_image")
    assert_error(await read(client, PNG[: len(PNG) // 2]), 400, "invalid_image")
    assert_error(await read(client, b""), 400, "invalid_image")


async def test_tiny_or_over_the_pixel_cap_is_bad_dimensions(data_dir: Path) -> None:
    install_model(data_dir, "v7", forced_digit=7)
    async with running_app(make_settings(data_dir, read_max_pixels=100 * 100)) as client:
        assert_error(await read(client, png_bytes(Image.new("L", (4, 4), 255))), 400, "bad_dimensions")
        message = assert_error(await read(client, digit_png(size=200)), 400, "bad_dimensions")
        assert "10000" in message
        assert (await read(client, digit_png(size=96))).status_code == 200


async def test_a_blank_page_is_preprocessing_failed(client: httpx.AsyncClient) -> None:
    blank = png_bytes(Image.new("L", (64, 64), 255))
    assert_error(await read(client, blank), 400, "preprocessing_failed")


async def test_bodies_that_are_not_one_file_part_are_malformed_multipart(client: httpx.AsyncClient) -> None:
    assert_error(await client.post("/v1/read", json={"file": "x"}), 400, "malformed_multipart")
    assert_error(await client.post("/v1/read", content=b"raw", headers={"content-type": "image/png"}),
                 400, "malformed_multipart")
    wrong_name = await client.post("/v1/read", files={"image": ("d.png", PNG, "image/png")})
    assert "'file'" in assert_error(wrong_name, 400, "malformed_multipart")
    truncated = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n"
                 b"Content-Type: image/png\r\n\r\n" + PNG[:100])
    assert_error(await client.post("/v1/read", content=truncated,
                                   headers={"content-type": "multipart/form-data; boundary=b"}),
                 400, "malformed_multipart")
    assert_error(await client.post("/v1/read", content=b"x", headers={"content-type": "multipart/form-data"}),
                 400, "malformed_multipart")


async def test_a_body_over_the_cap_is_too_large_also_without_content_length(data_dir: Path) -> None:
    install_model(data_dir, "v7", forced_digit=7)
    noise = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)))
    assert len(noise) > 2048
    async with running_app(make_settings(data_dir, read_max_bytes=2048)) as client:
        message = assert_error(await read(client, noise), 413, "too_large")
        assert "2048" in message

        body = (b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.png\"\r\n\r\n" + noise * 50
                + b"\r\n--b--\r\n")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while streaming
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        assert_error(await client.post("/v1/read", content=chunked(),
                                       headers={"content-type": "multipart/form-data; boundary=b"}),
                     413, "too_large")


async def test_a_prediction_over_the_time_limit_is_504_timeout(data_dir: Path) -> None:
    install_model(data_dir, "v7", forced_digit=7)
    async with running_app(make_settings(data_dir, read_timeout_s=0.0005)) as client:
        assert_error(await read(client, digit_png(size=400)), 504, "timeout")


# --- the read-side endpoints -----------------------------------------------------------------------


async def test_active_model_readyz_version_and_metrics(client: httpx.AsyncClient) -> None:
    active = (await client.get("/v1/models/active")).json()
    assert active["model_loaded"] is True
    assert (active["model_id"], active["version"], active["schema_version"]) == ("mnist_resnet18_v1", "v7", "v1.1")
    assert active["preprocess_hash"] == PREPROCESS_HASH and "weights_sha256" in active
    assert (await client.get("/readyz")).json() == {"status": "ready", "model_id": "mnist_resnet18_v1",
                                                    "version": "v7"}
    assert (await client.get("/version")).json()["preprocess_hash"] == PREPROCESS_HASH

    await read(client, PNG)
    metrics = (await client.get("/metrics")).text
    assert 'active_model_info{model_id="mnist_resnet18_v1",version="v7"} 1.0' in metrics
    assert 'http_requests_total{method="POST",route="/v1/read",status="200"}' in metrics
    for name in ("read_latency_seconds_bucket", "model_swaps_total", "model_activation_failures_total"):
        assert name in metrics


# --- a live server ---------------------------------------------------------------------------------


def test_live_server_reads_and_refuses_a_declared_oversize_body_before_reading_it(
    data_dir: Path, served_app: Callable[..., ServedApp]
) -> None:
    install_model(data_dir, "v7", forced_digit=7)
    live = served_app(data_dir=data_dir)
    response = httpx.post(live.url + "/v1/read", files={"file": ("d.png", PNG, "image/png")}, timeout=30)
    assert response.status_code == 200 and response.json()["digit"] == 7

    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/read HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 1073741824\r\n\r\n--b\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert time.monotonic() - started < 5
