"""NBD request validation: a table of requests and the errno each gets, and a spec oracle."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from remem_client.nbd import wire
from remem_client.nbd.transmission import Limits, refusal, validate

Cmd = wire.Cmd
FUA = wire.CMD_FLAG_FUA
NO_HOLE = wire.CMD_FLAG_NO_HOLE
DF = wire.CMD_FLAG_DF
FAST_ZERO = wire.CMD_FLAG_FAST_ZERO
EINVAL = wire.NBD_EINVAL
ENOSPC = wire.NBD_ENOSPC
MAX = wire.MAX_BLOCK_SIZE
SIZE = 1 << 30

# What remem advertises (server.transmission_flags) plus DF, as with structured replies.
EVERYTHING = (
    wire.FLAG_HAS_FLAGS
    | wire.FLAG_SEND_FLUSH
    | wire.FLAG_SEND_FUA
    | wire.FLAG_SEND_TRIM
    | wire.FLAG_SEND_WRITE_ZEROES
    | wire.FLAG_SEND_FAST_ZERO
    | wire.FLAG_SEND_DF
)
FULL = Limits(EVERYTHING, SIZE)
BARE = Limits(wire.FLAG_HAS_FLAGS, SIZE)  # a backend that can only read and write


@pytest.mark.parametrize(
    ("limits", "cmd", "flags", "offset", "length", "errno"),
    [
        # READ
        (FULL, Cmd.READ, 0, 0, 4096, 0),
        (FULL, Cmd.READ, 0, 1, 3, 0),  # no alignment rule: the minimum block size is 1
        (FULL, Cmd.READ, 0, SIZE - 4096, 4096, 0),
        (FULL, Cmd.READ, 0, SIZE, 0, 0),
        (FULL, Cmd.READ, FUA | DF, 0, 4096, 0),
        (FULL, Cmd.READ, 0, 0, MAX, 0),
        (FULL, Cmd.READ, 0, SIZE - 4095, 4096, EINVAL),  # past the end: EINVAL for a read
        (FULL, Cmd.READ, 0, SIZE + 1, 0, EINVAL),
        (FULL, Cmd.READ, 0, (1 << 64) - 1, 1, EINVAL),
        (FULL, Cmd.READ, 0, 0, MAX + 1, EINVAL),
        (FULL, Cmd.READ, NO_HOLE, 0, 4096, EINVAL),
        (FULL, Cmd.READ, FAST_ZERO, 0, 4096, EINVAL),
        (FULL, Cmd.READ, 1 << 15, 0, 4096, EINVAL),
        (BARE, Cmd.READ, DF, 0, 4096, EINVAL),  # DF only once structured replies are on
        (BARE, Cmd.READ, FUA, 0, 4096, EINVAL),  # FUA only if advertised
        # WRITE
        (FULL, Cmd.WRITE, 0, 0, 4096, 0),
        (FULL, Cmd.WRITE, FUA, SIZE - 1, 1, 0),
        (FULL, Cmd.WRITE, 0, SIZE - 1, 2, ENOSPC),  # past the end: ENOSPC for a write
        (FULL, Cmd.WRITE, 0, SIZE, 1, ENOSPC),
        (FULL, Cmd.WRITE, 0, 0, MAX + 1, EINVAL),  # (the parser closes the connection first)
        (FULL, Cmd.WRITE, DF, 0, 4096, EINVAL),
        (BARE, Cmd.WRITE, 0, 0, 4096, 0),
        (BARE, Cmd.WRITE, FUA, 0, 4096, EINVAL),
        # FLUSH
        (FULL, Cmd.FLUSH, 0, 0, 0, 0),
        (FULL, Cmd.FLUSH, FUA, 0, 0, 0),
        (FULL, Cmd.FLUSH, 0, 4096, 0, EINVAL),
        (FULL, Cmd.FLUSH, 0, 0, 1, EINVAL),
        (FULL, Cmd.FLUSH, NO_HOLE, 0, 0, EINVAL),
        (BARE, Cmd.FLUSH, 0, 0, 0, EINVAL),  # not advertised
        # TRIM
        (FULL, Cmd.TRIM, 0, 0, SIZE, 0),
        (FULL, Cmd.TRIM, FUA, 4096, 0, 0),
        (FULL, Cmd.TRIM, 0, 4096, SIZE, EINVAL),  # past the end: EINVAL per the spec
        (FULL, Cmd.TRIM, NO_HOLE, 0, 4096, EINVAL),
        (BARE, Cmd.TRIM, 0, 0, 4096, EINVAL),
        # WRITE_ZEROES: no payload, so any u32 length inside the export
        (FULL, Cmd.WRITE_ZEROES, FUA | NO_HOLE | FAST_ZERO, 0, 4096, 0),
        (Limits(EVERYTHING, 1 << 33), Cmd.WRITE_ZEROES, 0, 0, 0xFFFFFFFF, 0),
        (FULL, Cmd.WRITE_ZEROES, 0, 0, SIZE + 1, ENOSPC),
        (FULL, Cmd.WRITE_ZEROES, DF, 0, 4096, EINVAL),
        (
            Limits(EVERYTHING & ~wire.FLAG_SEND_FAST_ZERO, SIZE),
            Cmd.WRITE_ZEROES,
            FAST_ZERO,
            0,
            1,
            EINVAL,
        ),
        (BARE, Cmd.WRITE_ZEROES, 0, 0, 4096, EINVAL),
        # commands remem never advertises, and numbers beyond any command
        (FULL, Cmd.DISC, 0, 0, 0, EINVAL),  # (the parser handles DISC before validation)
        (FULL, Cmd.CACHE, 0, 0, 4096, EINVAL),
        (FULL, Cmd.BLOCK_STATUS, 0, 0, 4096, EINVAL),
        (FULL, Cmd.RESIZE, 0, 0, 0, EINVAL),
        (FULL, 9, 0, 0, 0, EINVAL),
        (FULL, 0xFFFF, 0, 0, 0, EINVAL),
    ],
)
def test_validate_answers_each_request_with_the_errno_of_the_spec(
    limits: Limits, cmd: int, flags: int, offset: int, length: int, errno: int
) -> None:
    assert validate(limits, cmd, flags, offset, length) == errno


@pytest.mark.parametrize(
    ("cmd", "flags", "offset", "length", "message"),
    [
        (Cmd.CACHE, 0, 0, 1, b"unknown or unsupported command"),
        (Cmd.READ, NO_HOLE, 0, 1, b"flag not valid for this command"),
        (Cmd.FLUSH, 0, 1, 0, b"flush takes no offset or length"),
        (Cmd.READ, 0, 0, MAX + 1, b"length above the maximum block size"),
        (Cmd.WRITE, 0, SIZE, 1, b"write beyond the end of the device"),
        (Cmd.TRIM, 0, SIZE, 1, b"request beyond the end of the device"),
    ],
)
def test_refusal_says_which_check_failed(
    cmd: int, flags: int, offset: int, length: int, message: bytes
) -> None:
    errno, text = refusal(FULL, cmd, flags, offset, length)
    assert text == message
    assert errno == validate(FULL, cmd, flags, offset, length) != 0


def spec_errno(
    transmission_flags: int, size: int, cmd: int, flags: int, offset: int, length: int
) -> int:
    """The same rules written out from the spec's wording, independently of `Limits`."""
    advertised: dict[int, bool] = {
        Cmd.READ: True,
        Cmd.WRITE: True,
        Cmd.FLUSH: bool(transmission_flags & wire.FLAG_SEND_FLUSH),
        Cmd.TRIM: bool(transmission_flags & wire.FLAG_SEND_TRIM),
        Cmd.WRITE_ZEROES: bool(transmission_flags & wire.FLAG_SEND_WRITE_ZEROES),
    }
    if not advertised.get(cmd, False):
        return EINVAL
    legal = FUA if transmission_flags & wire.FLAG_SEND_FUA else 0
    if cmd == Cmd.READ and transmission_flags & wire.FLAG_SEND_DF:
        legal |= DF
    if cmd == Cmd.WRITE_ZEROES:
        legal |= NO_HOLE
        if transmission_flags & wire.FLAG_SEND_FAST_ZERO:
            legal |= FAST_ZERO
    if flags & ~legal:
        return EINVAL
    if cmd == Cmd.FLUSH:
        return EINVAL if offset or length else 0
    if cmd in (Cmd.READ, Cmd.WRITE) and length > MAX:
        return EINVAL
    if offset + length > size:
        return ENOSPC if cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else EINVAL
    return 0


@given(
    transmission_flags=st.integers(0, 0xFFFF),
    size=st.integers(1, 1 << 40),
    cmd=st.one_of(st.integers(0, 10), st.integers(0, 0xFFFF)),
    flags=st.one_of(st.sampled_from([0, FUA, NO_HOLE, DF, FAST_ZERO]), st.integers(0, 0xFFFF)),
    offset=st.one_of(st.integers(0, 1 << 41), st.integers(0, (1 << 64) - 1)),
    length=st.one_of(st.integers(0, MAX + 2), st.integers(0, 0xFFFFFFFF)),
)
def test_validate_agrees_with_the_spec_written_out(
    transmission_flags: int, size: int, cmd: int, flags: int, offset: int, length: int
) -> None:
    limits = Limits(transmission_flags, size)
    errno = validate(limits, cmd, flags, offset, length)
    assert errno == spec_errno(transmission_flags, size, cmd, flags, offset, length)
    if errno:
        assert refusal(limits, cmd, flags, offset, length)[0] == errno
