"""Public ids: a type prefix and a time-ordered random part, so that ids sort by creation."""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case
# A random byte's low 5 bits as one base32 char (256 is a multiple of 32, so each char stays uniform).
_BYTE_TO_CHAR = bytes(ord(_ALPHABET[b & 31]) for b in range(256))


def _b32(value: int, length: int) -> str:
    out = []
    for _ in range(length):
        out.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(out))


def new_id(prefix: str) -> str:
    """`prefix_` + 10 chars of milliseconds + 16 chars of randomness (ULID layout)."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_b32(ms, 10)}{_b32(rand, 16)}"


def new_ids(prefix: str, count: int) -> list[str]:
    """`count` ids as `new_id` makes them, in one go: the same layout and 80 random bits each (16 chars of
    5 bits), sharing one millisecond. Sorted, so rows inserted in this order extend the primary key's
    index at its right edge rather than all over it."""
    head = f"{prefix}_{_b32(time.time_ns() // 1_000_000, 10)}"
    rand = os.urandom(16 * count).translate(_BYTE_TO_CHAR).decode()
    return sorted([head + rand[i : i + 16] for i in range(0, 16 * count, 16)])
