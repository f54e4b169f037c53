"""A candidate model, from its files to something that may serve: safe loading, the manifest's arch built by
one function from one table (`app.network`), inference preparation, and a smoke test. Used by uploads, the
store's active version at start, versions from other replicas, and the promotion gate's figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from app.contracts import N_CLASSES, ManifestV1_1
from app.inference import ServedNet, forward_probs, prepare, smoke_input
from app.network import ARCHS, build_model


class CandidateError(Exception):
    """A model that must not be served. `code` is the API's stable error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class LoadedModel:
    manifest: ManifestV1_1
    net: ServedNet


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict without running code: `torch.load(weights_only=True)`, never plain pickle."""
    try:
        loaded: object = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to load safely is a refusal; the reason goes to the uploader
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CandidateError(
            "invalid_weights",
            f"the weights could not be loaded safely with torch.load(weights_only=True): {first_line[:300]}",
        ) from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in loaded.items()
    ):
        raise CandidateError("invalid_weights", "the weights file must hold a state dict (name -> tensor)")
    return {str(key): value for key, value in loaded.items()}


def load_candidate(
    weights: Path, manifest: ManifestV1_1, *, dtype: torch.dtype | None = None, threads: int = 1
) -> LoadedModel:
    """Load as the manifest's arch, check, prepare for inference, and smoke-test a model (in `dtype`, the
    precision it will serve in, on the `threads` each forward pass gets).

    Raises CandidateError with the reason a human needs; never runs code from the weights file.
    """
    if manifest.arch not in ARCHS:
        raise CandidateError("unsupported_arch",
                             f"arch {manifest.arch!r} is not served here; known: {', '.join(sorted(ARCHS))}")
    if manifest.n_classes != N_CLASSES:
        raise CandidateError("unsupported_arch", f"n_classes is {manifest.n_classes}; this service reads {N_CLASSES}")
    state = load_weights(weights)
    net = build_model(manifest.arch)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise CandidateError("weights_mismatch", f"the weights do not fit arch {manifest.arch!r}: {detail}") from exc
    try:
        served = prepare(net, dtype=dtype, threads=threads)
        probs = forward_probs(served, smoke_input(), manifest.temperature, tta=False, dtype=dtype)
    except Exception as exc:  # whatever breaks the forward pass refuses the model
        raise CandidateError("smoke_test_failed", f"a smoke prediction failed: {exc}") from exc
    if probs.shape != (2, manifest.n_classes) or not bool(torch.isfinite(probs).all()):
        raise CandidateError("smoke_test_failed", "a smoke prediction gave non-finite or misshapen probabilities")
    return LoadedModel(manifest=manifest, net=served)
