"""Real models and images for the inference service's tests (and anyone who needs a served model).

Models are randomly initialised networks of the default arch (or any arch of `app.network.ARCHS`);
`forced_digit` sets the classifier's bias so the model always answers that digit, which lets a test
tell models apart by their answers as well as by the version they name.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import torch
from PIL import Image, ImageDraw

from app.contracts import N_CLASSES, WEIGHTS_FILE, ManifestV1_1
from app.network import DEFAULT_ARCH, build_model
from app.preprocess import PREPROCESS_HASH
from app.store import ModelStore
from config.settings import ApiSettings, Settings
from tests.support import TEST_GATE_SIZE, serve

API_KEY = "test-admin-key"
MODEL_ID = "mnist_resnet18_v1"


def make_settings(data_dir: Path, *, api_key: str | None = API_KEY, **api: object) -> Settings:
    """Settings for one test: its own DATA_DIR, the admin key, API__* overrides; no .env file read."""
    return Settings(
        _env_file=None,
        data_dir=data_dir,
        handwriting_api_key=api_key,
        api=ApiSettings.model_validate({"model_poll_s": 0, "gate_size": TEST_GATE_SIZE, **api}),
    )


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app served on loopback (`tests.support.serve`), and an HTTP client for it."""
    served = serve(settings)
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            yield client
    finally:
        served.stop()


@functools.lru_cache(maxsize=4)
def _base_state(arch: str = DEFAULT_ARCH) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_model(arch).state_dict().items()}


def model_state(
    forced_digit: int | None = None, confidence: float | None = None, arch: str = DEFAULT_ARCH
) -> dict[str, torch.Tensor]:
    """Random weights of `arch`; with `forced_digit` the answer is always that digit, with `confidence` at
    exactly that probability (the classifier then ignores its input)."""
    state = dict(_base_state(arch))
    if forced_digit is not None:
        bias = torch.zeros(N_CLASSES)
        if confidence is None:
            bias[forced_digit] = 50.0
        else:
            state["fc.weight"] = torch.zeros_like(state["fc.weight"])
            bias[forced_digit] = math.log(confidence * (N_CLASSES - 1) / (1 - confidence))
        state["fc.bias"] = bias
    return state


@functools.lru_cache(maxsize=16)
def weights_bytes(forced_digit: int | None = None, confidence: float | None = None, arch: str = DEFAULT_ARCH) -> bytes:
    buf = io.BytesIO()
    torch.save(model_state(forced_digit, confidence, arch), buf)
    return buf.getvalue()


def manifest(model_id: str = MODEL_ID, version: str = "v1", **overrides: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "schema_version": "v1.1",
        "model_id": model_id,
        "arch": DEFAULT_ARCH,
        "n_classes": N_CLASSES,
        "version": version,
        "created_at": datetime.now(UTC).isoformat(),
        "preprocess_hash": PREPROCESS_HASH,
        "val_acc": 0.5,
        "temperature": 1.0,
        "epochs": 1,
        "notes": "random weights for tests",
    }
    doc.update(overrides)
    return doc


def upload_files(
    manifest_doc: dict[str, object] | bytes, weights: bytes, *, model_id: str = MODEL_ID, activate: bool | None = True,
    force: bool = True,
) -> tuple[dict[str, str], dict[str, tuple[str, bytes, str]]]:
    """The upload's form. `force` by default: these models are random (each answers one digit), so the
    promotion gate would pick among them by chance; tests of the gate itself pass `force=False`."""
    raw = manifest_doc if isinstance(manifest_doc, bytes) else json.dumps(manifest_doc).encode()
    data = {"model_id": model_id}
    if activate is not None:
        data["activate"] = "true" if activate else "false"
    if force:
        data["force"] = "true"
    files = {
        "manifest": ("manifest.json", raw, "application/json"),
        "model": ("model.pt", weights, "application/octet-stream"),
    }
    return data, files


async def upload(
    client: httpx.AsyncClient,
    manifest_doc: dict[str, object] | bytes,
    weights: bytes,
    *,
    model_id: str = MODEL_ID,
    activate: bool | None = True,
    force: bool = True,
    key: str | None = API_KEY,
) -> httpx.Response:
    data, files = upload_files(manifest_doc, weights, model_id=model_id, activate=activate, force=force)
    headers = {"X-Api-Key": key} if key is not None else {}
    return await client.post("/v1/admin/models/upload", data=data, files=files, headers=headers)


def install_model(
    data_dir: Path,
    version: str = "v1",
    *,
    model_id: str = MODEL_ID,
    forced_digit: int | None = None,
    confidence: float | None = None,
    activate: bool = True,
    arch: str = DEFAULT_ARCH,
) -> None:
    """Store a model (and make it active) directly on disk, as a trained model left by `make run` would be."""
    store = ModelStore(data_dir / "models")
    store.prepare()
    incoming = store.new_incoming()
    weights = weights_bytes(forced_digit, confidence, arch)
    (incoming / WEIGHTS_FILE).write_bytes(weights)
    sha = hashlib.sha256(weights).hexdigest()
    doc = manifest(model_id, version, arch=arch)
    store.commit(incoming, ManifestV1_1.model_validate_json(json.dumps(doc)), sha)
    if activate:
        store.set_active(model_id, version)


def digit_png(size: int = 96, *, dark_on_light: bool = True) -> bytes:
    """A hand-drawn-looking '7' as a PNG."""
    paper, ink = (255, 0) if dark_on_light else (0, 255)
    img = Image.new("L", (size, size), paper)
    draw = ImageDraw.Draw(img)
    s = size
    draw.line([(0.25 * s, 0.2 * s), (0.75 * s, 0.2 * s), (0.45 * s, 0.85 * s)], fill=ink, width=max(2, s // 12))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def store_snapshot(data_dir: Path) -> dict[str, str]:
    """Every file under the model store with its sha256: to prove a refusal changed nothing."""
    root = data_dir / "models"
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
