"""A model of the default arch really trained on MNIST, once per test session, and photos it reads.

Tests that need a model which *reads* (the page's: a drawn 7 must come back as 7, a photo as its digit)
use this one instead of the random or forced-digit models of tests/serving_support.py. It is trained by
the worker's own run (`worker.job.run_training`: MNIST, training, calibration, the artifacts folder with
a v1.1 manifest) on the first REAL_LIMIT training images for one epoch on every core (about 20-40 s on 2
cores), and goes into a served app the way a worker's model does: `worker.upload.upload_artifacts` to
`/v1/admin/models/upload`, where the app's store keeps it and the promotion gate decides.

The photos are MNIST *test* digits (never trained on) rendered by `app.photo.render_photo`, each one
the model reads right in-process (as `/v1/read` does) with high confidence before a test sends it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np
from filelock import FileLock

from app.contracts import MANIFEST_FILE, WEIGHTS_FILE, DigitsTrainJobV1, ManifestV1_1
from app.inference import forward_probs
from app.loading import LoadedModel, load_candidate
from app.mnist import I64, U8, load_raw
from app.photo import render_photo
from app.preprocess import preprocess
from config.settings import Settings, TrainSettings
from worker.artifacts import Artifacts
from worker.hooks import RunHooks
from worker.job import run_training
from worker.upload import UploadResult, upload_artifacts

REAL_LIMIT: Final = 2500  # training images (1 epoch); also how many test images the test accuracy counts
REAL_JOB: Final = DigitsTrainJobV1(request_id="tests-real-model", user_id=0, epochs=1, batch_size=32,
                                   augment=False, notes="trained for the tests (tests/trained_support.py)")
# Plain MNIST only (TRAIN__PHOTO_SHARE=0): rendering photos for training would double the time, and the
# preprocessing already brings photos to MNIST's look (the photos below are read right all the same).
REAL_TRAINING: Final = TrainSettings(limit=REAL_LIMIT, val_size=500, photo_share=0.0)
MIN_TEST_ACC: Final = 0.9
MIN_PHOTO_CONFIDENCE: Final = 0.9


@dataclass(frozen=True)
class Photo:
    name: str  # e.g. "digit-4.jpg": the extension says what the bytes are
    data: bytes
    digit: int

    @property
    def mime(self) -> str:
        return "image/png" if self.data.startswith(b"\x89PNG") else "image/jpeg"

    def save(self, directory: Path) -> Path:
        path = directory / self.name
        path.write_bytes(self.data)
        return path


@dataclass(frozen=True)
class TrainedModel:
    artifacts: Artifacts
    val_acc: float
    test_acc: float
    train_seconds: float
    _loaded: list[LoadedModel] = field(default_factory=list, repr=False, compare=False)

    @property
    def version(self) -> str:
        return self.artifacts.version

    @property
    def model_id(self) -> str:
        return str(self.artifacts.manifest["model_id"])

    def upload(self, api_url: str, key: str) -> UploadResult:
        """Into a served app as the worker uploads its models (activate=true: the promotion gate decides)."""
        return upload_artifacts(self.artifacts, api_url, key, attempts=1)

    def read(self, data: bytes) -> tuple[int, float]:
        """The digit and its confidence, read in-process as `/v1/read` reads (preprocess, forward, temperature)."""
        if not self._loaded:
            manifest = ManifestV1_1.model_validate_json(self.artifacts.manifest_path.read_bytes())
            self._loaded.append(load_candidate(self.artifacts.weights_path, manifest))
        model = self._loaded[0]
        probs = forward_probs(model.net, preprocess(data).tensor, model.manifest.temperature, tta=False)[0]
        return int(probs.argmax()), float(probs.max())

    def photo(self, condition: str, avoid: frozenset[int] = frozenset()) -> Photo:
        """The first MNIST test digit (not one of `avoid`) that, rendered under `condition`, this model reads
        right with at least MIN_PHOTO_CONFIDENCE."""
        test_x, test_y = _test_digits()
        for index in range(200):
            digit = int(test_y[index])
            if digit in avoid:
                continue
            data = render_photo(test_x[index], condition, np.random.default_rng(index))
            read, confidence = self.read(data)
            if read == digit and confidence >= MIN_PHOTO_CONFIDENCE:
                photo = Photo(f"digit-{digit}.jpg", data, digit)
                return Photo(f"digit-{digit}.png", data, digit) if photo.mime == "image/png" else photo
        raise AssertionError(f"the trained model reads none of 200 {condition} photos right and surely")


@functools.cache
def _test_digits() -> tuple[U8, I64]:
    _, _, test_x, test_y = load_raw()
    return test_x, test_y


def train_real_model(data_dir: Path) -> TrainedModel:
    """Train REAL_JOB with REAL_TRAINING under `data_dir` (its MNIST cache and artifacts go there)."""
    settings = Settings(_env_file=None, data_dir=data_dir, train=REAL_TRAINING)
    result = run_training(REAL_JOB, settings, RunHooks(), upload=False)
    return _trained(Path(result.artifacts_dir), result.val_acc, result.test_acc, result.train_seconds)


def shared_real_model(root: Path) -> TrainedModel:
    """The model trained under `root`, by whichever process asked first: `make test` runs the suite in several
    pytest-xdist workers, and each would otherwise train its own. The others wait on the lock, then read the
    first one's record (`root/trained.json`) instead of training."""
    record = root / "trained.json"
    with FileLock(root / "trained.lock"):
        if record.exists():
            saved = json.loads(record.read_text())
            return _trained(Path(saved["directory"]), saved["val_acc"], saved["test_acc"], saved["train_seconds"])
        (root / "trained-model").mkdir()
        model = train_real_model(root / "trained-model")
        record.write_text(json.dumps({"directory": str(model.artifacts.directory), "val_acc": model.val_acc,
                                      "test_acc": model.test_acc, "train_seconds": model.train_seconds}))
        return model


def _trained(directory: Path, val_acc: float, test_acc: float, train_seconds: float) -> TrainedModel:
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    artifacts = Artifacts(directory, directory / WEIGHTS_FILE, directory / MANIFEST_FILE, manifest)
    return TrainedModel(artifacts, val_acc, test_acc, train_seconds)
