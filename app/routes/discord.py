"""`POST /discord/interactions`: a thin adapter from HTTP to `app.discord.protocol`.

The body cap refuses oversized bodies before they are read; the raw bytes, exactly as received, and
the two signature headers go to the protocol, which verifies, routes and builds the answer.
"""

from __future__ import annotations

import anyio.to_thread
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from app.body_limit import JSON_MAX_BYTES, body_limit_route
from app.deps import DiscordDep
from app.discord.verify import SIGNATURE_HEADER, TIMESTAMP_HEADER
from app.observability import current_request_id, new_request_id

# Interactions are small JSON documents (a few KiB); anything far larger is not from Discord.
router = APIRouter(tags=["discord"], route_class=body_limit_route(JSON_MAX_BYTES))


@router.post("/discord/interactions", summary="Discord HTTP interactions endpoint (signed by Discord)")
async def interactions(request: Request, discord: DiscordDep) -> JSONResponse:
    body = await request.body()
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
