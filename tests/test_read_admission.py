"""A read that gave up is not carried on, and its thread still counts until it is really done.

In-process, on the real ModelServer with a real model; the spies below wrap the real functions only
to count calls.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch

from app import serving
from app.decode import U8, PreprocessError, decode_gray
from app.loading import LoadedModel
from app.prediction import PredictionTimeoutError, ReadOverloadedError
from app.preprocess import Preprocessed, preprocess_gray
from app.serving import ModelServer
from bench.bombs import png_at_budget
from tests.serving_support import digit_png, install_model, make_settings


def test_a_timed_out_read_is_neither_preprocessed_nor_batched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_model(tmp_path, forced_digit=7)
    calls = {"preprocess": 0, "forward": 0}
    real_forward = ModelServer._forward
    decoding, finish = threading.Event(), threading.Event()

    def decode_spy(data: bytes, *, max_pixels: int) -> U8:
        """A decode that lasts until the test lets it finish (as a slow one would), then decodes."""
        decoding.set()
        finish.wait(30)
        return decode_gray(data, max_pixels=max_pixels)

    def preprocess_spy(gray: U8, *, invert: bool | None = None) -> Preprocessed:
        calls["preprocess"] += 1
        return preprocess_gray(gray, invert=invert)

    def forward_spy(
        self: ModelServer, model: LoadedModel, tensors: list[torch.Tensor], *, one_thread: bool
    ) -> list[list[float]]:
        calls["forward"] += 1
        return real_forward(self, model, tensors, one_thread=one_thread)

    monkeypatch.setattr(serving, "decode_gray", decode_spy)
    monkeypatch.setattr(serving, "preprocess_gray", preprocess_spy)
    monkeypatch.setattr(ModelServer, "_forward", forward_spy)

    async def scenario() -> None:
        server = ModelServer(make_settings(tmp_path, read_timeout_s=1.0))
        await server.start()
        try:
            with pytest.raises(PredictionTimeoutError):
                await server.read_digit(digit_png())
            assert decoding.is_set()
            # The thread is still decoding: its slot is held, though the read has answered.
            assert server.admission.working == 1 and server.admission.admitted == 0
            finish.set()
            while server.admission.working:
                await asyncio.sleep(0.01)
            assert calls == {"preprocess": 0, "forward": 0}
            server.api = server.api.model_copy(update={"read_timeout_s": 30.0})
            assert (await server.read_digit(digit_png())).reading.digit == 7
            assert calls == {"preprocess": 1, "forward": 1}
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_a_read_alone_is_answered_on_its_own_thread_and_reads_together_share_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_model(tmp_path, forced_digit=7)
    passes: list[tuple[str, int, bool]] = []  # (thread, images, on one thread) of every forward pass
    real_forward, real_prepare = ModelServer._forward, ModelServer._prepare
    # For the eight reads together, each is prepared once all eight are in, and no batch runs until all eight are
    # prepared, so that none is alone in the server when it is prepared, however slow this machine is.
    together, prepared, lock, all_prepared = threading.Event(), [0], threading.Lock(), threading.Event()

    def prepare_spy(self: ModelServer, data: bytes, invert: bool | None, gave_up: threading.Event) -> serving._Prepared:
        deadline = time.monotonic() + 30
        while together.is_set() and self.admission.admitted < 8 and time.monotonic() < deadline:
            time.sleep(0.001)
        out = real_prepare(self, data, invert, gave_up)
        with lock:
            prepared[0] += together.is_set()
            if prepared[0] == 8:
                all_prepared.set()
        return out

    def forward_spy(
        self: ModelServer, model: LoadedModel, tensors: list[torch.Tensor], *, one_thread: bool
    ) -> list[list[float]]:
        passes.append((threading.current_thread().name, len(tensors), one_thread))
        if together.is_set():
            all_prepared.wait(timeout=60)
        return real_forward(self, model, tensors, one_thread=one_thread)

    monkeypatch.setattr(ModelServer, "_forward", forward_spy)
    monkeypatch.setattr(ModelServer, "_prepare", prepare_spy)

    async def scenario() -> None:
        server = ModelServer(make_settings(tmp_path))
        await server.start()
        try:
            # Alone: answered on the thread that preprocessed it, in a pass of its own on that thread.
            assert (await server.read_digit(digit_png())).reading.digit == 7
            assert [(name.split("_")[0], n, one) for name, n, one in passes] == [("preprocess", 1, True)]
            passes.clear()
            together.set()
            # Eight at once: every one answered, through the batcher's thread, some of them sharing a pass.
            readings = await asyncio.gather(*(server.read_digit(digit_png()) for _ in range(8)))
            assert [r.reading.digit for r in readings] == [7] * 8
            assert all(name.startswith("infer") for name, _, _ in passes) and sum(n for _, n, _ in passes) == 8
            assert len(passes) < 8
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_reads_beyond_the_queue_are_refused_at_once(tmp_path: Path) -> None:
    install_model(tmp_path, forced_digit=7)

    async def scenario() -> None:
        server = ModelServer(make_settings(tmp_path, read_queue_max=2, read_timeout_s=30))
        await server.start()
        try:
            slow = [asyncio.create_task(server.read_digit(png_at_budget())) for _ in range(2)]
            await asyncio.sleep(0)  # both admitted
            with pytest.raises(ReadOverloadedError) as refused:
                await server.read_digit(digit_png())
            assert refused.value.retry_after_s == 1
            await asyncio.gather(*slow, return_exceptions=True)
            assert (await server.read_digit(digit_png())).reading.digit == 7  # room again
        finally:
            await server.stop()

    asyncio.run(scenario())


def test_heavy_decodes_leave_a_thread_for_ordinary_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_model(tmp_path, forced_digit=7)
    heavy = png_at_budget()  # decoded whole: 9 MP
    started: list[bytes] = []
    finish = threading.Event()

    def decode_spy(data: bytes, *, max_pixels: int) -> U8:
        """Heavy decodes last until the test lets them finish."""
        if data == heavy:
            started.append(data)
            finish.wait(30)
        return decode_gray(data, max_pixels=max_pixels)

    monkeypatch.setattr(serving, "decode_gray", decode_spy)

    async def scenario() -> None:
        server = ModelServer(make_settings(tmp_path, read_timeout_s=60))
        await server.start()
        try:
            workers = server.decode_workers
            heavies = [asyncio.create_task(server.read_digit(heavy)) for _ in range(workers)]
            while len(started) < workers - 1:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
            assert len(started) == workers - 1  # one thread is kept from heavy work ...
            light = await asyncio.wait_for(server.read_digit(digit_png()), 30)
            assert light.reading.digit == 7  # ... and an ordinary read is answered on it meanwhile
            finish.set()
            outcomes = await asyncio.gather(*heavies, return_exceptions=True)
            assert all(isinstance(o, PreprocessError) for o in outcomes)  # blank, once decoded
            assert len(started) == workers
        finally:
            finish.set()
            await server.stop()

    asyncio.run(scenario())
