"""`POST /discord/interactions`: a thin adapter from HTTP to `app.discord.protocol`.

It answers the cheap failures itself (missing headers, oversized body) and hands the raw bytes,
exactly as received, to the protocol, which verifies, routes and builds the answer.
"""

from __future__ import annotations

from typing import Final

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from app.deps import DiscordDep
from app.discord.verify import SIGNATURE_HEADER, TIMESTAMP_HEADER
from app.errors import error_response
from app.observability import current_request_id, new_request_id

# Interactions are small JSON documents; anything far larger is not from Discord.
MAX_BODY_BYTES: Final = 1024 * 1024

router = APIRouter(tags=["discord"])


@router.post("/discord/interactions", summary="Discord HTTP interactions endpoint (signed by Discord)")
async def interactions(request: Request, discord: DiscordDep) -> JSONResponse:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return error_response(413, "too_large", "interaction body too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return error_response(413, "too_large", "interaction body too large")
        chunks.append(chunk)
    body = b"".join(chunks)
    request_id = current_request_id() or new_request_id()
    reply = await anyio.to_thread.run_sync(
        discord.handler.handle,
        body,
        request.headers.get(SIGNATURE_HEADER),
        request.headers.get(TIMESTAMP_HEADER),
        request_id,
    )
    background = BackgroundTask(reply.background) if reply.background is not None else None
    return JSONResponse(reply.body, status_code=reply.status, background=background)
