"""Message envelope shared by every boundary: headers, error replies and error codes.

Spec (protocol version 1)
-------------------------
Every message is one JSON header frame, optionally followed by raw binary payload frames (see
`remem_common.framing`). The header always carries:

- `type`     wire name, `<action>_request` or `<action>_reply`
- `version`  the protocol version, 1; a peer that speaks another version gets an
             `unsupported_version` error reply
- `msg_id`   an integer chosen by the sender, unique among its requests in flight
- `sent_at`  the sender's wall clock (seconds since the epoch), for lag metrics

Replies also carry `parent_id` (the request's `msg_id`) and `status`: "ok", or "error" with
`error_code` (an `ErrorCode`) and a human-readable `detail`. Any request may be answered
with `error_reply` instead of its own reply type.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

PROTOCOL_VERSION: Final = 1


class ErrorCode(StrEnum):
    """Why a request failed; the closed set every boundary uses."""

    MALFORMED = "malformed"  # frames or header do not parse, or lengths disagree
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_TYPE = "unknown_type"
    NO_SPACE = "no_space"  # the page server is full; nothing was stored
    BAD_CHECKSUM = "bad_checksum"  # a page's bytes do not match its checksum
    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"  # not this sender's tenant, or not permitted
    UNAVAILABLE = "unavailable"  # a dependency (peer, replica) could not be reached
    SHUTTING_DOWN = "shutting_down"
    INTERNAL = "internal"


def now() -> float:
    """Wall-clock time for `sent_at`."""
    return time.time()


class Message(BaseModel):
    """Fields every header has. Frozen: a message is a value, built once and sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = PROTOCOL_VERSION
    msg_id: int = Field(ge=0)
    sent_at: float = Field(default_factory=now)


class Request(Message):
    """Base of every request."""


class Reply(Message):
    """Base of every reply: names the request it answers and says how it went."""

    parent_id: int = Field(ge=0)
    status: Literal["ok", "error"] = "ok"


class ErrorReply(Reply):
    """The answer to any request that failed, on any boundary."""

    type: Literal["error_reply"] = "error_reply"
    status: Literal["ok", "error"] = "error"
    error_code: ErrorCode
    detail: str = ""


class ProtocolError(Exception):
    """A message that cannot be served; carries what the error reply will say.

    `reason` is a short closed-set label for the malformed-message metric.
    """

    def __init__(self, code: ErrorCode, detail: str, *, reason: str, msg_id: int = 0) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.reason = reason
        self.msg_id = msg_id

    def reply(self, msg_id: int = 0) -> ErrorReply:
        """The error reply for this failure (to `msg_id`, if the request's id is known)."""
        return ErrorReply(
            msg_id=0, parent_id=msg_id or self.msg_id, error_code=self.code, detail=self.detail
        )


# Closed set of labels for `*_malformed_messages_total{reason}`.
MALFORMED_REASONS = (
    "no_delimiter",
    "no_header",
    "bad_json",
    "bad_version",
    "unknown_type",
    "bad_fields",
    "bad_frames",
    "bad_payload",
)


def ok_reply_parser(type_name: str, field: str) -> Callable[[Any], tuple[int, int] | None]:
    """A hot-path reader of one kind of ok reply: a header (any buffer) in exactly the form
    its sender writes, `{"version", "msg_id", "sent_at", "parent_id", "status": "ok", "type":
    type_name, field}` with the numbers bounded (so every value is one the model accepts),
    gives (parent_id, field's value) from one regex match instead of a pydantic validation
    (~5 us a reply). Any other header, error replies and malformed ones included, gives None:
    the caller validates it with the models, which decide (and count) as before."""
    match = re.compile(
        rb'\{"version":' + str(PROTOCOL_VERSION).encode() + rb',"msg_id":(?:0|[1-9][0-9]{0,17}),'
        rb'"sent_at":[0-9]{1,12}(?:\.[0-9]{1,20})?,"parent_id":(0|[1-9][0-9]{0,17}),'
        rb'"status":"ok","type":"'
        + re.escape(type_name).encode()
        + rb'","'
        + re.escape(field).encode()
        + rb'":(0|[1-9][0-9]{0,17})\}\Z'
    ).match

    def parse(header: Any) -> tuple[int, int] | None:
        found = match(header)
        if found is None:
            return None
        return int(found[1]), int(found[2])

    return parse
