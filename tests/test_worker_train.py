"""The training run on a few real MNIST images: same seed -> same weights, artifacts, upload retries."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook
from torchvision.models import ResNet

from app.contracts import WEIGHTS_FILE, DigitsTrainJobV1, ManifestV1_1
from app.network import DigitResNet, build_model
from app.preprocess import PREPROCESS_HASH
from config.settings import TrainSettings
from tests.train_support import fake_run_dir
from worker.artifacts import UPLOADED_MARKER, prune_artifacts, write_artifacts
from worker.cli.redis_embedded import free_port
from worker.data import MnistSplits, load_mnist
from worker.train import EpochReport, Progress, TrainOutcome, batch_views, normalise, pick_hardware, to_unit, train
from worker.upload import UploadError, upload_artifacts


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> MnistSplits:
    return load_mnist(tmp_path_factory.mktemp("cache"), val_size=8, limit=24)


JOB = DigitsTrainJobV1(request_id="t", user_id=0, epochs=2, batch_size=8, lr=0.002, seed=7, augment=True)
SETTINGS = TrainSettings(threads=2, progress_every=2, noise_prob=0.02, dots_prob=0.3, blur_prob=0.3, morph_prob=0.3)
HARDWARE = pick_hardware(SETTINGS)


PROGRESS: list[Progress] = []
EPOCHS: list[EpochReport] = []


@pytest.fixture(scope="module")
def outcome(tiny: MnistSplits) -> TrainOutcome:
    PROGRESS.clear()
    EPOCHS.clear()
    return train(JOB, SETTINGS, tiny, HARDWARE, on_progress=PROGRESS.append, on_epoch=EPOCHS.append)


def test_same_seed_gives_the_same_weights_and_another_seed_does_not(tiny: MnistSplits, outcome: TrainOutcome) -> None:
    again = train(JOB, SETTINGS, tiny, HARDWARE)
    assert outcome.state_dict.keys() == again.state_dict.keys()
    for key, value in outcome.state_dict.items():
        assert torch.equal(value, again.state_dict[key]), key
    other = train(JOB.model_copy(update={"seed": 8, "epochs": 1}), SETTINGS, tiny, HARDWARE)
    assert not torch.equal(other.state_dict["fc.weight"], outcome.state_dict["fc.weight"])


def test_progress_reports_every_n_batches_and_at_each_epoch_end(outcome: TrainOutcome) -> None:
    # 24 images in batches of 8: 3 batches an epoch, reported every 2 and at the end of each epoch.
    assert [(p.epoch, p.batch) for p in PROGRESS] == [(1, 2), (1, 3), (2, 2), (2, 3)]
    assert [round(p.pct, 1) for p in PROGRESS] == [33.3, 50.0, 83.3, 100.0]
    assert PROGRESS[-1].eta_s == 0.0
    assert all(p.total_batches == 3 and p.total_epochs == 2 and p.samples_per_sec > 0 for p in PROGRESS)


def test_each_epoch_is_reported_with_its_mean_loss_and_whether_it_is_the_new_best(outcome: TrainOutcome) -> None:
    assert [(e.epoch, e.total_epochs) for e in EPOCHS] == [(1, 2), (2, 2)]
    assert [e.val_acc for e in EPOCHS] == [h["val_acc"] for h in outcome.history]
    assert EPOCHS[0].is_best and EPOCHS[1].is_best == (EPOCHS[1].val_acc > EPOCHS[0].val_acc)
    assert [e.epoch for e in EPOCHS if e.is_best][-1] == outcome.best_epoch
    # The epoch's mean loss is the running mean the last batch event of that epoch carried.
    assert [e.train_loss for e in EPOCHS] == [p.avg_loss for p in PROGRESS if p.batch == p.total_batches]
    assert all(e.time_s > 0 for e in EPOCHS)
    assert all(0.0 <= p.batch_acc <= 1.0 and p.batch_loss > 0 for p in PROGRESS)


def test_outcome_describes_the_best_epoch(outcome: TrainOutcome) -> None:
    assert len(outcome.history) == 2
    assert outcome.val_acc == max(h["val_acc"] for h in outcome.history)
    assert 0.0 <= outcome.test_acc <= 1.0
    assert outcome.device.startswith("cpu (2 threads")
    assert outcome.train_samples == 24


def test_augmentation_with_every_modifier_on_costs_under_a_tenth_of_epoch_time(outcome: TrainOutcome) -> None:
    # Measured inside the real loop; batches of 8 make the fixed cost of the batched ops weigh more
    # than at the default 256, so this is the harder case.
    epoch_seconds = sum(h["seconds"] for h in outcome.history)
    assert outcome.augment_seconds < 0.1 * epoch_seconds


def batches_seen(job: DigitsTrainJobV1, data: MnistSplits) -> list[torch.Tensor]:
    """Every training batch the network was fed during `train(job, ...)`, as it received them."""
    seen: list[torch.Tensor] = []

    def record(module: torch.nn.Module, args: tuple[object, ...]) -> None:
        if isinstance(module, ResNet | DigitResNet) and module.training and isinstance(args[0], torch.Tensor):
            seen.append(args[0].detach().float().clone())

    handle = register_module_forward_pre_hook(record)
    try:
        train(job, TrainSettings(threads=2), data, pick_hardware(TrainSettings(threads=2)))
    finally:
        handle.remove()
    return seen


def test_augment_changes_what_the_network_sees_and_off_it_sees_the_images_as_they_are(tiny: MnistSplits) -> None:
    plain = DigitsTrainJobV1(request_id="a", user_id=0, epochs=1, batch_size=8, seed=11, augment=False)
    off, off_again = batches_seen(plain, tiny), batches_seen(plain, tiny)
    on = batches_seen(plain.model_copy(update={"augment": True}), tiny)
    # 24 images in batches of 8, each batch learnt from three times (the default arch's views) ...
    assert batch_views(TrainSettings()) == 3 and len(off) == len(off_again) == len(on) == 9
    # ... the same images each time: off, as they are; on, each view under its own augmentation.
    assert all(torch.equal(off[i], off[i + 1]) and torch.equal(off[i], off[i + 2]) for i in range(0, 9, 3))
    assert not any(torch.equal(on[i], on[j]) for i in range(0, 9, 3) for j in (i + 1, i + 2))
    assert not any(torch.equal(on[i + 1], on[i + 2]) for i in range(0, 9, 3))
    # Off, the same seed feeds the same batches, and each image is a training image exactly as stored.
    assert all(torch.equal(a, b) for a, b in zip(off, off_again, strict=True))
    stored = normalise(to_unit(tiny.train_x)).flatten(1)
    for batch in off:
        assert all(bool(torch.isclose(stored, image.flatten(), atol=1e-6).all(dim=1).any()) for image in batch)
    # On, under the same seed, every image is moved: none is a stored image any more.
    for batch_on, batch_off in zip(on, off, strict=True):
        assert batch_on.shape == batch_off.shape
        for image in batch_on:
            assert not bool(torch.isclose(stored, image.flatten(), atol=1e-6).all(dim=1).any())


def test_artifacts_load_safely_and_the_manifest_is_v1_1(tmp_path: Path, outcome: TrainOutcome) -> None:
    job = DigitsTrainJobV1(request_id="r-1", user_id=3, model_id="tiny_model", epochs=2, batch_size=16)
    art = write_artifacts(tmp_path, job, outcome, {"limit": 24})
    assert art.directory == tmp_path / "tiny_model" / art.version
    state = torch.load(art.weights_path, weights_only=True)
    build_model().load_state_dict(state)
    raw = json.loads(art.manifest_path.read_text())
    manifest = ManifestV1_1.model_validate_json(art.manifest_path.read_text())
    assert manifest.schema_version == "v1.1" and manifest.preprocess_hash == PREPROCESS_HASH
    assert manifest.weights_sha256 == hashlib.sha256(art.weights_path.read_bytes()).hexdigest()
    assert manifest.val_acc == round(outcome.val_acc, 6) and manifest.test_acc == round(outcome.test_acc, 6)
    assert (manifest.epochs, manifest.batch_size, manifest.seed, manifest.augment) == (2, 16, 42, True)
    assert raw["settings"] == {"limit": 24} and raw["train_seconds"] >= 0 and raw["device"] == outcome.device
    assert not list(tmp_path.rglob("*.tmp"))


class _Recorder(http.server.BaseHTTPRequestHandler):
    statuses: ClassVar[list[int]] = []
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        body = self.rfile.read(length)
        type(self).seen.append({"path": self.path, "key": self.headers.get("X-Api-Key", ""),
                                "body": body.decode("latin1")})
        status = type(self).statuses.pop(0) if type(self).statuses else 200
        payload = json.dumps({"code": "x", "message": f"status {status}", "activated": True}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_api() -> Iterator[str]:
    _Recorder.statuses, _Recorder.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def artifacts(tmp_path: Path, outcome: TrainOutcome) -> object:
    return write_artifacts(tmp_path, DigitsTrainJobV1(request_id="r", user_id=0), outcome, {})


def test_upload_retries_5xx_with_backoff_then_succeeds(fake_api: str, artifacts: object) -> None:
    from worker.artifacts import Artifacts

    assert isinstance(artifacts, Artifacts)
    _Recorder.statuses = [503, 502]
    sleeps: list[float] = []
    result = upload_artifacts(artifacts, fake_api + "/", "k3y", attempts=4, backoff_s=0.5, sleep=sleeps.append)
    assert result.activated and result.status == 200
    assert (result.model_bytes, result.manifest_bytes) == (artifacts.weights_path.stat().st_size,
                                                           artifacts.manifest_path.stat().st_size)
    assert sleeps == [0.5, 1.0]
    assert len(_Recorder.seen) == 3
    last = _Recorder.seen[-1]
    assert last["path"] == "/v1/admin/models/upload" and last["key"] == "k3y"
    for part in ('name="model_id"', "mnist_resnet18_v1", 'name="activate"', "true", 'name="manifest"',
                 'name="model"'):
        assert part in last["body"]


def test_upload_does_not_retry_a_4xx(fake_api: str, artifacts: object) -> None:
    from worker.artifacts import Artifacts

    assert isinstance(artifacts, Artifacts)
    _Recorder.statuses = [400]
    with pytest.raises(UploadError, match=r"refused.*status 400"):
        upload_artifacts(artifacts, fake_api, "k", attempts=5, backoff_s=0, sleep=lambda s: None)
    assert len(_Recorder.seen) == 1


def test_upload_to_nothing_retries_then_gives_up(artifacts: object) -> None:
    from worker.artifacts import Artifacts

    assert isinstance(artifacts, Artifacts)
    sleeps: list[float] = []
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(UploadError, match=r"after 3 attempts.*Connect"):
        upload_artifacts(artifacts, url, "k", attempts=3, backoff_s=1, sleep=sleeps.append)
    assert sleeps == [1, 2]


def test_pruning_keeps_the_newest_uploaded_runs_and_every_run_whose_upload_failed(tmp_path: Path) -> None:
    failed = fake_run_dir(tmp_path, "a", "20260101T000000Z-00000000", uploaded=False)
    old = [fake_run_dir(tmp_path, "a", "20260102T000000Z-11111111", uploaded=True),
           fake_run_dir(tmp_path, "b", "20260103T000000Z-22222222", uploaded=True)]
    newest = [fake_run_dir(tmp_path, "a", "20260104T000000Z-33333333", uploaded=True),
              fake_run_dir(tmp_path, "b", "20260105T000000Z-44444444", uploaded=True)]
    assert json.loads((newest[0] / UPLOADED_MARKER).read_text())["status"] == 200

    assert prune_artifacts(tmp_path, keep=2) == 2
    assert not any(d.exists() for d in old)
    assert all((d / WEIGHTS_FILE).is_file() for d in [*newest, failed])
    assert prune_artifacts(tmp_path, keep=2) == 0  # nothing more to do
    assert prune_artifacts(tmp_path, keep=0) == 2 and (failed / WEIGHTS_FILE).is_file()
