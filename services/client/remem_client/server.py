"""The NBD front end of the client service: listeners, the handover, drain and close.

`NbdServer` serves one export over any number of Unix/TCP listeners (usable in-process by
tests); the service around it (backend, metrics endpoint, ready line, signals) is
`service.py` under `remem_common.lifecycle`. Stopping is two steps: `drain` stops
accepting, lets in-flight requests finish (requests that arrive meanwhile get ESHUTDOWN) and
aborts what is left after its timeout; `close` removes the Unix sockets and closes the
backend, once, within a bound. With `--handover` under systemd, `hand_over` replaces the
drain for connections in transmission: they are passed to the next process through the
service manager (handover.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from remem_common.lifecycle import ConfigError, ServiceFailure

from remem_client import handover
from remem_client.nbd import wire
from remem_client.nbd.connection import ExportContext
from remem_client.nbd.handshake import Export
from remem_client.nbd.transmission import NbdConnection, connection_factory

if TYPE_CHECKING:
    from remem_client.backend import Backend
    from remem_client.metrics import NbdStats

log = logging.getLogger("remem.client")

# Seconds aborted connections get to finish cancelling (their Tasks end on a later turn).
ABORT_GRACE = 1.0
# Seconds the backend gets to close: the mirror's detach (2 s) and the placement link's
# tasks (2 s) fit; past it the process exits without it (a warning says so).
BACKEND_CLOSE_TIMEOUT = 10.0


def transmission_flags(backend: Backend) -> int:
    """Transmission flags from the backend's capabilities (DF is added per connection)."""
    flags = wire.FLAG_HAS_FLAGS
    if backend.can_flush:
        flags |= wire.FLAG_SEND_FLUSH
    if backend.can_fua:
        flags |= wire.FLAG_SEND_FUA
    if backend.can_trim:
        flags |= wire.FLAG_SEND_TRIM
    if backend.can_write_zeroes:
        # FAST_ZERO is advertised whenever zeroing is: a backend that cannot zero quickly
        # gets FAST_ZERO requests failed at once with ENOTSUP, which the spec allows.
        flags |= wire.FLAG_SEND_WRITE_ZEROES | wire.FLAG_SEND_FAST_ZERO
    if backend.can_multi_conn:
        flags |= wire.FLAG_CAN_MULTI_CONN
    return flags


