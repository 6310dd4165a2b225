"""Decoding the base64 payloads of datasets: images in the raw and COCO-CN layouts and reference
LMDBs, region features in VinVL's ``features.tsv``.

The reference readers decode images with ``base64.urlsafe_b64decode``, which maps ``-`` and ``_``
onto ``+`` and ``/`` and so takes the standard alphabet, the URL-safe one and any mix of the two.
Datasets are made with either encoder, and often with the padding stripped, so every payload that
is the base64 of some bytes in either alphabet, padded or not, is accepted here. Unlike the
reference readers, which silently skip characters outside the alphabet and ignore whatever follows
the padding, anything else is refused with the reason: a character outside both alphabets (a line
break included), a length no base64 can have, padding in the wrong place or of the wrong length.
"""

from __future__ import annotations

import binascii
import re
from typing import NoReturn

# Applied to bytes, the URL-safe symbols become the standard ones; every other byte is unchanged.
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_", b"+/")
_OUTSIDE_ALPHABETS = re.compile(rb"[^A-Za-z0-9+/\-_=]")
_OUTSIDE_ALPHABETS_TEXT = re.compile(r"[^A-Za-z0-9+/\-_=]")


class Base64PayloadError(ValueError):
    """The payload is not the base64 of any bytes in the standard or URL-safe alphabet."""


def decode_base64_payload(payload: str | bytes | bytearray | memoryview) -> bytes:
    """The bytes whose base64 (standard or URL-safe alphabet, padded or not) ``payload`` is.

    An empty payload decodes to no bytes; callers for whom that is a defect say so themselves.
    Raises :class:`Base64PayloadError` naming the first problem.
    """
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    is_text = isinstance(payload, str)
    # Payloads are large (an image is ~100 kB of text) and mostly in the standard alphabet: the
    # membership tests are fast scans, and only a URL-safe payload pays for a translated copy.
    standard: str | bytes = payload
    if ("-" in payload or "_" in payload) if is_text else (b"-" in payload or b"_" in payload):
        try:
            encoded = payload.encode("ascii") if is_text else payload
        except UnicodeEncodeError:
            _refuse(payload, "not ASCII")
        standard = encoded.translate(_URLSAFE_TO_STANDARD)
    remainder = len(standard) % 4
    if remainder:
        length = f"{len(standard)} character{'s' if len(standard) != 1 else ''}"
        pad = "=" if isinstance(standard, str) else b"="
        if standard.endswith(pad):
            _refuse(payload, f"{length} with padding: padded base64 is a multiple of 4 characters long")
        if remainder == 1:
            _refuse(payload, f"{length}: no base64 is 1 more than a multiple of 4 characters long")
        # Unpadded: restore the padding the encoder left out, which is all that was stripped.
        standard += pad * (4 - remainder)
    try:
        return binascii.a2b_base64(standard, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or a str with non-ASCII characters
        _refuse(payload, str(exc))


def _refuse(payload: str | bytes, problem: str) -> NoReturn:
    # A stray character is the likelier cause of any failure, and the more useful one to name.
    stray = (_OUTSIDE_ALPHABETS_TEXT if isinstance(payload, str) else _OUTSIDE_ALPHABETS).search(payload)
    if stray is not None:
        character = stray.group() if isinstance(payload, str) else chr(stray.group()[0])
        problem = (f"character {character!r} at position {stray.start()} is not in the standard or URL-safe "
                   "base64 alphabet")
    raise Base64PayloadError(problem) from None


def decode_base64(payload: str | bytes) -> tuple[bytes | None, str | None]:
    """Decode an image payload: ``(bytes, None)``, or ``(None, reason)`` when it is not one.

    Accepts what :func:`decode_base64_payload` accepts, except a payload that is empty or decodes
    to no bytes, which cannot hold an image.
    """
    if not payload:
        return None, "empty base64 payload"
    try:
        data = decode_base64_payload(payload)
    except Base64PayloadError as exc:
        return None, f"invalid base64 ({exc})"
    if not data:
        return None, "base64 payload decodes to no bytes"
    return data, None
