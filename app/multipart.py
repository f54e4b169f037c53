"""A streaming multipart/form-data reader with byte caps, counted as the body arrives.

Starlette's `request.form()` spools file parts to temporary files with no total cap, so a client
could make the service buffer gigabytes before any check runs. This reader counts every byte of
the body and of each part while it streams and stops at the first cap crossed; file parts go to
memory or straight to a file of the caller's choosing, hashed on the way.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Final

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

MAX_FIELD_BYTES: Final = 1024  # plain form fields (model_id, activate) are short
MAX_PARTS: Final = 16


_TRUE: Final = frozenset({"true", "1", "yes", "on"})
_FALSE: Final = frozenset({"false", "0", "no", "off"})


def parse_flag(value: str) -> bool | None:
    """A boolean form field or query value (true/1/yes/on, false/0/no/off); None when it is neither."""
    text = value.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def openapi_multipart(required: list[str], properties: dict[str, object]) -> dict[str, object]:
    """`openapi_extra` for a route that reads its multipart body itself (so FastAPI cannot describe it)."""
    schema = {"type": "object", "required": required, "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


class MultipartError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedMultipartError(MultipartError):
    """Not multipart/form-data, or not well formed."""


class BodyTooLargeError(MultipartError):
    """The body, or one part of it, is over its cap."""


@dataclass(frozen=True, slots=True)
class FileSpec:
    """An expected file part: at most `max_bytes`; kept in memory, or written to `dest`."""

    max_bytes: int
    dest: Path | None = None


@dataclass
class FilePart:
    name: str
    filename: str
    content_type: str | None
    size: int
    sha256: str
    data: bytes = b""  # when kept in memory
    path: Path | None = None  # when written to a file


@dataclass
class Form:
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, FilePart] = field(default_factory=dict)


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    spec: FileSpec | None = None
    size: int = 0
    chunks: list[bytes] = field(default_factory=list)
    sink: IO[bytes] | None = None
    hasher: hashlib._Hash = field(default_factory=hashlib.sha256)


def boundary_of(content_type: str | None) -> bytes:
    if not content_type:
        raise MalformedMultipartError("expected a multipart/form-data body; the Content-Type header is missing")
    kind, params = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise MalformedMultipartError(f"expected a multipart/form-data body, got {kind.decode('latin-1')!r}")
    boundary = params.get(b"boundary")
    if not boundary:
        raise MalformedMultipartError("multipart/form-data without a boundary")
    return boundary


class _Reader:
    def __init__(self, files: dict[str, FileSpec], max_total: int) -> None:
        self.specs = files
        self.max_total = max_total
        self.form = Form()
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.parts = 0
        self.total = 0
        self.error: MultipartError | None = None
        self.ended = False
        self.open_sinks: list[IO[bytes]] = []

    # python-multipart calls these synchronously from `parser.write`. Raising inside them is
    # wrapped by the parser, so failures are recorded and raised after `write` returns.
    def on_part_begin(self) -> None:
        self.part = _Part()
        self.parts += 1
        if self.parts > MAX_PARTS:
            self._fail(MalformedMultipartError(f"too many parts (at most {MAX_PARTS})"))

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.strip().lower()] = self.header_value.strip()
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            self._fail(MalformedMultipartError("a part has no Content-Disposition name"))
            return
        self.part.name = name.decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is None:
            return
        self.part.filename = filename.decode("utf-8", "replace")
        spec = self.specs.get(self.part.name)
        if spec is None:
            return  # an unexpected file part: counted against the total, otherwise ignored
        if self.part.name in self.form.files:
            self._fail(MalformedMultipartError(f"more than one file part named {self.part.name!r}"))
            return
        self.part.spec = spec
        if spec.dest is not None:
            self.part.sink = spec.dest.open("wb")
            self.open_sinks.append(self.part.sink)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.error is not None:
            return
        piece = data[start:end]
        self.part.size += len(piece)
        spec = self.part.spec
        if spec is not None:
            if self.part.size > spec.max_bytes:
                limit = spec.max_bytes
                self._fail(BodyTooLargeError(f"file part {self.part.name!r} is over its limit of {limit} bytes"))
                return
            self.part.hasher.update(piece)
            if self.part.sink is not None:
                self.part.sink.write(piece)
            else:
                self.part.chunks.append(piece)
        elif self.part.filename is None:
            if self.part.size > MAX_FIELD_BYTES:
                self._fail(BodyTooLargeError(f"form field {self.part.name!r} is over {MAX_FIELD_BYTES} bytes"))
                return
            self.part.chunks.append(piece)

    def on_part_end(self) -> None:
        if self.error is not None:
            return
        part = self.part
        if part.spec is not None and part.filename is not None:
            path: Path | None = None
            if part.sink is not None:
                part.sink.close()  # the caller fsyncs it, off the event loop
                path = part.spec.dest
            content_type = part.headers.get(b"content-type")
            self.form.files[part.name] = FilePart(
                name=part.name,
                filename=part.filename,
                content_type=content_type.decode("latin-1") if content_type else None,
                size=part.size,
                sha256=part.hasher.hexdigest(),
                data=b"".join(part.chunks),
                path=path,
            )
        elif part.filename is None:
            if part.name in self.form.fields:
                self._fail(MalformedMultipartError(f"form field {part.name!r} given more than once"))
                return
            self.form.fields[part.name] = b"".join(part.chunks).decode("utf-8", "replace")

    def on_end(self) -> None:
        self.ended = True

    def _fail(self, error: MultipartError) -> None:
        if self.error is None:
            self.error = error

    def close(self) -> None:
        for sink in self.open_sinks:
            sink.close()


async def read_multipart(
    content_type: str | None,
    stream: AsyncIterator[bytes],
    *,
    files: dict[str, FileSpec],
    max_total: int,
) -> Form:
    """Read a multipart body from `stream`, stopping at the first cap crossed.

    Raises BodyTooLargeError (the whole body over `max_total`, or a part over its own cap) or
    MalformedMultipartError. Files written to a `dest` are complete (not yet fsynced) on return;
    on error the caller removes them.
    """
    boundary = boundary_of(content_type)
    reader = _Reader(files, max_total)
    callbacks: MultipartCallbacks = {
        "on_part_begin": reader.on_part_begin,
        "on_part_data": reader.on_part_data,
        "on_part_end": reader.on_part_end,
        "on_header_field": reader.on_header_field,
        "on_header_value": reader.on_header_value,
        "on_header_end": reader.on_header_end,
        "on_headers_finished": reader.on_headers_finished,
        "on_end": reader.on_end,
    }
    parser = MultipartParser(boundary, callbacks)
    try:
        async for chunk in stream:
            reader.total += len(chunk)
            if reader.total > max_total:
                raise BodyTooLargeError(f"request body is over the limit of {max_total} bytes")
            try:
                parser.write(chunk)
            except FormParserError as exc:
                raise reader.error or MalformedMultipartError(f"malformed multipart body: {exc}") from exc
            if reader.error is not None:
                raise reader.error
        try:
            parser.finalize()
        except FormParserError as exc:
            raise MalformedMultipartError(f"malformed multipart body: {exc}") from exc
        if reader.error is not None:
            raise reader.error
        if not reader.ended:
            raise MalformedMultipartError("the multipart body ended before its closing boundary")
        return reader.form
    finally:
        reader.close()
