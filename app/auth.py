"""The admin API key: compared in constant time, and with no key configured everything is refused."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from app.deps import SettingsDep, get_settings_dep
from app.errors import ApiError
from config.settings import Settings

ApiKeyHeader = Annotated[str | None, Header(alias="X-Api-Key")]


def _key_matches(settings: Settings, x_api_key: str | None) -> bool:
    expected = settings.handwriting_api_key
    return (
        expected is not None
        and x_api_key is not None
        and secrets.compare_digest(x_api_key.encode("utf-8"), expected.get_secret_value().encode("utf-8"))
    )


def require_api_key(settings: SettingsDep, x_api_key: ApiKeyHeader = None) -> None:
    if settings.handwriting_api_key is None:
        raise ApiError(401, "unauthorized", "admin endpoints are disabled: HANDWRITING_API_KEY is not set")
    if not _key_matches(settings, x_api_key):
        raise ApiError(401, "unauthorized", "missing or wrong X-Api-Key")


def key_before_body(request: Request) -> None:
    """`require_api_key` for `body_limit_route(before_body=...)`: FastAPI reads the body before it runs
    dependencies, so without this anyone could make the API receive a whole body before the 401."""
    require_api_key(get_settings_dep(request), request.headers.get("X-Api-Key"))


def is_admin(settings: SettingsDep, x_api_key: ApiKeyHeader = None) -> bool:
    """For routes open to everyone that show more to the admin: True only with the right key."""
    return _key_matches(settings, x_api_key)


ApiKeyDep = Annotated[None, Depends(require_api_key)]
IsAdminDep = Annotated[bool, Depends(is_admin)]
