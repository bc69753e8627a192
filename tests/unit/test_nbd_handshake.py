"""Handshake state machine over a scripted connection (no sockets)."""

from __future__ import annotations

import struct

import pytest
from remem_client.nbd import wire
from remem_client.nbd.handshake import (
    Export,
    HandshakeError,
    Negotiated,
    TruncatedRead,
    negotiate,
)
from remem_client.nbd.wire import Info, Opt, Rep

EXPORT = Export(
    name="remem",
    description="test export",
    size=1 << 30,
    flags=wire.FLAG_HAS_FLAGS | wire.FLAG_SEND_FLUSH,
)


class ScriptedIO:
    """Client bytes prepared up front; everything the server writes is collected."""

    def __init__(self, client_bytes: bytes) -> None:
        self.incoming = bytearray(client_bytes)
        self.written = bytearray()

    async def read_exact(self, n: int) -> bytes:
        if len(self.incoming) < n:
            partial = len(self.incoming)
            self.incoming.clear()
            raise TruncatedRead(partial)
        data = bytes(self.incoming[:n])
        del self.incoming[:n]
        return data

    def write(self, data: bytes) -> None:
        self.written += data

    def replies(self) -> list[tuple[int, int, bytes]]:
        """Decode the option replies after the 18-byte greeting."""
        out = []
        buf = bytes(self.written[18:])
        while len(buf) >= 20:
            magic, option, reply_type, length = struct.unpack(">QIII", buf[:20])
            assert magic == wire.OPTION_REPLY_MAGIC
            out.append((option, reply_type, buf[20 : 20 + length]))
            buf = buf[20 + length :]
        return out


def opt(option: int, data: bytes = b"", magic: int = wire.IHAVEOPT) -> bytes:
    return struct.pack(">QII", magic, option, len(data)) + data


def go_data(name: bytes = b"remem", infos: tuple[int, ...] = ()) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


FLAGS = struct.pack(">I", wire.FLAG_C_FIXED_NEWSTYLE | wire.FLAG_C_NO_ZEROES)


async def test_greeting_advertises_fixed_newstyle_and_no_zeroes() -> None:
    io = ScriptedIO(b"")
    assert await negotiate(io, EXPORT) is None
    assert io.written[:16] == b"NBDMAGICIHAVEOPT"
    assert struct.unpack(">H", io.written[16:18])[0] == 3


