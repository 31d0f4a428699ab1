"""Fuzz target: the bus decoder `cluster.bus.schemas.decode`, fed what a peer could put in one frame.

Input: raw bytes, or a msgpack map built from fuzz choices: a message type (known or not) and, for the type's
fields and a few unknown ones, values of every msgpack kind (ints of any size, bools, floats, str, bytes, None,
lists and maps, nested).

Invariants: the only exception is `SchemaError` (with a message, and `req` an int); a decoded message is an
instance of the type its "t" names and survives encode -> decode unchanged (byte for byte).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgpack

from cluster.bus.schemas import MESSAGE_TYPES, SchemaError, decode
from fuzz.common import Choices

SCALARS: tuple[Any, ...] = (0, 1, -1, 2**63, -(2**63), 2**64 - 1, True, False, None, 1.5, float("nan"), "",
                            "a@b.example", "\x00@\x00", "é@ü.example", "a\r\nb", b"", b"body\r\n", "x" * 300)


def value(choices: Choices, depth: int = 0) -> Any:
    kind = choices.below(8)
    if kind < 4 or depth > 3:
        return SCALARS[choices.below(len(SCALARS))]
    if kind == 4:
        return choices.chunk(40).decode("utf-8", "replace")
    if kind == 5:
        return choices.chunk(40)
    if kind == 6:
        return [value(choices, depth + 1) for _ in range(choices.below(4))]
    return {choices.pick(("recipient", "status", "code", "x", "t")): value(choices, depth + 1)
            for _ in range(choices.below(4))}


def frame(choices: Choices) -> bytes:
    if choices.below(4) == 0:
        return choices.rest()
    names = sorted(MESSAGE_TYPES)
    kind = names[choices.below(len(names))] if choices.below(8) else "nonsense"
    payload: dict[str, Any] = {"t": kind}
    cls = MESSAGE_TYPES.get(kind)
    for field in dataclasses.fields(cls) if cls is not None else ():
        if choices.below(8):
            payload[field.name] = value(choices)
    if choices.below(8) == 0:
        payload["unexpected"] = value(choices)
    packed: bytes = msgpack.packb(payload, use_bin_type=choices.below(4) != 0)
    return packed


def fuzz_one(data: bytes) -> None:
    encoded = frame(Choices(data))
    try:
        message = decode(encoded)
    except SchemaError as exc:
        assert str(exc), "SchemaError without a message"
        assert isinstance(getattr(exc, "req", 0), int)
        return
    assert type(message) is MESSAGE_TYPES[message.TYPE], message
    # Compared as bytes: a NaN float is not equal to itself.
    assert decode(message.encode()).encode() == message.encode(), f"{message!r} does not survive encode -> decode"
