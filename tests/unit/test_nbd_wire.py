"""NBD wire structs: sizes the spec fixes, big-endian round trips, errno mapping."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from remem_client.nbd import wire

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, 0xFFFFFFFFFFFFFFFF)


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (wire.GREETING, 18),
        (wire.CLIENT_FLAGS, 4),
        (wire.OPTION_HEADER, 16),
        (wire.OPTION_REPLY_HEADER, 20),
        (wire.EXPORT_NAME_REPLY, 10),
        (wire.INFO_EXPORT, 12),
        (wire.INFO_BLOCK_SIZE, 14),
        (wire.REQUEST, 28),
        (wire.SIMPLE_REPLY, 16),
        (wire.STRUCTURED_REPLY, 20),
        (wire.STRUCTURED_READ, 28),
        (wire.ERROR_PAYLOAD, 6),
    ],
)
def test_struct_sizes_match_the_spec(layout: struct.Struct, size: int) -> None:
    assert layout.size == size
    assert layout.format.startswith(">")


def test_magics_spell_what_the_spec_says() -> None:
    assert wire.NBDMAGIC.to_bytes(8, "big") == b"NBDMAGIC"
    assert wire.IHAVEOPT.to_bytes(8, "big") == b"IHAVEOPT"
    assert wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, 0, 0, 0, 0)[:4] == b"\x25\x60\x95\x13"
    assert wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, 0, 0)[:4] == b"\x67\x44\x66\x98"
    assert wire.STRUCTURED_REPLY_MAGIC == 0x668E33EF
    assert wire.OPTION_REPLY_MAGIC == 0x3E889045565A9


def test_request_layout_is_big_endian_in_spec_order() -> None:
    packed = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0x0102, 0x0304, 0x05, 0x06, 0x07)
    assert packed == (
        bytes.fromhex("25609513")
        + bytes.fromhex("0102")
        + bytes.fromhex("0304")
        + (5).to_bytes(8, "big")
        + (6).to_bytes(8, "big")
        + (7).to_bytes(4, "big")
    )


@given(flags=u16, cmd=u16, handle=u64, offset=u64, length=u32)
def test_request_round_trip(flags: int, cmd: int, handle: int, offset: int, length: int) -> None:
    packed = wire.REQUEST.pack(wire.REQUEST_MAGIC, flags, cmd, handle, offset, length)
    assert wire.REQUEST.unpack(packed) == (wire.REQUEST_MAGIC, flags, cmd, handle, offset, length)


@given(error=u32, handle=u64)
def test_simple_reply_round_trip(error: int, handle: int) -> None:
    packed = wire.SIMPLE_REPLY.pack(wire.SIMPLE_REPLY_MAGIC, error, handle)
    assert wire.SIMPLE_REPLY.unpack(packed) == (wire.SIMPLE_REPLY_MAGIC, error, handle)


@given(flags=u16, kind=u16, handle=u64, length=u32, offset=u64)
def test_structured_reply_round_trip(
    flags: int, kind: int, handle: int, length: int, offset: int
) -> None:
    magic = wire.STRUCTURED_REPLY_MAGIC
    chunk = wire.STRUCTURED_REPLY.pack(magic, flags, kind, handle, length)
    assert wire.STRUCTURED_REPLY.unpack(chunk) == (magic, flags, kind, handle, length)
    read = wire.STRUCTURED_READ.pack(magic, flags, kind, handle, length, offset)
    assert read == chunk + wire.OFFSET.pack(offset)
    assert wire.STRUCTURED_READ.unpack(read) == (magic, flags, kind, handle, length, offset)


@given(option=u32, length=u32, reply_type=u32)
def test_option_headers_round_trip(option: int, length: int, reply_type: int) -> None:
    header = wire.OPTION_HEADER.pack(wire.IHAVEOPT, option, length)
    assert header[:8] == b"IHAVEOPT"
    assert wire.OPTION_HEADER.unpack(header) == (wire.IHAVEOPT, option, length)
    reply = wire.OPTION_REPLY_HEADER.pack(wire.OPTION_REPLY_MAGIC, option, reply_type, length)
    assert wire.OPTION_REPLY_HEADER.unpack(reply) == (
        wire.OPTION_REPLY_MAGIC,
        option,
        reply_type,
        length,
    )


@given(size=u64, flags=u16, minimum=u32, preferred=u32, maximum=u32)
def test_info_round_trip(size: int, flags: int, minimum: int, preferred: int, maximum: int) -> None:
    export = wire.INFO_EXPORT.pack(wire.Info.EXPORT, size, flags)
    assert wire.INFO_EXPORT.unpack(export) == (wire.Info.EXPORT, size, flags)
    block = wire.INFO_BLOCK_SIZE.pack(wire.Info.BLOCK_SIZE, minimum, preferred, maximum)
    assert wire.INFO_BLOCK_SIZE.unpack(block) == (wire.Info.BLOCK_SIZE, minimum, preferred, maximum)


def test_protocol_numbers() -> None:
    assert [o.value for o in wire.Opt][:8] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert wire.Rep.ERR_UNSUP == 0x80000001 and wire.Rep.ERR_UNKNOWN == 0x80000006
    assert wire.Cmd.WRITE_ZEROES == 6 and wire.Cmd.DISC == 2
    assert wire.REPLY_TYPE_ERROR == 0x8001
    assert wire.FLAG_CAN_MULTI_CONN == 0x100 and wire.FLAG_SEND_FAST_ZERO == 0x800
    assert wire.MAX_BLOCK_SIZE == 32 * 1024 * 1024


@pytest.mark.parametrize(
    ("system", "nbd"),
    [
        (errno.EIO, wire.NBD_EIO),
        (errno.ENOSPC, wire.NBD_ENOSPC),
        (errno.EDQUOT, wire.NBD_ENOSPC),
        (errno.EFBIG, wire.NBD_ENOSPC),
        (errno.EROFS, wire.NBD_EPERM),
        (errno.EINVAL, wire.NBD_EINVAL),
        (errno.ENOTSUP, wire.NBD_ENOTSUP),
        (errno.ESHUTDOWN, wire.NBD_ESHUTDOWN),
        (errno.ETIMEDOUT, wire.NBD_EIO),  # not an NBD error: the I/O failed
        (errno.ECONNRESET, wire.NBD_EIO),
    ],
)
def test_errno_mapping(system: int, nbd: int) -> None:
    assert wire.nbd_error(system) == nbd