async def test_go_replies_export_block_size_then_ack() -> None:
    io = ScriptedIO(FLAGS + opt(Opt.STRUCTURED_REPLY) + opt(Opt.GO, go_data()))
    result = await negotiate(io, EXPORT)
    assert result == Negotiated(
        structured_replies=True, transmission_flags=EXPORT.flags | wire.FLAG_SEND_DF
    )
    replies = io.replies()
    assert replies[0] == (Opt.STRUCTURED_REPLY, Rep.ACK, b"")
    infos = {struct.unpack(">H", p[:2])[0]: p for _, t, p in replies[1:] if t == Rep.INFO}
    assert struct.unpack(">HQH", infos[Info.EXPORT]) == (
        Info.EXPORT,
        1 << 30,
        EXPORT.flags | wire.FLAG_SEND_DF,
    )
    assert struct.unpack(">HIII", infos[Info.BLOCK_SIZE]) == (Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    assert Info.NAME not in infos and Info.DESCRIPTION not in infos
    assert replies[-1] == (Opt.GO, Rep.ACK, b"")


async def test_info_answers_name_and_description_when_asked_and_negotiation_goes_on() -> None:
    script = FLAGS + opt(Opt.INFO, go_data(b"", (Info.NAME, Info.DESCRIPTION, 999)))
    script += opt(Opt.GO, go_data())
    io = ScriptedIO(script)
    result = await negotiate(io, EXPORT)
    assert result is not None and not result.structured_replies
    infos = [p for o, t, p in io.replies() if o == Opt.INFO and t == Rep.INFO]
    assert wire.INFO_TYPE.pack(Info.NAME) + b"remem" in infos
    assert wire.INFO_TYPE.pack(Info.DESCRIPTION) + b"test export" in infos


async def test_unknown_export_name_in_go_is_err_unknown_then_go_on() -> None:
    io = ScriptedIO(FLAGS + opt(Opt.GO, go_data(b"nope")) + opt(Opt.GO, go_data(b"remem")))
    assert await negotiate(io, EXPORT) is not None
    replies = io.replies()
    assert replies[0][:2] == (Opt.GO, Rep.ERR_UNKNOWN)
    assert replies[-1] == (Opt.GO, Rep.ACK, b"")


@pytest.mark.parametrize(
    "bad",
    [
        b"",  # too short
        struct.pack(">I", 10) + b"remem" + struct.pack(">H", 0),  # name length too big
        go_data(b"remem", (1,))[:-1],  # count says one request, none follows
        go_data(b"remem") + b"x",  # trailing byte
    ],
)
async def test_malformed_info_is_err_invalid(bad: bytes) -> None:
    io = ScriptedIO(FLAGS + opt(Opt.INFO, bad) + opt(Opt.ABORT))
    assert await negotiate(io, EXPORT) is None
    replies = io.replies()
    assert replies[0][:2] == (Opt.INFO, Rep.ERR_INVALID)
    assert replies[1] == (Opt.ABORT, Rep.ACK, b"")


async def test_list_and_unknown_options() -> None:
    script = FLAGS + opt(Opt.LIST) + opt(Opt.LIST, b"x") + opt(Opt.STARTTLS) + opt(12345)
    script += opt(Opt.SET_META_CONTEXT, b"\0" * 8) + opt(Opt.STRUCTURED_REPLY, b"x")
    io = ScriptedIO(script + opt(Opt.ABORT))
    assert await negotiate(io, EXPORT) is None
    replies = io.replies()
    assert replies[0][:2] == (Opt.LIST, Rep.SERVER)
    assert replies[0][2] == struct.pack(">I", 5) + b"remem" + b"test export"
    assert replies[1] == (Opt.LIST, Rep.ACK, b"")
    assert replies[2][:2] == (Opt.LIST, Rep.ERR_INVALID)
    assert replies[3][:2] == (Opt.STARTTLS, Rep.ERR_UNSUP)
    assert replies[4][:2] == (12345, Rep.ERR_UNSUP)
    assert replies[5][:2] == (Opt.SET_META_CONTEXT, Rep.ERR_UNSUP)
    assert replies[6][:2] == (Opt.STRUCTURED_REPLY, Rep.ERR_INVALID)
    assert replies[7] == (Opt.ABORT, Rep.ACK, b"")


@pytest.mark.parametrize(("client_flags", "padding"), [(1, 124), (3, 0)])
async def test_export_name_with_and_without_zeroes(client_flags: int, padding: int) -> None:
    io = ScriptedIO(struct.pack(">I", client_flags) + opt(Opt.EXPORT_NAME, b""))
    result = await negotiate(io, EXPORT)
    assert result is not None and result.transmission_flags == EXPORT.flags
    reply = bytes(io.written[18:])
    assert reply[:10] == struct.pack(">QH", 1 << 30, EXPORT.flags)
    assert reply[10:] == bytes(padding)


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (struct.pack(">I", 4), "bad_client_flags"),
        (FLAGS + opt(Opt.LIST, magic=0x1234), "bad_option_magic"),
        (FLAGS + struct.pack(">QII", wire.IHAVEOPT, 99, 1 << 20), "option_too_large"),
        (FLAGS + opt(Opt.EXPORT_NAME, b"other"), "unknown_export"),
        (FLAGS + opt(Opt.GO, go_data())[:-3], "truncated"),
        (FLAGS + opt(Opt.LIST)[:5], "truncated"),
        (FLAGS[:2], "truncated"),
    ],
)
async def test_violations_end_the_handshake(script: bytes, reason: str) -> None:
    with pytest.raises(HandshakeError) as caught:
        await negotiate(ScriptedIO(script), EXPORT)
    assert caught.value.reason == reason


async def test_clean_close_between_options_is_not_an_error() -> None:
    assert await negotiate(ScriptedIO(FLAGS + opt(Opt.LIST)), EXPORT) is None
