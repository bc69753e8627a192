"""The page server assembled from its config: open the arena, bind, register with placement
(`start` for `remem_common.lifecycle.run_service`).
"""

from __future__ import annotations

import logging
import socket

import zmq
from prometheus_client import REGISTRY
from remem_common.config import bind_address
from remem_common.lifecycle import Lifecycle, Servable, Started
from remem_common.protocol.pages import (
    PAGE_SIZE,
)
from remem_common.security import (
    Role,
    Security,
    load_public_key,
)

from remem_pageserver.config import PageServerConfig, advertised_endpoint
from remem_pageserver.metrics import PageServerMetrics, StoreGauges
from remem_pageserver.server import PageServer
from remem_pageserver.store import ArenaError, PageStore

log = logging.getLogger("pageserver")


# The roles whose keys the page server admits at all.
ADMITTED_ROLES: tuple[Role, ...] = ("client", "placement", "pageserver")


def start(config: PageServerConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Open the arena, bind, register with placement: the page server, ready to serve."""
    security = Security.from_settings(config, "pageserver")
    placement_key = (
        load_public_key(config.placement_public_key) if config.placement_public_key else None
    )
    with lifecycle.as_config_error(ArenaError, OSError):
        store = PageStore(config.shm_path, config.capacity_pages, forget=config.forget)
    lifecycle.callback(store.close)
    if store.used_pages:
        log.info(
            "arena reopened path=%s pages=%d slabs=%d committed_bytes=%d",
            config.shm_path,
            store.used_pages,
            store.slab_count,
            store.committed_bytes,
        )
    context = lifecycle.zmq_context()
    metrics = PageServerMetrics(REGISTRY)
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    listen = bind_address(config.listen)
    port_hint = listen.rsplit(":", 1)[-1]
    server_id = config.server_id or f"{socket.gethostname()}-{port_hint}"
    server = PageServer(config, store, metrics, context, server_id=server_id, security=security)
    lifecycle.callback(server.close)
    with lifecycle.as_failure(f"cannot bind {config.listen}", zmq.ZMQError, OSError):
        bound = server.bind(listen)
    if config.server_id is None and port_hint == "*":
        server.server_id = f"{socket.gethostname()}-{bound.rsplit(':', 1)[-1]}"
    metrics.watch_store(
        StoreGauges(
            capacity_bytes=lambda: store.capacity_pages * PAGE_SIZE,
            used_bytes=lambda: store.used_pages * PAGE_SIZE,
            committed_bytes=lambda: store.committed_bytes,
            pages=lambda: store.used_pages,
            slabs=lambda: store.slab_count,
            under_pressure=lambda: server.under_pressure,
        )
    )
    metrics_url = lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host)
    endpoint = advertised_endpoint(bound, config.advertise)
    if config.placement:
        server.connect_placement(
            config.placement,
            data_endpoint=endpoint,
            metrics_url=metrics_url,
            placement_key=placement_key,
        )
    return Started(
        server,
        {
            "endpoint": endpoint,
            "metrics": metrics_url,
            "server_id": server.server_id,
            "zone": config.zone,
            "capacity_pages": store.capacity_pages,
            "pages": store.used_pages,
            "curve": security.enabled,
        },
    )
