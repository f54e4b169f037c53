"""The signature check: authentic requests pass; every malformed input is refused quietly, never raised."""

from __future__ import annotations

import time

import pytest
from nacl.signing import SigningKey

from app.discord.verify import VerifyResult, verify_request

KEY = SigningKey.generate()
PUBLIC = KEY.verify_key.encode().hex()
BODY = b'{"type":1,"id":"1","token":"t"}'


def sign(body: bytes, ts: str, key: SigningKey = KEY) -> str:
    return key.sign(ts.encode() + body).signature.hex()


def test_an_authentic_request_passes() -> None:
    ts = str(int(time.time()))
    assert verify_request(BODY, sign(BODY, ts), ts, PUBLIC) is VerifyResult.OK


def test_uppercase_hex_signature_is_still_authentic() -> None:
    ts = str(int(time.time()))
    assert verify_request(BODY, sign(BODY, ts).upper(), ts, PUBLIC) is VerifyResult.OK


TS = "1700000000"
GOOD = sign(BODY, TS)


@pytest.mark.parametrize(
    ("body", "signature", "timestamp", "expected"),
    [
        (BODY, None, TS, VerifyResult.MISSING_HEADERS),
        (BODY, GOOD, None, VerifyResult.MISSING_HEADERS),
        (BODY, "", TS, VerifyResult.MISSING_HEADERS),
        (BODY, GOOD, "", VerifyResult.MISSING_HEADERS),
        (BODY, "zz" * 64, TS, VerifyResult.MALFORMED_SIGNATURE),  # not hex
        (BODY, GOOD[:-2], TS, VerifyResult.MALFORMED_SIGNATURE),  # 63 bytes
        (BODY, GOOD + "00", TS, VerifyResult.MALFORMED_SIGNATURE),  # 65 bytes
        (BODY, GOOD[:-1], TS, VerifyResult.MALFORMED_SIGNATURE),  # odd length
        (BODY, "é" * 128, TS, VerifyResult.MALFORMED_SIGNATURE),
        (BODY, GOOD, "17000000é0", VerifyResult.MALFORMED_TIMESTAMP),
        (BODY, GOOD, "1" * 100, VerifyResult.MALFORMED_TIMESTAMP),
        (BODY, GOOD, "1700000000\n", VerifyResult.MALFORMED_TIMESTAMP),
        (BODY, GOOD, "1700000001", VerifyResult.BAD_SIGNATURE),  # timestamp not the one signed
        (BODY + b" ", GOOD, TS, VerifyResult.BAD_SIGNATURE),  # body tampered
        (BODY, sign(BODY, TS, SigningKey.generate()), TS, VerifyResult.BAD_SIGNATURE),  # someone else's key
        (BODY, "00" * 64, TS, VerifyResult.BAD_SIGNATURE),
        (BODY.decode(), GOOD, TS, VerifyResult.MISSING_HEADERS),  # a str body: the package would raise
    ],
)
def test_bad_inputs_are_refused_without_raising_or_printing(
    body: object, signature: str | None, timestamp: str | None, expected: VerifyResult,
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert verify_request(body, signature, timestamp, PUBLIC) is expected  # type: ignore[arg-type]
    assert capsys.readouterr() == ("", "")


def test_a_malformed_public_key_fails_closed() -> None:
    assert verify_request(BODY, GOOD, TS, "not-a-key") is VerifyResult.BAD_SIGNATURE
    assert verify_request(BODY, GOOD, TS, "ab" * 31) is VerifyResult.BAD_SIGNATURE


def test_freshness_is_off_by_default_and_refuses_old_timestamps_when_on() -> None:
    old = "978307200"  # 2001-01-01, correctly signed
    signature = sign(BODY, old)
    assert verify_request(BODY, signature, old, PUBLIC) is VerifyResult.OK
    assert verify_request(BODY, signature, old, PUBLIC, max_age_s=300) is VerifyResult.STALE_TIMESTAMP
    now = str(int(time.time()))
    assert verify_request(BODY, sign(BODY, now), now, PUBLIC, max_age_s=300) is VerifyResult.OK
    future = str(int(time.time()) + 3600)
    assert verify_request(BODY, sign(BODY, future), future, PUBLIC, max_age_s=300) is VerifyResult.STALE_TIMESTAMP


def test_freshness_needs_a_numeric_timestamp() -> None:
    ts = "2024-01-01T00:00:00Z"
    assert verify_request(BODY, sign(BODY, ts), ts, PUBLIC) is VerifyResult.OK
    assert verify_request(BODY, sign(BODY, ts), ts, PUBLIC, max_age_s=300) is VerifyResult.MALFORMED_TIMESTAMP
