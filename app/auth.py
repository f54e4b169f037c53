"""The admin API key: compared in constant time, and with no key configured everything is refused."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header

from app.deps import SettingsDep
from app.errors import ApiError


def require_api_key(
    settings: SettingsDep, x_api_key: Annotated[str | None, Header(alias="X-Api-Key")] = None
) -> None:
    expected = settings.handwriting_api_key
    if expected is None:
        raise ApiError(401, "unauthorized", "admin endpoints are disabled: HANDWRITING_API_KEY is not set")
    if x_api_key is None or not secrets.compare_digest(
        x_api_key.encode("utf-8"), expected.get_secret_value().encode("utf-8")
    ):
        raise ApiError(401, "unauthorized", "missing or wrong X-Api-Key")


ApiKeyDep = Annotated[None, Depends(require_api_key)]
