"""A small Discord REST client: interaction follow-ups, DMs through the bot, attachment downloads.

Every call goes to `DISCORD_API_BASE` with Discord's required User-Agent. A 429 is waited out for
its `retry_after` (bounded), a 404 right after a defer is retried briefly (discord-api-docs#7220)
and never hammered, since 401/403/429 answers count towards Discord's invalid-request ban.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

import httpx
from pydantic import BaseModel, StrictFloat, StrictInt, StrictStr, ValidationError

from app.discord.interaction import NO_MENTIONS, Lenient, Text
from config.settings import origin_of

USER_AGENT: Final = "DiscordBot (https://github.com/handwriting-ai/handwriting-ai, 0.1.0)"

# Discord error codes that mean an interaction token can no longer be used.
UNKNOWN_WEBHOOK: Final = 10015
UNKNOWN_INTERACTION: Final = 10062
INVALID_WEBHOOK_TOKEN: Final = 50027

_NOT_FOUND_DELAYS_S: Final = (0.3, 0.7, 1.5)
_SERVER_ERROR_RETRIES: Final = 2
_MAX_RATE_LIMIT_RETRIES: Final = 5
_MAX_REDIRECTS: Final = 3  # an attachment URL may redirect (CDN to media proxy), each hop within the origins

log = logging.getLogger("app.discord.client")

JsonObject = dict[str, object]


class Delivery(enum.Enum):
    OK = "ok"
    GONE = "gone"  # the token expired or the message is unknown: only a DM can still reach the user
    FAILED = "failed"  # Discord refused or could not be reached; logged


class DownloadError(Exception):
    """An attachment could not be fetched; `kind` is `forbidden` (not from an allowed origin), `too_large`,
    `unreachable` or `http`."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class ApiFailure:
    status: int
    code: int | None
    message: str
    retry_after: float | None = None


class _ErrorBody(BaseModel):
    code: Lenient[StrictInt] = None
    message: Lenient[Text] = None
    retry_after: Lenient[StrictFloat] = None


class _Channel(BaseModel):
    id: StrictStr


def describe_failure(response: httpx.Response) -> ApiFailure:
    """Discord's JSON error (`code`, `message`, `retry_after`) from a response, tolerant of anything else."""
    try:
        body = _ErrorBody.model_validate_json(response.content)
    except ValidationError:
        body = _ErrorBody()
    code, retry_after = body.code, body.retry_after
    message = body.message or response.reason_phrase or f"HTTP {response.status_code}"
    if retry_after is None and response.status_code == 429:
        header = response.headers.get("Retry-After")
        try:
            retry_after = float(header) if header is not None else None
        except ValueError:
            retry_after = None
    return ApiFailure(response.status_code, code, message, retry_after)


