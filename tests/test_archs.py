"""The arch table: the manifest's `arch` picks the network, old models keep serving, TRAIN__ARCH trains either.

Through the real app (uvicorn on loopback) with real weights of each arch, and `digits train` as a real
process that trains, uploads and gets served.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pydantic
import pytest
import torch
from torchvision.models import ResNet

from app.contracts import WEIGHTS_FILE, ManifestV1_1
from app.inference import TTA_SHIFTS, OnnxNet, forward_probs, on_this_thread, pick_dtype, prepare, smoke_input
from app.loading import CandidateError, load_candidate
from app.network import ARCHS, DEFAULT_ARCH, LEGACY_ARCH, DigitResNet, build_model
from app.preprocess import preprocess
from config.settings import Settings, TrainSettings
from tests.serving_support import (
    API_KEY,
    digit_png,
    install_model,
    make_settings,
    manifest,
    running_app,
    upload,
    weights_bytes,
)
from tests.support import clean_env

pytestmark = pytest.mark.anyio
PNG = digit_png()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def read(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/read", files={"file": ("digit.png", PNG, "image/png")})


# --- the table ------------------------------------------------------------------------------------------


def test_the_default_network_is_the_stride_2_resnet_and_training_builds_it_unless_told_otherwise() -> None:
    assert {DEFAULT_ARCH, "resnet_s2_w48", LEGACY_ARCH} <= set(ARCHS) and DEFAULT_ARCH == "resnet_s2_w32"
    assert TrainSettings().arch == DEFAULT_ARCH
    net = build_model().eval()
    assert isinstance(net, DigitResNet)
    assert net.conv1.stride == (2, 2) and net.conv1.in_channels == 1 and net.conv1.out_channels == 32
    assert [len(stage) for stage in (net.layer1, net.layer2, net.layer3, net.layer4)] == [2, 2, 2, 2]
    assert net.fc.in_features == 256 and net.fc.out_features == 10
    shapes: list[tuple[int, ...]] = []
    for stage in (net.layer1, net.layer2, net.layer3, net.layer4):
        stage.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape[1:])))
    with torch.inference_mode():
        assert net(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert shapes == [(32, 14, 14), (64, 7, 7), (128, 4, 4), (256, 2, 2)]
    assert isinstance(build_model(LEGACY_ARCH), ResNet)


def test_an_unknown_train_arch_is_refused_at_start_with_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN__ARCH", "vit_tiny")
    with pytest.raises(pydantic.ValidationError, match=r"unknown arch 'vit_tiny'.*resnet18_1ch"):
        Settings(_env_file=None)
    monkeypatch.setenv("TRAIN__ARCH", LEGACY_ARCH)
    assert Settings(_env_file=None).train.arch == LEGACY_ARCH


# --- the served forward pass ----------------------------------------------------------------------------


def test_the_default_precision_serves_fp32_on_onnx_runtime_even_where_bf16_is_native() -> None:
    """`API__PRECISION=auto` picks fp32 on every CPU (ONNX Runtime beat torch's bf16 on AVX-512 + AMX too);
    bf16 autocast is served only when asked for."""
    assert Settings(_env_file=None).api.precision == "auto"
    assert pick_dtype("auto") is None and pick_dtype("fp32") is None
    assert pick_dtype("bf16") is torch.bfloat16


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_served_network_answers_as_the_eager_one_at_every_batch_size(arch: str) -> None:
    """fp32 serving runs the network, batch norms folded, exported to ONNX and run by ONNX Runtime."""
    torch.manual_seed(1)
    eager = build_model(arch).eval()
    twin = build_model(arch)
    twin.load_state_dict(eager.state_dict())
    served = prepare(twin, threads=2)
    assert isinstance(served, OnnxNet)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in twin.modules())  # every one folded first
    alone = on_this_thread(served)  # the gate's copy, on its caller's thread
    assert isinstance(alone, OnnxNet) and alone.threads == 1
    for n in (1, 3, 32):
        batch = torch.randn(n, 1, 28, 28)
        want = forward_probs(eager, batch, 1.0, tta=False)
        torch.testing.assert_close(forward_probs(served, batch, 1.0, tta=False), want, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(forward_probs(alone, batch, 1.0, tta=False), want, atol=1e-4, rtol=1e-3)
    want_tta = forward_probs(eager, batch, 1.0, tta=True)
    assert want_tta.shape == (32, 10) and len(TTA_SHIFTS) == 5
    torch.testing.assert_close(forward_probs(served, batch, 1.0, tta=True), want_tta, atol=1e-4, rtol=1e-3)


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_loading_model_after_model_keeps_memory_flat(tmp_path: Path) -> None:
    """Every upload and rollback loads a model: what the API held for the previous ones must be freed
    (a frozen TorchScript model stayed in memory for good, ~30 MB a load for this arch)."""
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights_bytes(arch=DEFAULT_ARCH))
    doc = ManifestV1_1.model_validate_json(json.dumps(manifest(arch=DEFAULT_ARCH)))
    for _ in range(2):
        load_candidate(weights, doc)
    gc.collect()
    before = _rss_mib()
    for _ in range(10):
        load_candidate(weights, doc)
    gc.collect()
    assert _rss_mib() - before < 100


@pytest.mark.parametrize("arch", [DEFAULT_ARCH, LEGACY_ARCH])
def test_bf16_serving_gives_the_fp32_probabilities_to_within_bf16_rounding(tmp_path: Path, arch: str) -> None:
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights_bytes(arch=arch))
    doc = ManifestV1_1.model_validate_json(json.dumps(manifest(arch=arch)))
    fp32 = load_candidate(weights, doc)
    bf16 = load_candidate(weights, doc, dtype=torch.bfloat16)
    image = preprocess(PNG).tensor
    want = forward_probs(fp32.net, image, 1.0, tta=False)
    got = forward_probs(bf16.net, image, 1.0, tta=False, dtype=torch.bfloat16)
    assert got.dtype == torch.float32 and abs(float(got.sum()) - 1.0) < 1e-4
    torch.testing.assert_close(got, want, atol=0.03, rtol=0)
    assert not torch.equal(got, want)  # it did run in bf16: the served graph honours autocast
    assert forward_probs(bf16.net, smoke_input(), 1.0, tta=False, dtype=torch.bfloat16).shape == (2, 10)


def test_a_model_whose_arch_is_not_in_the_table_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / WEIGHTS_FILE
    weights.write_bytes(weights_bytes())
    with pytest.raises(CandidateError) as refused:
        load_candidate(weights, ManifestV1_1.model_validate_json(json.dumps(manifest(arch="resnet50"))))
    assert refused.value.code == "unsupported_arch" and LEGACY_ARCH in refused.value.message
    with pytest.raises(CandidateError) as mismatch:  # weights of one arch named as the other
        load_candidate(weights, ManifestV1_1.model_validate_json(json.dumps(manifest(arch=LEGACY_ARCH))))
    assert mismatch.value.code == "weights_mismatch"


# --- through the real app -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [LEGACY_ARCH, "resnet_s2_w48"])  # the networks of earlier defaults
async def test_a_stored_model_of_an_earlier_arch_still_serves_after_the_upgrade(data_dir: Path, arch: str) -> None:
    install_model(data_dir, "old", forced_digit=3, arch=arch)
    async with running_app(make_settings(data_dir)) as client:
        answer = await read(client)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["digit"], answer.json()["version"]) == (3, "old")
        version = (await client.get("/version")).json()
        assert version["arch"] == arch and version["default_arch"] == DEFAULT_ARCH
        assert sorted(version["archs"]) == sorted(ARCHS)
        assert (await client.get("/v1/models/active")).json()["arch"] == arch


async def test_a_model_of_the_new_arch_uploads_serves_and_rolls_back_to_an_old_one(data_dir: Path) -> None:
    install_model(data_dir, "old", forced_digit=3, arch=LEGACY_ARCH)
    async with running_app(make_settings(data_dir)) as client:
        uploaded = await upload(client, manifest(version="new", arch=DEFAULT_ARCH), weights_bytes(5))
        assert uploaded.status_code == 200 and uploaded.json()["activated"], uploaded.text
        answer = (await read(client)).json()
        assert (answer["digit"], answer["version"]) == (5, "new")
        assert (await client.get("/version")).json()["arch"] == DEFAULT_ARCH
        back = await client.post("/v1/admin/models/mnist_resnet18_v1/versions/old/activate",
                                 headers={"X-Api-Key": API_KEY})
        assert back.status_code == 200, back.text
        answer = (await read(client)).json()
        assert (answer["digit"], answer["version"]) == (3, "old")


async def test_train_arch_resnet18_1ch_trains_uploads_and_serves_the_old_network(tmp_path: Path) -> None:
    env = clean_env({
        "DATA_DIR": str(tmp_path / "worker"), "HANDWRITING_API_KEY": API_KEY, "TRAIN__ARCH": LEGACY_ARCH,
        "TRAIN__VAL_SIZE": "8", "TRAIN__THREADS": "1",
    })
    async with running_app(make_settings(tmp_path / "api")) as client:
        run = subprocess.run(
            [sys.executable, "-m", "worker.cli", "train", "--limit", "16", "--batch-size", "8", "--epochs", "1",
             "--out", str(tmp_path / "runs"), "--upload", str(client.base_url)],
            env=env, capture_output=True, text=True, timeout=540, check=False,  # 2 min alone on 2 loaded cores
        )
        assert run.returncode == 0, run.stdout + run.stderr
        (written,) = (tmp_path / "runs").rglob("manifest.json")
        assert json.loads(written.read_text())["arch"] == LEGACY_ARCH
        state = torch.load(written.parent / WEIGHTS_FILE, weights_only=True)
        assert state["conv1.weight"].shape == (64, 1, 3, 3)  # the 64-channel stride-1 stem of ResNet-18
        active = (await client.get("/v1/models/active")).json()
        assert active["arch"] == LEGACY_ARCH
        answer = await read(client)
        assert answer.status_code == 200 and answer.json()["version"] == active["version"]


def test_only_the_old_network_loads_torchvision() -> None:
    """torchvision costs 2.2 s of CPU to import: the API and the worker load it only to build resnet18_1ch."""
    code = ("import sys, app.main, worker.job; from app.network import build_model; "
            "[build_model(arch) for arch in ('resnet_s2_w32', 'resnet_s2_w48')]; print('torchvision' in sys.modules); "
            "build_model('resnet18_1ch'); print('torchvision' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["False", "True"], done.stderr
