"""NBD fixed-newstyle handshake (option haggling), server side.

The handshake is not the hot path: it runs once per connection as one coroutine over a
minimal `HandshakeIO` (read exactly n bytes, write bytes), so it can be unit-tested
without sockets. Transmission starts when `negotiate` returns.

Supported options (NetworkBlockDevice/nbd `doc/proto.md`, nbdkit
`server/protocol-handshake-newstyle.c`):

    NBD_OPT_EXPORT_NAME       reply size + flags (+124 zero bytes unless C_NO_ZEROES);
                              an unknown name ends the session (the spec gives no error reply)
    NBD_OPT_INFO / NBD_OPT_GO NBD_REP_INFO: EXPORT, BLOCK_SIZE (always), NAME and DESCRIPTION
                              (when asked), then ACK; unknown name -> NBD_REP_ERR_UNKNOWN;
                              GO then enters transmission
    NBD_OPT_LIST              one NBD_REP_SERVER, then ACK
    NBD_OPT_STRUCTURED_REPLY  ACK; READ replies become structured chunks, DF is advertised
    NBD_OPT_ABORT             ACK, then the connection closes
    anything else             NBD_REP_ERR_UNSUP (STARTTLS, meta contexts, extended headers,
                              unknown numbers), and negotiation goes on

Malformed option data of a known option gets NBD_REP_ERR_INVALID and negotiation goes on.
Only violations that break framing or a MUST end the connection (`HandshakeError`, with a
closed `reason` for the malformed-requests metric): unknown client flags, a bad option
magic, option data above `wire.MAX_OPTION_LENGTH`, a truncated option, an unknown export
name in NBD_OPT_EXPORT_NAME.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from remem_client.nbd import wire
from remem_client.nbd.wire import Info, Opt, Rep


class TruncatedRead(EOFError):
    """The peer closed the connection; `partial` bytes of the wanted message had arrived."""

    def __init__(self, partial: int) -> None:
        super().__init__(f"connection closed after {partial} bytes of a message")
        self.partial = partial


class HandshakeError(Exception):
    """A protocol violation that ends the connection; `reason` labels the metric."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class HandshakeIO(Protocol):
    """What `negotiate` needs from a connection."""

    async def read_exact(self, n: int) -> bytes:
        """Return exactly n bytes; raise TruncatedRead if the peer closes first."""
        ...

    def write(self, data: bytes) -> None:
        """Queue bytes for the peer."""
        ...


@dataclass(frozen=True)
class Export:
    """The one export this server offers, as the handshake describes it."""

    name: str
    description: str
    size: int
    # Transmission flags that do not depend on negotiation (HAS_FLAGS, SEND_* from the
    # backend's capabilities, CAN_MULTI_CONN); SEND_DF is added once structured replies are on.
    flags: int

    def transmission_flags(self, structured_replies: bool) -> int:
        """The transmission flags sent to a client with or without structured replies."""
        return self.flags | (wire.FLAG_SEND_DF if structured_replies else 0)


@dataclass(frozen=True)
class Negotiated:
    """Outcome of a successful handshake."""

    structured_replies: bool
    transmission_flags: int


GREETING = wire.GREETING.pack(
    wire.NBDMAGIC, wire.IHAVEOPT, wire.FLAG_FIXED_NEWSTYLE | wire.FLAG_NO_ZEROES
)
_PADDING = bytes(wire.EXPORT_NAME_PADDING)
_BLOCK_SIZE_INFO = wire.INFO_BLOCK_SIZE.pack(
    Info.BLOCK_SIZE, wire.MIN_BLOCK_SIZE, wire.PREFERRED_BLOCK_SIZE, wire.MAX_BLOCK_SIZE
)


def option_reply(option: int, reply_type: int, payload: bytes = b"") -> bytes:
    """One option reply: magic, option, reply type, length, payload."""
    header = wire.OPTION_REPLY_HEADER.pack(
        wire.OPTION_REPLY_MAGIC, option, reply_type, len(payload)
    )
    return header + payload