class DiscordClient:
    def __init__(
        self,
        api_base: str,
        application_id: str | None,
        bot_token: str | None = None,
        *,
        timeout_s: float = 10.0,
        max_retry_after_s: float = 30.0,
    ) -> None:
        self.api_base = api_base.rstrip("/")
        self.application_id = application_id
        self.bot_token = bot_token
        self.max_retry_after_s = max_retry_after_s
        self._http = httpx.AsyncClient(
            timeout=timeout_s,
            headers={"User-Agent": USER_AGENT},
            follow_redirects=False,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(
        self,
        method: str,
        path: str,
        payload: Mapping[str, object] | None = None,
        *,
        bot: bool = False,
        not_found_retries: int = 0,
    ) -> httpx.Response | None:
        """One API call with the retries Discord asks for; None when it could not be reached at all."""
        headers = {"Authorization": f"Bot {self.bot_token}"} if bot and self.bot_token else {}
        url = self.api_base + path
        not_found_left = min(not_found_retries, len(_NOT_FOUND_DELAYS_S))
        server_errors_left = _SERVER_ERROR_RETRIES
        rate_limits_left = _MAX_RATE_LIMIT_RETRIES
        while True:
            try:
                response = await self._http.request(method, url, json=payload, headers=headers)
            except httpx.HTTPError as exc:
                if server_errors_left > 0:
                    server_errors_left -= 1
                    await asyncio.sleep(1.0)
                    continue
                log.warning("discord %s %s unreachable: %s", method, _redact(path), exc)
                return None
            status = response.status_code
            if status == 429 and rate_limits_left > 0:
                failure = describe_failure(response)
                wait = failure.retry_after if failure.retry_after is not None else 1.0
                if wait > self.max_retry_after_s:
                    log.warning("discord %s %s rate limited for %.1fs: giving up", method, _redact(path), wait)
                    return response
                rate_limits_left -= 1
                await asyncio.sleep(max(wait, 0.0))
                continue
            if status == 404 and not_found_left > 0:
                await asyncio.sleep(_NOT_FOUND_DELAYS_S[len(_NOT_FOUND_DELAYS_S) - not_found_left])
                not_found_left -= 1
                continue
            if status >= 500 and server_errors_left > 0:
                server_errors_left -= 1
                await asyncio.sleep(1.0)
                continue
            return response

    async def edit_original(
        self, token: str, payload: Mapping[str, object], *, not_found_retries: int = 0
    ) -> Delivery:
        """PATCH the interaction's original response (works for 15 minutes, no bot token needed)."""
        if not self.application_id:
            log.warning("DISCORD_APPLICATION_ID is not set: cannot edit interaction responses")
            return Delivery.FAILED
        body = {"allowed_mentions": NO_MENTIONS, **payload}
        path = f"/webhooks/{self.application_id}/{token}/messages/@original"
        response = await self._send("PATCH", path, body, not_found_retries=not_found_retries)
        return _delivery(response, "edit_original")

    async def send_dm(self, user_id: int, payload: Mapping[str, object]) -> Delivery:
        """Open (or reuse) the DM channel with a user and post there, through the bot token."""
        if not self.bot_token:
            return Delivery.FAILED
        opened = await self._send("POST", "/users/@me/channels", {"recipient_id": str(user_id)}, bot=True)
        if opened is None or opened.status_code != 200:
            return _delivery(opened, "open_dm")
        try:
            channel = _Channel.model_validate_json(opened.content)
        except ValidationError:
            log.warning("discord open_dm answered without a channel id")
            return Delivery.FAILED
        body = {"allowed_mentions": NO_MENTIONS, **payload}
        response = await self._send("POST", f"/channels/{channel.id}/messages", body, bot=True)
        return _delivery(response, "send_dm")

    async def download(self, url: str, *, max_bytes: int, timeout_s: float, origins: Collection[str]) -> bytes:
        """Fetch an attachment from one of `origins` (`scheme://host[:port]`), following redirects only
        within them (each hop checked), stopping at `max_bytes` whatever the server claims; raises DownloadError."""
        try:
            async with asyncio.timeout(timeout_s):
                for _ in range(_MAX_REDIRECTS + 1):
                    if origin_of(url) not in origins:
                        raise DownloadError("forbidden", "the attachment is not on Discord's CDN")
                    async with self._http.stream("GET", url, headers={"Accept": "image/*"}) as response:
                        if response.next_request is not None:  # a redirect: its target is checked like the URL
                            url = str(response.next_request.url)
                            continue
                        return await _body(response, max_bytes)
                raise DownloadError("http", f"the attachment redirected more than {_MAX_REDIRECTS} times")
        except TimeoutError as exc:
            raise DownloadError("unreachable", "the attachment took too long to download") from exc
        except httpx.HTTPError as exc:
            raise DownloadError("unreachable", f"the attachment could not be reached ({type(exc).__name__})") from exc


async def _body(response: httpx.Response, max_bytes: int) -> bytes:
    if response.status_code != 200:
        raise DownloadError("http", f"the attachment could not be fetched (HTTP {response.status_code})")
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise DownloadError("too_large", "the attachment is too large")
    chunks: list[bytes] = []
    received = 0
    async for chunk in response.aiter_bytes():
        received += len(chunk)
        if received > max_bytes:
            raise DownloadError("too_large", "the attachment is too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _redact(path: str) -> str:
    """Interaction tokens are credentials for 15 minutes: keep them out of logs."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1] == "webhooks":
        parts[3] = "<token>"
    return "/".join(parts)


def _delivery(response: httpx.Response | None, what: str) -> Delivery:
    if response is None:
        return Delivery.FAILED
    if 200 <= response.status_code < 300:
        return Delivery.OK
    failure = describe_failure(response)
    gone_codes = (UNKNOWN_WEBHOOK, UNKNOWN_INTERACTION, INVALID_WEBHOOK_TOKEN)
    if response.status_code in (401, 404) or failure.code in gone_codes:
        log.info("discord %s: token or message gone (%s, code %s)", what, response.status_code, failure.code)
        return Delivery.GONE
    log.warning("discord %s failed: %s %s (code %s)", what, response.status_code, failure.message, failure.code)
    return Delivery.FAILED
