"""Protobuf's wire format, the few pieces written by hand: varints and length-delimited fields.

Where bytes already encoded are passed on (a hub's once-encoded events, a request forwarded to
the writer process, a Txn measured before it is parsed), building a message object only to
serialize it again would copy and re-parse them; these write and read the framing directly.
"""

from __future__ import annotations


def length_delimited(field: int, payload: bytes) -> bytes:
    """`payload` as protobuf field `field` of wire type 2 (bytes, string, message)."""
    out = bytearray(varint((field << 3) | 2))
    out += varint(len(payload))
    out += payload
    return bytes(out)


def varint(n: int) -> bytes:
    """`n` (not negative) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at `pos` and the position after it; ValueError if it is cut short
    or longer than 64 bits."""
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
