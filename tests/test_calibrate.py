"""Temperature calibration: the fitted T makes held-out confidences honest, and the manifest carries it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from app.contracts import DigitsTrainJobV1
from config.settings import TrainSettings
from worker.artifacts import write_artifacts
from worker.calibrate import fit_temperature, nll
from worker.data import load_mnist
from worker.train import pick_hardware, predict_logits, train


def sampled(n: int, sharpness: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a model `sharpness` times too sure of itself, and labels drawn from the honest ones."""
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(n, 10, generator=gen) * 2.0
    labels = torch.multinomial(torch.softmax(honest, dim=1), 1, generator=gen).squeeze(1)
    return honest * sharpness, labels


@pytest.mark.parametrize("sharpness", [0.4, 1.0, 3.0])
def test_a_temperature_fitted_on_one_half_lowers_the_nll_of_the_other(sharpness: float) -> None:
    logits, labels = sampled(4000, sharpness, seed=1)
    t = fit_temperature(logits[:2000], labels[:2000])
    assert t == pytest.approx(sharpness, rel=0.15)  # it undoes the over- (or under-) confidence
    held_out = (logits[2000:], labels[2000:])
    if sharpness != 1.0:
        assert nll(*held_out, t) < nll(*held_out, 1.0) - 0.01
    else:
        assert nll(*held_out, t) <= nll(*held_out, 1.0) + 1e-3


def test_temperature_changes_no_answer() -> None:
    logits, _ = sampled(500, 3.0, seed=2)
    t = fit_temperature(logits, torch.zeros(500, dtype=torch.long))
    assert torch.equal((logits / t).argmax(dim=1), logits.argmax(dim=1))


def test_the_trained_model_is_calibrated_on_validation_data_and_the_manifest_says_so(tmp_path: Path) -> None:
    data = load_mnist(tmp_path / "cache", val_size=16, limit=16)
    job = DigitsTrainJobV1(request_id="t", user_id=0, epochs=1, batch_size=8, seed=3)
    settings = TrainSettings(threads=2)
    hardware = pick_hardware(settings)
    outcome = train(job, settings, data, hardware)
    logits = predict_logits(_model(outcome.state_dict), data.val_x, hardware.device, hardware.dtype)
    # The job's T is the NLL optimum on these validation logits (recomputed here outside the training loop,
    # so the logits differ in the last bits: compare what T achieves, not T itself).
    best = fit_temperature(logits, data.val_y)
    assert nll(logits, data.val_y, outcome.temperature) <= nll(logits, data.val_y, best) + 1e-3
    assert nll(logits, data.val_y, outcome.temperature) <= nll(logits, data.val_y, 1.0) + 1e-6
    manifest = json.loads(write_artifacts(tmp_path / "out", job, outcome, {}).manifest_path.read_text())
    assert manifest["temperature"] == outcome.temperature


def _model(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from app.network import build_model

    model = build_model()
    model.load_state_dict(state)
    return model
