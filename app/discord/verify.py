"""The one typed doorway to the `discord-interactions` package, made total: it never raises and never prints.

`discord_interactions.verify_key` is the verifier of record, but it prints every exception it
catches (so a wrong signature, which Discord sends on purpose, would write to stdout) and raises
outside its `try` on a `None` timestamp or a `str` body. So the shapes are checked here first, the
signature is checked once with PyNaCl (the same primitive the package uses), and only a request that
passes is handed to the package, on a path where it has nothing left to print.
"""

from __future__ import annotations

import enum
import time
from typing import Final

import discord_interactions
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

SIGNATURE_HEADER: Final = "X-Signature-Ed25519"
TIMESTAMP_HEADER: Final = "X-Signature-Timestamp"

_SIGNATURE_HEX_LEN: Final = 128  # 64 bytes
_PUBLIC_KEY_HEX_LEN: Final = 64  # 32 bytes
_TIMESTAMP_MAX_LEN: Final = 32
_HEX: Final = frozenset("0123456789abcdefABCDEF")


class VerifyResult(enum.Enum):
    OK = "ok"
    MISSING_HEADERS = "missing signature headers"
    MALFORMED_SIGNATURE = "malformed signature"
    MALFORMED_TIMESTAMP = "malformed timestamp"
    STALE_TIMESTAMP = "timestamp outside the allowed window"
    BAD_SIGNATURE = "invalid request signature"


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and all(c in _HEX for c in value)


def verify_request(
    body: bytes,
    signature: str | None,
    timestamp: str | None,
    public_key: str,
    *,
    max_age_s: int = 0,
    now: float | None = None,
) -> VerifyResult:
    """Check an interaction request exactly as received. `max_age_s` > 0 also refuses stale timestamps.

    Total: any input, however malformed, gives a `VerifyResult`; only `OK` means authentic.
    """
    if not isinstance(body, bytes) or signature is None or timestamp is None:
        return VerifyResult.MISSING_HEADERS
    if not signature or not timestamp:
        return VerifyResult.MISSING_HEADERS
    if not _is_hex(signature, _SIGNATURE_HEX_LEN):
        return VerifyResult.MALFORMED_SIGNATURE
    if len(timestamp) > _TIMESTAMP_MAX_LEN or not timestamp.isascii() or not timestamp.isprintable():
        return VerifyResult.MALFORMED_TIMESTAMP
    if not _is_hex(public_key, _PUBLIC_KEY_HEX_LEN):
        # Settings validate the key; this keeps the function total for any caller.
        return VerifyResult.BAD_SIGNATURE
    try:
        VerifyKey(bytes.fromhex(public_key)).verify(timestamp.encode("ascii") + body, bytes.fromhex(signature))
    except (BadSignatureError, ValueError, TypeError):  # nacl's ValueError subclasses ValueError
        return VerifyResult.BAD_SIGNATURE
    if discord_interactions.verify_key(body, signature, timestamp, public_key) is not True:
        return VerifyResult.BAD_SIGNATURE
    if max_age_s > 0:
        # Discord sends Unix seconds; the docs never promise it, so the check is opt-in.
        if not timestamp.isdigit():
            return VerifyResult.MALFORMED_TIMESTAMP
        current = time.time() if now is None else now
        if abs(current - int(timestamp)) > max_age_s:
            return VerifyResult.STALE_TIMESTAMP
    return VerifyResult.OK
