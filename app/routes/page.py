"""`GET /`: the page to draw or drop a digit and read it, see the model, and train one (with the admin key).

Plain HTML, CSS and JavaScript shipped inside the package (app/web/), no build step and nothing fetched
from elsewhere, so it works offline. The page only calls the documented API. The `/train` options'
bounds come from DigitsTrainJobV1's JSON schema, put into the page as it is served (one home for them).
"""

from __future__ import annotations

import functools
import json
from importlib.resources import files
from typing import Final

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

from app.contracts import DigitsTrainJobV1
from app.errors import ApiError

router = APIRouter(tags=["page"])

_SCHEMA_SLOT: Final = "{{TRAIN_SCHEMA}}"
_MEDIA_TYPES: Final = {"app.js": "text/javascript; charset=utf-8", "app.css": "text/css; charset=utf-8"}
_CACHE: Final = {"Cache-Control": "no-cache"}


def _asset(name: str) -> str:
    return files("app").joinpath("web", name).read_text(encoding="utf-8")


@functools.cache
def _index() -> str:
    schema = json.dumps(DigitsTrainJobV1.model_json_schema()["properties"])
    # Inside <script>, "</" must not appear; JSON allows escaping the slash.
    return _asset("index.html").replace(_SCHEMA_SLOT, schema.replace("</", "<\\/"))


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The page (HTML). Its script and style are `GET /assets/app.js` and `GET /assets/app.css`."""
    return HTMLResponse(_index(), headers=_CACHE)


@router.get("/assets/{name}", response_class=Response, responses={404: {"description": "no such asset"}})
def asset(name: str) -> Response:
    """The page's script (`app.js`) and style sheet (`app.css`)."""
    media_type = _MEDIA_TYPES.get(name)
    if media_type is None:
        raise ApiError(404, "not_found", f"no asset named {name[:80]!r}: the page has app.js and app.css")
    return Response(_asset(name), media_type=media_type, headers=_CACHE)
