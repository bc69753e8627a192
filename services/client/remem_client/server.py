"""The client service: NBD listeners, metrics endpoint, lifecycle and graceful shutdown.

`NbdServer` serves one export over any number of Unix/TCP listeners (usable in-process by
tests); `run` is the service: build the backend, bind everything, log the ready line,
serve until SIGTERM/SIGINT, then stop accepting, let in-flight requests finish (requests
that arrive meanwhile get ESHUTDOWN), close connections and the backend, exit 0. With
`--handover` under systemd the connections are not closed but passed to the next process
through the service manager (handover.py); a second signal during either exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from prometheus_client import REGISTRY, start_http_server

from remem_client import handover
from remem_client.errors import StartupError
from remem_client.memory_backend import MemoryBackend
from remem_client.metrics import build_metrics
from remem_client.nbd import wire
from remem_client.nbd.connection import ExportContext
from remem_client.nbd.handshake import Export
from remem_client.nbd.transmission import NbdConnection, connection_factory

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from remem_client.backend import Backend
    from remem_client.config import ClientConfig
    from remem_client.metrics import NbdStats

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_FORCED = 130  # a second SIGTERM/SIGINT cut the shutdown short


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


async def make_backend(config: ClientConfig, registry: CollectorRegistry) -> Backend:
    """Build the backend `config.backend` names."""
    if config.backend == "memory":
        try:
            return MemoryBackend(int(config.size))
        except OSError as exc:
            raise StartupError(f"cannot allocate {int(config.size)} bytes: {exc}") from exc
    if config.backend == "remote":
        from remem_client.remote.assembly import open_remote

        return await open_remote(config, registry)
    raise StartupError(f"unknown backend {config.backend!r}")


def notify_service_manager(state: str, log: logging.Logger | None = None) -> bool:
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
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        if log is not None:
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
        raise StartupError(f"--nbd-socket {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise StartupError(f"--nbd-socket {path} is in use by another server")


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

    async def hand_over(self, directory: Path, timeout: float, log: logging.Logger) -> int:
        """Pass every connection in transmission to the service manager, then shut down.

        Each stops reading at a request boundary, answers what it has read, and goes to the
        file-descriptor store with its state (handover.py); connections that cannot (in the
        handshake, closing, or not idle within `timeout`) drain and close as in `shutdown`.

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
        await self.shutdown(max(0.1, deadline - loop.time()))
        return moved

    async def shutdown(self, drain_timeout: float) -> bool:
        """Stop accepting, drain in-flight requests, close everything.

        Returns:
            True if every connection closed within `drain_timeout` seconds (the rest are
            aborted).
        """
        ctx = self.ctx
        ctx.shutting_down = True
        for server in self._servers:
            server.close()
        connections = list(ctx.connections)
        for connection in connections:
            connection.begin_shutdown()
        drained = True
        if connections:
            _done, pending = await asyncio.wait(
                [connection.closed for connection in connections], timeout=drain_timeout
            )
            if pending:
                drained = False
                for connection in list(ctx.connections):
                    connection.abort()
                await asyncio.wait([connection.closed for connection in connections], timeout=1.0)
        for path in self._unix_paths:
            path.unlink(missing_ok=True)
        await ctx.backend.close()
        return drained


async def adopt_connections(server: NbdServer, log: logging.Logger) -> int:
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


async def run(
    config: ClientConfig, log: logging.Logger, registry: CollectorRegistry = REGISTRY
) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def force_exit() -> None:
        # The operator (or systemd's stop timeout) is done waiting: go now, as a SIGKILL
        # would, but with a line in the log and a status that says so.
        log.warning("second signal: exiting without finishing the shutdown")
        logging.shutdown()
        os._exit(EXIT_FORCED)

    def first_signal() -> None:
        stop.set()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, force_exit)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, first_signal)
    try:
        backend = await make_backend(config, registry)
    except StartupError as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    stats = build_metrics(registry)
    server = NbdServer(
        backend,
        stats,
        export_name=config.export_name,
        description=f"remem ({config.backend} backend)",
    )
    metrics_http = None
    fields: list[str] = []
    try:
        try:
            metrics_http, _thread = start_http_server(
                config.metrics_port, addr=config.metrics_host, registry=registry
            )
        except OSError as exc:
            host = host_port(config.metrics_host, config.metrics_port)
            raise StartupError(f"cannot bind metrics endpoint {host}: {exc}") from exc
        if config.nbd_socket is not None:
            try:
                await server.listen_unix(config.nbd_socket)
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.nbd_socket}: {exc}") from exc
            fields.append("nbd_uri=" + nbd_unix_uri(config.export_name, str(config.nbd_socket)))
        address = config.nbd_listen_address
        if address is not None:
            try:
                host, port = await server.listen_tcp(*address)
            except OSError as exc:
                raise StartupError(f"cannot listen on {config.nbd_listen}: {exc}") from exc
            if config.nbd_socket is None:
                fields.append(f"nbd_uri=nbd://{host_port(host, port)}/{quote(config.export_name)}")
            fields.append(f"nbd_tcp={host_port(host, port)}")
    except StartupError as exc:
        log.error("%s", exc)
        await server.shutdown(0.1)
        if metrics_http is not None:
            metrics_http.shutdown()
        return EXIT_FAILURE

    adopted = await adopt_connections(server, log)
    if adopted:
        fields.append(f"resumed={adopted}")
    metrics_host, metrics_port = metrics_http.server_address[:2]
    fields.append(f"metrics=http://{host_port(str(metrics_host), int(metrics_port))}")
    log.info(
        "serving export %r size=%d backend=%s", config.export_name, int(config.size), config.backend
    )
    log.info("ready %s", " ".join(fields))
    notify_service_manager(f"READY=1\nSTATUS=serving {' '.join(fields)}", log)
    await stop.wait()
    notify_service_manager("STOPPING=1", log)
    directory = None
    if config.handover:
        try:
            directory = handover.check_available(os.environ)
        except handover.HandoverUnavailable as exc:
            log.warning("no handover, the connections will close: %s", exc)
    if directory is not None:
        log.info("handing over: answering requests read so far (up to %.0fs)", config.drain_timeout)
        moved = await server.hand_over(directory, config.drain_timeout, log)
        log.info("handed over %d connection(s) to the service manager", moved)
    else:
        log.info("shutting down: draining in-flight requests (up to %.0fs)", config.drain_timeout)
        drained = await server.shutdown(config.drain_timeout)
        if not drained:
            log.warning("drain timed out; remaining connections aborted")
    with contextlib.suppress(Exception):
        metrics_http.shutdown()
        metrics_http.server_close()
    log.info("stopped")
    return EXIT_OK
