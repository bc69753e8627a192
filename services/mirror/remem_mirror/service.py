"""The mirror assembled from its config: open the file, bind, serve (`start` for
`remem_common.lifecycle.run_service`).
"""

from __future__ import annotations

import logging

import zmq
from prometheus_client import REGISTRY
from remem_common.config import bind_address
from remem_common.heap import keep_freed_memory
from remem_common.lifecycle import Lifecycle, Servable, Started
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.security import Role, Security

from remem_mirror.config import MirrorConfig
from remem_mirror.metrics import MirrorGauges, MirrorMetrics
from remem_mirror.server import MirrorServer
from remem_mirror.store import MirrorStore, MirrorStoreError

log = logging.getLogger("mirror")


# The roles whose keys the mirror admits (with Curve): the client it mirrors.
ADMITTED_ROLES: tuple[Role, ...] = ("client",)


# What one read of a connection may add beyond the queue's bound (a 4 MiB batch, twice).
READ_SLACK_BYTES = 8 << 20


def start(config: MirrorConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Open the mirror file, bind: the mirror, ready to serve."""
    # Every page-out batch lands in a fresh receive buffer the writer holds until it is on
    # disk: reused from the heap, bounded by the queue's own bound (remem_common.heap).
    keep_freed_memory(config.queue_pages * PAGE_SIZE + READ_SLACK_BYTES)
    security = Security.from_settings(config, "mirror")
    with lifecycle.as_config_error(MirrorStoreError, OSError):
        store = MirrorStore(
            config.path,
            config.page_count,
            config.bitmap_path,
            direct_io=config.direct_io,
            forget=config.forget,
        )
    server: MirrorServer | None = None

    def close_store() -> None:
        if server is not None and server.writer_running:
            # The writer missed the drain timeout and may still hold the device: leave the
            # file to the kernel (the exit status says the stop failed).
            log.error("left %s to the kernel: the writer still holds it", config.path)
            return
        store.close()  # fdatasync of data and bitmap

    lifecycle.callback(close_store)
    if store.unreplicated_pages:
        log.warning(
            "reopened with pages held by the mirror only path=%s unreplicated_pages=%d",
            config.path,
            store.unreplicated_pages,
        )
    context = lifecycle.zmq_context()
    metrics = MirrorMetrics(REGISTRY)
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    server = MirrorServer(
        store,
        metrics,
        context,
        queue_pages=config.queue_pages,
        drain_timeout=config.drain_timeout,
        security=security,
    )
    lifecycle.callback(server.close)
    with lifecycle.as_failure(f"cannot bind {config.listen}", zmq.ZMQError, OSError):
        endpoint = server.bind(bind_address(config.listen))
    metrics.watch(
        MirrorGauges(
            pending_pages=lambda: server.queue.pending_pages,
            write_lag_seconds=server.queue.lag,
            unreplicated_pages=lambda: store.unreplicated_pages,
            page_count=lambda: store.page_count,
            direct_io=lambda: store.direct_io,
            clean=lambda: store.clean,
        )
    )
    return Started(
        server,
        {
            "endpoint": endpoint,
            "metrics": lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host),
            "path": config.path,
            "page_count": store.page_count,
            "direct_io": store.direct_io,
            "unreplicated_pages": store.unreplicated_pages,
            "clean": store.clean,
            "curve": security.enabled,
        },
    )