async def negotiate(io: HandshakeIO, export: Export) -> Negotiated | None:
    """Run the server side of the handshake.

    Args:
        io: the connection during the handshake.
        export: the export offered.

    Returns:
        What was agreed once the client enters transmission (NBD_OPT_GO or
        NBD_OPT_EXPORT_NAME), or None if it left cleanly (NBD_OPT_ABORT, or a close between
        options): the caller closes the connection.

    Raises:
        HandshakeError: a violation after which the connection must be closed.
    """
    io.write(GREETING)
    try:
        (client_flags,) = wire.CLIENT_FLAGS.unpack(await io.read_exact(wire.CLIENT_FLAGS.size))
    except TruncatedRead as exc:
        if exc.partial == 0:
            return None
        raise HandshakeError("truncated", "connection closed inside the client flags") from exc
    if client_flags & ~wire.KNOWN_CLIENT_FLAGS:
        raise HandshakeError("bad_client_flags", f"unknown client flags {client_flags:#x}")
    no_zeroes = bool(client_flags & wire.FLAG_C_NO_ZEROES)
    names = (b"", export.name.encode())
    structured = False

    while True:
        try:
            header = await io.read_exact(wire.OPTION_HEADER.size)
        except TruncatedRead as exc:
            if exc.partial == 0:
                return None  # the client hung up between options
            raise HandshakeError("truncated", "connection closed inside an option") from exc
        magic, option, length = wire.OPTION_HEADER.unpack(header)
        if magic != wire.IHAVEOPT:
            raise HandshakeError("bad_option_magic", f"bad option magic {magic:#x}")
        if length > wire.MAX_OPTION_LENGTH:
            raise HandshakeError("option_too_large", f"option {option} with {length} bytes")
        try:
            data = await io.read_exact(length) if length else b""
        except TruncatedRead as exc:
            raise HandshakeError("truncated", "connection closed inside option data") from exc

        if option == Opt.EXPORT_NAME:
            if data not in names:
                raise HandshakeError("unknown_export", f"unknown export {data[:64]!r}")
            flags = export.transmission_flags(structured)
            reply = wire.EXPORT_NAME_REPLY.pack(export.size, flags)
            io.write(reply if no_zeroes else reply + _PADDING)
            return Negotiated(structured_replies=structured, transmission_flags=flags)

        if option == Opt.ABORT:
            io.write(option_reply(option, Rep.ACK))
            return None

        if option == Opt.LIST:
            if length:
                io.write(option_reply(option, Rep.ERR_INVALID, b"NBD_OPT_LIST takes no data"))
                continue
            name = export.name.encode()
            server = wire.NAME_LENGTH.pack(len(name)) + name + export.description.encode()
            io.write(option_reply(option, Rep.SERVER, server) + option_reply(option, Rep.ACK))
            continue

        if option == Opt.STRUCTURED_REPLY:
            if length:
                io.write(option_reply(option, Rep.ERR_INVALID, b"option takes no data"))
                continue
            structured = True
            io.write(option_reply(option, Rep.ACK))
            continue

        if option in (Opt.INFO, Opt.GO):
            replies, go = _info(option, data, export, names, structured)
            io.write(replies)
            if go:
                return Negotiated(
                    structured_replies=structured,
                    transmission_flags=export.transmission_flags(structured),
                )
            continue

        # STARTTLS (this server is NOTLS), meta contexts, extended headers, unknown numbers.
        io.write(option_reply(option, Rep.ERR_UNSUP, b"option not supported"))


def _info(
    option: int, data: bytes, export: Export, names: tuple[bytes, ...], structured: bool
) -> tuple[bytes, bool]:
    """Answer NBD_OPT_INFO / NBD_OPT_GO; returns (reply bytes, enter transmission)."""
    length = len(data)
    if length < wire.NAME_LENGTH.size + wire.INFO_COUNT.size:
        return option_reply(option, Rep.ERR_INVALID, b"option data too short"), False
    (name_length,) = wire.NAME_LENGTH.unpack_from(data, 0)
    fixed = wire.NAME_LENGTH.size + wire.INFO_COUNT.size
    if name_length > length - fixed:
        return option_reply(option, Rep.ERR_INVALID, b"name length beyond option data"), False
    name = data[wire.NAME_LENGTH.size : wire.NAME_LENGTH.size + name_length]
    (count,) = wire.INFO_COUNT.unpack_from(data, wire.NAME_LENGTH.size + name_length)
    if length != fixed + name_length + count * wire.INFO_TYPE.size:
        return option_reply(option, Rep.ERR_INVALID, b"information request count mismatch"), False
    base = fixed + name_length
    requested = {
        wire.INFO_TYPE.unpack_from(data, base + i * wire.INFO_TYPE.size)[0] for i in range(count)
    }
    if name not in names:
        return option_reply(option, Rep.ERR_UNKNOWN, b"no such export"), False

    flags = export.transmission_flags(structured)
    parts = [option_reply(option, Rep.INFO, wire.INFO_EXPORT.pack(Info.EXPORT, export.size, flags))]
    if Info.NAME in requested:
        payload = wire.INFO_TYPE.pack(Info.NAME) + export.name.encode()
        parts.append(option_reply(option, Rep.INFO, payload))
    if Info.DESCRIPTION in requested:
        payload = wire.INFO_TYPE.pack(Info.DESCRIPTION) + export.description.encode()
        parts.append(option_reply(option, Rep.INFO, payload))
    # Sent even when not requested: our constraints are the spec's defaults (minimum 1), so
    # a client that ignores them is still served, and one that reads them learns the 32 MiB
    # maximum and the 4 KiB preferred size.
    parts.append(option_reply(option, Rep.INFO, _BLOCK_SIZE_INFO))
    parts.append(option_reply(option, Rep.ACK))
    return b"".join(parts), option == Opt.GO
