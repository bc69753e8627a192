"""The client service assembled from its config: backend, metrics endpoint, NBD listeners,
the connections a previous process handed over (`start` for
`remem_common.lifecycle.run_service_async`), and how it serves and stops (`ClientService`).

Stopping: on the first SIGTERM/SIGINT the service tells the service manager STOPPING=1,
then hands its connections over (`--handover` under systemd: handover.py) or drains them
(`--drain-timeout`); the lifecycle then closes the NBD server (the backend, bounded) and the
metrics endpoint. A second signal ends the process at once with status 130.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING
from urllib.parse import quote

from prometheus_client import REGISTRY
from remem_common.lifecycle import (
    AsyncServable,
    ConfigError,
    Lifecycle,
    ServiceFailure,
    Started,
    ready_line,
)

from remem_client import handover
from remem_client.memory_backend import MemoryBackend
from remem_client.metrics import build_metrics
from remem_client.server import (
    NbdServer,
    adopt_connections,
    host_port,
    nbd_unix_uri,
    notify_service_manager,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from remem_client.backend import Backend
    from remem_client.config import ClientConfig

log = logging.getLogger("remem.client")

EXIT_FORCED = 130  # a second SIGTERM/SIGINT cut the stop short (128 + SIGINT, as shells do)
# Seconds the tasks still running after the lifecycle ended get to finish cancelling.
LEFTOVER_TIMEOUT = 2.0


async def make_backend(config: ClientConfig, registry: CollectorRegistry) -> Backend:
    """Build the backend `config.backend` names.

    Raises:
        ConfigError: a key, or a mirror, that does not fit this device (exit status 2).
        ServiceFailure: the memory cannot be had, or the mirror does not answer (1).
    """
    if config.backend == "memory":
        try:
            return MemoryBackend(int(config.size))
        except OSError as exc:
            raise ServiceFailure(f"cannot allocate {int(config.size)} bytes: {exc}") from exc
    if config.backend == "remote":
        from remem_client.remote.assembly import open_remote

        return await open_remote(config, registry)
    raise ConfigError(f"unknown backend {config.backend!r}")


class ClientService:
    """The NBD export while it serves: READY=1, then on request_stop a handover or a drain."""

    def __init__(self, config: ClientConfig, server: NbdServer, ready: dict[str, object]) -> None:
        self.config = config
        self.server = server
        self.ready = ready
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        """Serve until asked to stop; return once the connections are handed over or drained."""
        if not self._stop.is_set():
            # Serving starts here: units ordered after this one (the swap device) may start.
            status = ready_line(self.ready).removeprefix("ready ")
            notify_service_manager(f"READY=1\nSTATUS=serving {status}")
        await self._stop.wait()
        notify_service_manager("STOPPING=1")
        config = self.config
        directory = None
        if config.handover:
            try:
                directory = handover.check_available(os.environ)
            except handover.HandoverUnavailable as exc:
                log.warning("no handover, the connections will close: %s", exc)
        if directory is not None:
            log.info(
                "handing over: answering requests read so far (up to %.0fs)", config.drain_timeout
            )
            moved = await self.server.hand_over(directory, config.drain_timeout)
            log.info("handed over %d connection(s) to the service manager", moved)
        else:
            log.info(
                "shutting down: draining in-flight requests (up to %.0fs)", config.drain_timeout
            )
            if not await self.server.drain(config.drain_timeout):
                log.warning("drain timed out; remaining connections aborted")


async def start(
    config: ClientConfig, lifecycle: Lifecycle, registry: CollectorRegistry = REGISTRY
) -> Started[AsyncServable]:
    """Bind the metrics endpoint, build the backend, listen, resume handed-over connections:
    the client, ready to serve."""
    metrics = lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host, registry)
    backend = await make_backend(config, registry)
    server = NbdServer(
        backend,
        build_metrics(registry),
        export_name=config.export_name,
        description=f"remem ({config.backend} backend)",
    )
    # From here the server owns the backend: its close (bounded) closes both.
    lifecycle.async_callback(server.close)
    ready: dict[str, object] = {}
    if config.nbd_socket is not None:
        with lifecycle.as_failure(f"cannot listen on {config.nbd_socket}", OSError):
            await server.listen_unix(config.nbd_socket)
        ready["nbd_uri"] = nbd_unix_uri(config.export_name, str(config.nbd_socket))
    address = config.nbd_listen_address
    if address is not None:
        with lifecycle.as_failure(f"cannot listen on {config.nbd_listen}", OSError):
            host, port = await server.listen_tcp(*address)
        if config.nbd_socket is None:
            ready["nbd_uri"] = f"nbd://{host_port(host, port)}/{quote(config.export_name)}"
        ready["nbd_tcp"] = host_port(host, port)
    adopted = await adopt_connections(server)
    if adopted:
        ready["resumed"] = adopted
    ready["metrics"] = metrics
    log.info(
        "serving export %r size=%d backend=%s", config.export_name, int(config.size), config.backend
    )
    return Started(ClientService(config, server, ready), ready)


async def cancel_leftover_tasks(timeout: float = LEFTOVER_TIMEOUT) -> bool:
    """Cancel the tasks still running once the service ended; returns whether they all
    ended within `timeout` seconds (the rest are logged).

    asyncio.Runner does the same on closing, but waits for them without a bound: a task
    that outlives its cancellation would keep the process from ever exiting.
    """
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    if not tasks:
        return True
    _done, pending = await asyncio.wait(tasks, timeout=timeout)
    for task in pending:
        log.warning("%s still running %.1fs after it was cancelled", task.get_coro(), timeout)
    return not pending