def notify_service_manager(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd when it started us as Type=notify.

    sd_notify(3)'s protocol without libsystemd: one datagram of newline-separated VAR=VALUE
    lines to the AF_UNIX socket in $NOTIFY_SOCKET ('@' starts an abstract name). Units ordered
    after remem-client.service (the swap device) start only once it has READY=1, i.e. once
    nbd-client can connect. Best effort: a failure is logged, never fatal.

    Returns:
        True if the message was sent; False without $NOTIFY_SOCKET or on an error.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(handover.NOTIFY_TIMEOUT)
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("could not notify the service manager: %s", exc)
        return False
    return True


def nbd_unix_uri(export_name: str, path: str) -> str:
    """nbd+unix:///EXPORT?socket=PATH, percent-encoded so it has no spaces."""
    return f"nbd+unix:///{quote(export_name, safe='')}?socket={quote(path, safe='/')}"


def host_port(host: str, port: int) -> str:
    """HOST:PORT with IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _remove_stale_socket(path: Path) -> None:
    """Remove a Unix socket left by a dead server; refuse to touch anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"--nbd-socket {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise ServiceFailure(f"--nbd-socket {path} is in use by another server")


class NbdServer:
    """One NBD export served over Unix and/or TCP listeners."""

    def __init__(
        self,
        backend: Backend,
        stats: NbdStats,
        *,
        export_name: str = "remem",
        description: str = "remem replicated remote memory",
    ) -> None:
        export = Export(
            name=export_name,
            description=description,
            size=backend.size(),
            flags=transmission_flags(backend),
        )
        self.ctx = ExportContext(backend, export, stats)
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._closing: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        # uvloop's writelines passes all reply buffers to one writev without joining them.
        self.ctx.scatter_gather = type(loop).__module__.startswith("uvloop")

    async def listen_unix(self, path: Path) -> None:
        """Listen on a Unix socket at `path` (a stale socket file is replaced)."""
        _remove_stale_socket(path)
        server = await asyncio.get_running_loop().create_unix_server(
            connection_factory(self.ctx), path=str(path), backlog=128
        )
        self._servers.append(server)
        self._unix_paths.append(path)

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Listen on TCP; returns the bound (host, port) (port 0 picks one)."""
        server = await asyncio.get_running_loop().create_server(
            connection_factory(self.ctx), host=host, port=port, backlog=128, reuse_address=True
        )
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        return str(bound[0]), int(bound[1])

    async def adopt(self, sock: socket.socket, state: handover.ConnectionState) -> None:
        """Serve a connection handed over by the previous process: transmission, no handshake."""
        sock.setblocking(False)
        await asyncio.get_running_loop().connect_accepted_socket(
            partial(NbdConnection, self.ctx, (state.negotiated, state.pending)), sock
        )

    async def hand_over(self, directory: Path, timeout: float) -> int:
        """Pass every connection in transmission to the service manager; drain the others.

        Each stops reading at a request boundary, answers what it has read, and goes to the
        file-descriptor store with its state (handover.py); connections that cannot (in the
        handshake, closing, or not idle within `timeout`) drain and close as in `drain`,
        within what is left of `timeout`. `close` follows.

        Returns:
            The number of connections handed over.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for server in self._servers:
            server.close()
        handover.clear_states(directory)
        moving = [c for c in list(self.ctx.connections) if c.begin_handover()]
        tasks = {loop.create_task(c.hand_over()): c for c in moving}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        moved = 0
        for index, (task, connection) in enumerate(tasks.items()):
            if not task.done():
                log.warning("handover: a connection did not become idle in %.0fs", timeout)
                task.cancel()
                connection.abort()
                continue
            handed = task.result()
            if handed is None:
                continue
            name = f"{handover.FDNAME_PREFIX}{index}"
            state = handover.ConnectionState(
                export=self.ctx.export.name,
                size=self.ctx.export.size,
                structured=handed.negotiated.structured_replies,
                transmission_flags=handed.negotiated.transmission_flags,
                pending=handed.pending,
            )
            try:
                handover.write_state(directory, name, state)
                handover.notify_with_fds(f"FDSTORE=1\nFDNAME={name}", [handed.fd])
            except OSError as exc:
                log.error("handover: could not store connection %s: %s", name, exc)
            else:
                moved += 1
            finally:
                os.close(handed.fd)
            # The store holds the socket now: closing ours sends nothing to the peer.
            connection.abort()
        await self.drain(max(0.1, deadline - loop.time()))
        return moved

    async def drain(self, timeout: float) -> bool:
        """Stop accepting; let requests in flight finish (new ones get ESHUTDOWN) and close
        each connection once idle; abort those still open after `timeout` seconds.

        Returns within `timeout` + ABORT_GRACE seconds.

        Returns:
            True if every connection closed within `timeout` (the rest were aborted).
        """
        ctx = self.ctx
        ctx.shutting_down = True
        for server in self._servers:
            server.close()
        connections = list(ctx.connections)
        for connection in connections:
            connection.begin_shutdown()
        if not connections:
            return True
        _done, pending = await asyncio.wait(
            [connection.closed for connection in connections], timeout=timeout
        )
        if not pending:
            return True
        for connection in list(ctx.connections):
            connection.abort()
        _done, pending = await asyncio.wait(
            [connection.closed for connection in connections], timeout=ABORT_GRACE
        )
        if pending:
            log.warning("%d aborted connection(s) still closing; going on", len(pending))
        return False

    async def close(self, timeout: float = BACKEND_CLOSE_TIMEOUT) -> None:
        """Stop accepting, remove the Unix sockets, close the backend: once, however often
        it is called (a later call waits for the first), and within `timeout` seconds.

        A backend that does not close in time is logged and left behind (the process is
        exiting): a stop must not hang on a peer or a task that does not end.
        """
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self._close(timeout))
        await asyncio.shield(self._closing)

    async def _close(self, timeout: float) -> None:
        self.ctx.shutting_down = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            path.unlink(missing_ok=True)
        closing = asyncio.get_running_loop().create_task(self.ctx.backend.close())
        _done, pending = await asyncio.wait([closing], timeout=timeout)
        if pending:
            log.warning("the backend did not close within %.1fs; exiting without it", timeout)
            closing.cancel()
            return
        with contextlib.suppress(asyncio.CancelledError):
            closing.result()  # a failure to close is the caller's (the lifecycle logs it)

    async def shutdown(self, drain_timeout: float) -> bool:
        """`drain`, then `close`.

        Returns:
            True if every connection closed within `drain_timeout` seconds (the rest are
            aborted).
        """
        drained = await self.drain(drain_timeout)
        await self.close()
        return drained


async def adopt_connections(server: NbdServer) -> int:
    """Resume the connections the service manager passed us (LISTEN_FDS named nbd-*).

    Each must have a state file matching this export; any other descriptor, or one without
    usable state, is closed (its peer reconnects as after a crash). Every name is then
    removed from the store and the state files deleted: the store holds only connections
    in transit.

    Returns:
        The number of connections resumed.
    """
    passed = handover.listen_fds(os.environ)
    if not passed:
        return 0
    try:
        directory: Path | None = handover.state_directory(os.environ)
    except handover.HandoverUnavailable:
        directory = None
    adopted = 0
    for fd, name in passed:
        sock = None
        try:
            if not name.startswith(handover.FDNAME_PREFIX):
                raise ValueError("not an NBD connection")
            if directory is None:
                raise ValueError("no $RUNTIME_DIRECTORY for its state")
            state = handover.read_state(directory, name)
            mismatch = state.mismatch(server.ctx)
            if mismatch is not None:
                raise ValueError(mismatch)
            sock = socket.socket(fileno=fd)
            if sock.type != socket.SOCK_STREAM:
                raise ValueError("not a stream socket")
            await server.adopt(sock, state)
            adopted += 1
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("passed descriptor %s (fd %d) closed: %s", name, fd, exc)
            if sock is not None:
                sock.close()
            else:
                with contextlib.suppress(OSError):
                    os.close(fd)
        handover.forget_stored(name, log)
    if directory is not None:
        handover.clear_states(directory)
    return adopted
