"""A deliberately small, blocking NBD client for protocol tests: it sends exactly the bytes a
test asks for (malformed ones too) and decodes replies, simple or structured.

Only the constants come from the server's `nbd.wire`; framing is written out here again so
that a mistake in the server's structs is not mirrored by the test.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

from remem_client.nbd import wire

NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"


class Closed(EOFError):
    """The server closed the connection."""


@dataclass
class Reply:
    """One decoded reply (all chunks of a structured one)."""

    handle: int
    error: int
    data: bytes = b""
    structured: bool = False
    message: bytes = b""
    chunks: list[int] = field(default_factory=list)


class RawNbd:
    """One connection; methods block with the socket timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.structured = False
        self.size = 0
        self.flags = 0
        self.pending: dict[int, tuple[int, int]] = {}  # handle -> (cmd, length)

    @classmethod
    def unix(cls, path: str, timeout: float = 10.0) -> RawNbd:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawNbd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- bytes --------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise Closed(f"closed with {n} bytes missing")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        """True if the server closes the connection (reads and discards until EOF)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    # --- handshake ----------------------------------------------------------------------

    def greeting(self, client_flags: int = 3) -> int:
        """Read the greeting, send client flags; returns the handshake flags."""
        data = self.recv_exact(18)
        assert data[:8] == NBDMAGIC and data[8:16] == IHAVEOPT, data
        (flags,) = struct.unpack(">H", data[16:])
        self.send(struct.pack(">I", client_flags))
        return int(flags)

    def option(self, option: int, data: bytes = b"") -> None:
        self.send(IHAVEOPT + struct.pack(">II", option, len(data)) + data)

    def option_reply(self) -> tuple[int, int, bytes]:
        magic, option, reply_type, length = struct.unpack(">QIII", self.recv_exact(20))
        assert magic == wire.OPTION_REPLY_MAGIC, hex(magic)
        return option, reply_type, self.recv_exact(length)

    def info_or_go(
        self, option: int, name: bytes = b"remem", infos: tuple[int, ...] = ()
    ) -> tuple[int, list[tuple[int, bytes]]]:
        """Send NBD_OPT_INFO/GO; returns (final reply type, [(info type, info payload)])."""
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
        data += b"".join(struct.pack(">H", i) for i in infos)
        self.option(option, data)
        infos_seen = []
        while True:
            opt, reply_type, payload = self.option_reply()
            assert opt == option
            if reply_type != wire.Rep.INFO:
                break
            (info_type,) = struct.unpack(">H", payload[:2])
            infos_seen.append((info_type, payload[2:]))
            if info_type == wire.Info.EXPORT:
                self.size, self.flags = struct.unpack(">QH", payload[2:])
        return reply_type, infos_seen

    def connect(self, name: bytes = b"remem", structured: bool = True) -> RawNbd:
        """Full handshake with NBD_OPT_GO; afterwards the connection is in transmission."""
        self.greeting()
        if structured:
            self.option(wire.Opt.STRUCTURED_REPLY)
            assert self.option_reply()[1] == wire.Rep.ACK
            self.structured = True
        reply_type, _ = self.info_or_go(wire.Opt.GO, name, (wire.Info.BLOCK_SIZE,))
        assert reply_type == wire.Rep.ACK, hex(reply_type)
        return self

    # --- transmission -------------------------------------------------------------------

    def request(
        self,
        cmd: int,
        handle: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        payload: bytes | None = None,
        magic: int = wire.REQUEST_MAGIC,
    ) -> None:
        """Send a request; a WRITE sends `payload` (default: none)."""
        header = struct.pack(">IHHQQI", magic, flags, cmd, handle, offset, length)
        self.pending[handle] = (cmd, length)
        self.send(header + (payload or b""))

    def reply(self) -> Reply:
        """Read one complete reply (every chunk up to DONE for a structured one)."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == wire.SIMPLE_REPLY_MAGIC:
            error, handle = struct.unpack(">IQ", self.recv_exact(12))
            cmd, length = self.pending.pop(handle)
            data = b""
            if cmd == wire.Cmd.READ and error == 0:
                data = self.recv_exact(length)
            return Reply(handle, error, data)
        assert magic == wire.STRUCTURED_REPLY_MAGIC, hex(magic)
        reply: Reply | None = None
        while True:
            if reply is not None:
                (magic,) = struct.unpack(">I", self.recv_exact(4))
                assert magic == wire.STRUCTURED_REPLY_MAGIC, hex(magic)
            flags, chunk_type, handle, length = struct.unpack(">HHQI", self.recv_exact(16))
            payload = self.recv_exact(length)
            if reply is None:
                reply = Reply(handle, 0, structured=True)
            assert reply.handle == handle
            reply.chunks.append(chunk_type)
            if chunk_type == wire.REPLY_TYPE_OFFSET_DATA:
                reply.data += payload[8:]
            elif chunk_type == wire.REPLY_TYPE_ERROR:
                reply.error, message_length = struct.unpack(">IH", payload[:6])
                reply.message = payload[6 : 6 + message_length]
            else:
                assert chunk_type == wire.REPLY_TYPE_NONE, chunk_type
            if flags & wire.REPLY_FLAG_DONE:
                self.pending.pop(handle, None)
                return reply

    def read(self, offset: int, length: int, handle: int = 1) -> bytes:
        self.request(wire.Cmd.READ, handle, offset, length)
        reply = self.reply()
        assert reply.error == 0, reply
        return reply.data

    def write(self, offset: int, data: bytes, handle: int = 2, flags: int = 0) -> None:
        self.request(wire.Cmd.WRITE, handle, offset, len(data), flags, data)
        reply = self.reply()
        assert reply.error == 0, reply

    def disconnect(self) -> None:
        self.request(wire.Cmd.DISC, 0)
        self.pending.pop(0, None)
