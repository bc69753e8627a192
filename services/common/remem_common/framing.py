"""Framing: turn a message plus binary payload into ZeroMQ frames and back.

Frame layout of every message on every boundary::

    [routing ids...]  b""  header_json  payload_0  payload_1 ...

- Routing ids are added and removed by ROUTER sockets; a DEALER sends from `b""` on, so REQ
  sockets interoperate. `split_routing` separates them.
- `header_json` is the pydantic model of the message (see `protocol.envelope`), UTF-8 JSON.
- Payload frames are raw bytes, never base64 inside JSON and never pickle: page data travels
  as arrays of 4096-byte pages, keys and checksums as little-endian integer arrays. Each
  message type documents its payload frames and `decode` checks their count.

`encode` and `decode` are pure: sockets only call send_multipart / recv_multipart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from remem_common.protocol.envelope import PROTOCOL_VERSION, ErrorCode, ProtocolError

# Anything with the buffer protocol: bytes, zmq.Frame, numpy arrays. Typed as Any because
# numpy's stubs only declare the buffer protocol on Python 3.12+.
Frame = Any
MsgT = TypeVar("MsgT", bound=BaseModel)

# A header larger than this is refused before JSON parsing: no control message comes close,
# and parsing an attacker's megabytes of JSON is a cheap way to stall a service.
MAX_HEADER_BYTES = 64 * 1024

DELIMITER = b""


def encode(msg: BaseModel, *payload: Frame) -> list[Frame]:
    """Frames for `msg`: `[b"", header_json, *payload]` (routing ids are the socket's job).

    Args:
        msg: the header model; serialized with pydantic (`model_dump_json`).
        payload: raw binary frames in the order the message type documents.

    Returns:
        The list to hand to `send_multipart`.
    """
    return [DELIMITER, msg.model_dump_json().encode(), *payload]


def split_routing(frames: Sequence[Any]) -> tuple[list[Any], list[Any]]:
    """Split frames received on a ROUTER into (routing ids, body after the empty delimiter).

    Raises:
        ProtocolError: there is no empty delimiter frame.
    """
    for index, frame in enumerate(frames):
        if len(frame) == 0:
            return list(frames[:index]), list(frames[index + 1 :])
    raise ProtocolError(
        ErrorCode.MALFORMED, "no empty delimiter frame before the header", reason="no_delimiter"
    )


def _guess_msg_id(header: bytes) -> int:
    """Best-effort request id of a header that failed validation, so the error names it."""
    try:
        raw = json.loads(header)
    except ValueError:
        return 0
    if isinstance(raw, dict):
        msg_id = raw.get("msg_id")
        if isinstance(msg_id, int) and msg_id >= 0:
            return msg_id
    return 0


def decode_header(header: Frame, adapter: TypeAdapter[MsgT]) -> MsgT:
    """Validate one header frame against a boundary's discriminated union.

    Raises:
        ProtocolError: with the right `ErrorCode` and metric reason; never anything else.
    """
    data = bytes(header)
    if not data:
        raise ProtocolError(ErrorCode.MALFORMED, "empty header frame", reason="no_header")
    if len(data) > MAX_HEADER_BYTES:
        raise ProtocolError(
            ErrorCode.MALFORMED,
            f"header of {len(data)} bytes exceeds {MAX_HEADER_BYTES}",
            reason="bad_json",
        )
    try:
        return adapter.validate_json(data)
    except ValidationError as exc:
        raise _classify(data, exc) from None


def _classify(data: bytes, exc: ValidationError) -> ProtocolError:
    """Turn a validation failure into the error the sender should see (slow path only)."""
    try:
        raw = json.loads(data)
    except ValueError:
        raw = None
    if not isinstance(raw, dict):
        return ProtocolError(ErrorCode.MALFORMED, "header is not a JSON object", reason="bad_json")
    msg_id = _guess_msg_id(data)
    if "version" in raw and raw["version"] != PROTOCOL_VERSION:
        return ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {raw['version']!r} not supported; this peer speaks "
            f"{PROTOCOL_VERSION}",
            reason="bad_version",
            msg_id=msg_id,
        )
    first = exc.errors()[0]
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {raw.get('type')!r}",
            reason="unknown_type",
            msg_id=msg_id,
        )
    where = ".".join(str(part) for part in first["loc"][1:]) or "header"
    return ProtocolError(
        ErrorCode.MALFORMED, f"{where}: {first['msg']}", reason="bad_fields", msg_id=msg_id
    )


def decode(frames: Sequence[Frame], adapter: TypeAdapter[MsgT]) -> tuple[MsgT, list[Frame]]:
    """Split a message body (after any routing ids) into its header model and payload frames.

    Args:
        frames: `[header_json, *payload]`, or `[b"", header_json, *payload]` from a DEALER.
        adapter: the boundary's TypeAdapter over its discriminated union of messages.

    Returns:
        (message, payload frames); the payload count is checked by the message's handler,
        which knows how many frames its type documents.

    Raises:
        ProtocolError: malformed header, unknown type or unsupported version.
    """
    body = list(frames)
    if body and memoryview(body[0]).nbytes == 0:
        body = body[1:]
    if not body:
        raise ProtocolError(ErrorCode.MALFORMED, "no header frame", reason="no_header")
    return decode_header(body[0], adapter), body[1:]
