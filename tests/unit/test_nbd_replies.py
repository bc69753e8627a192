"""NBD reply packing: the bytes of every reply kind, and how replies are grouped into writes.

A recording transport stands in for the socket: these tests are about which bytes are
handed to which transport call (the integration tests run the same code over real sockets).
"""

from __future__ import annotations

import asyncio
import struct

import pytest
from remem_client.nbd import wire
from remem_client.nbd.replies import JOIN_MAX, ReplyWriter


class RecordingTransport:
    """Keeps every write and writelines call, as the parts it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.calls.append(("write", [bytes(data)]))

    def writelines(self, parts: list[bytes | bytearray | memoryview]) -> None:
        self.calls.append(("writelines", [bytes(part) for part in parts]))

    def stream(self) -> bytes:
        return b"".join(b"".join(parts) for _kind, parts in self.calls)


def writer(
    structured: bool, scatter_gather: bool = False
) -> tuple[ReplyWriter, RecordingTransport]:
    replies = ReplyWriter(asyncio.get_running_loop(), scatter_gather)
    transport = RecordingTransport()
    replies.transport = transport  # type: ignore[assignment]
    replies.structured = structured
    replies.batching = True  # flushed by hand, as the connection does after a callback
    return replies, transport


async def test_simple_replies() -> None:
    replies, transport = writer(structured=False)
    replies.ok(0x0102030405060708)
    replies.read(9, 4096, b"d" * 512)
    replies.empty_read(10)
    replies.error(11, wire.NBD_ENOSPC, b"ignored: simple replies carry no message")
    replies.flush()
    magic = wire.SIMPLE_REPLY_MAGIC
    assert transport.stream() == (
        struct.pack(">IIQ", magic, 0, 0x0102030405060708)
        + struct.pack(">IIQ", magic, 0, 9)
        + b"d" * 512
        + struct.pack(">IIQ", magic, 0, 10)
        + struct.pack(">IIQ", magic, wire.NBD_ENOSPC, 11)
    )


async def test_structured_replies() -> None:
    replies, transport = writer(structured=True)
    replies.ok(1)
    replies.read(2, 1 << 40, b"r" * 100)
    replies.empty_read(3)
    replies.error(4, wire.NBD_EIO, b"replica lost")
    replies.flush()
    magic, done = wire.STRUCTURED_REPLY_MAGIC, wire.REPLY_FLAG_DONE
    assert transport.stream() == (
        # a success without data stays a simple reply, as the spec allows
        struct.pack(">IIQ", wire.SIMPLE_REPLY_MAGIC, 0, 1)
        # one OFFSET_DATA chunk: offset, then the data
        + struct.pack(">IHHQI", magic, done, wire.REPLY_TYPE_OFFSET_DATA, 2, 108)
        + (1 << 40).to_bytes(8, "big")
        + b"r" * 100
        # an empty read is one NONE chunk
        + struct.pack(">IHHQI", magic, done, wire.REPLY_TYPE_NONE, 3, 0)
        # an error chunk: errno, message length, message
        + struct.pack(">IHHQI", magic, done, wire.REPLY_TYPE_ERROR, 4, 6 + 12)
        + struct.pack(">IH", wire.NBD_EIO, 12)
        + b"replica lost"
    )


async def test_small_replies_of_one_callback_go_out_in_one_write() -> None:
    replies, transport = writer(structured=False)
    for handle in range(100):
        replies.ok(handle)
    replies.read(100, 0, b"x" * 4096)
    replies.flush()
    assert [kind for kind, _parts in transport.calls] == ["write"]
    replies.flush()  # nothing left: no write
    assert len(transport.calls) == 1


async def test_big_read_payloads_are_written_as_they_are() -> None:
    replies, transport = writer(structured=False)
    big = memoryview(bytearray(b"B" * JOIN_MAX))
    replies.ok(1)
    replies.read(2, 0, big)
    replies.ok(3)
    replies.ok(4)
    replies.flush()
    sizes = [len(parts[0]) for _kind, parts in transport.calls]
    # the small parts before and after the payload are joined, the payload is not copied
    assert sizes == [32, JOIN_MAX, 32]
    assert transport.stream()[32:-32] == big


async def test_scatter_gather_hands_every_part_to_one_writelines() -> None:
    replies, transport = writer(structured=False, scatter_gather=True)
    replies.ok(1)
    replies.read(2, 0, b"B" * JOIN_MAX)
    replies.ok(3)
    replies.flush()
    assert [(kind, len(parts)) for kind, parts in transport.calls] == [("writelines", 4)]


async def test_outside_a_callback_replies_of_one_loop_turn_share_a_write() -> None:
    replies, transport = writer(structured=False)
    replies.batching = False
    replies.ok(1)
    replies.error(2, wire.NBD_EIO, b"")
    assert transport.calls == []  # scheduled, not written yet
    await asyncio.sleep(0)
    assert [kind for kind, _parts in transport.calls] == ["write"]
    assert len(transport.stream()) == 32


@pytest.mark.parametrize("structured", [True, False])
async def test_a_closed_writer_drops_replies(structured: bool) -> None:
    replies, transport = writer(structured)
    replies.closed = True
    replies.ok(1)
    replies.read(2, 0, b"x")
    replies.empty_read(3)
    replies.error(4, wire.NBD_EIO, b"gone")
    replies.flush()
    assert transport.calls == []
