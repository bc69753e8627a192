"""`remem pageserver`: validate config, open the arena, bind, serve until SIGTERM."""

from __future__ import annotations

import signal
import socket
import sys
import time
from types import FrameType

import zmq
from prometheus_client import REGISTRY, start_http_server
from remem_common.config import bind_address, load_config
from remem_common.logs import setup_logging
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.protocol.pageserver_placement import HeartbeatRequest, RegisterServerRequest
from remem_common.security import KeyFileError, Security, load_public_key

from remem_pageserver.config import (
    ENV_PREFIX,
    PageServerConfig,
    advertised_endpoint,
)
from remem_pageserver.metrics import PageServerMetrics, StoreGauges
from remem_pageserver.server import ADMITTED_ROLES, PageServer
from remem_pageserver.store import ArenaError, PageStore


def host_available_bytes() -> int:
    """MemAvailable of this host, from /proc/meminfo."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run a page server; returns the process exit status."""
    config = load_config(
        PageServerConfig,
        argv,
        prog="remem pageserver",
        env_prefix=ENV_PREFIX,
        description="Store clients' pages in this host's RAM.",
    )
    log = setup_logging("pageserver", config.log_level)
    try:
        security = Security.from_settings(config, "pageserver")
        placement_key = (
            load_public_key(config.placement_public_key) if config.placement_public_key else None
        )
    except KeyFileError as exc:
        sys.stderr.write(f"remem pageserver: {exc}\n")
        return 2
    try:
        store = PageStore(config.shm_path, config.capacity_pages, forget=config.forget)
    except (ArenaError, OSError) as exc:
        sys.stderr.write(f"remem pageserver: {exc}\n")
        return 2
    if store.used_pages:
        log.info(
            "arena reopened path=%s pages=%d slabs=%d committed_bytes=%d",
            config.shm_path,
            store.used_pages,
            store.slab_count,
            store.committed_bytes,
        )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    metrics = PageServerMetrics(REGISTRY)
    security.serve(context, ADMITTED_ROLES, metrics.auth)
    try:
        bound_listen = bind_address(config.listen)
        server_port_hint = bound_listen.rsplit(":", 1)[-1]
        server_id = config.server_id or f"{socket.gethostname()}-{server_port_hint}"
        server = PageServer(config, store, metrics, context, server_id=server_id, security=security)
        bound = server.bind(bound_listen)
    except zmq.ZMQError as exc:
        sys.stderr.write(f"remem pageserver: cannot bind {config.listen}: {exc}\n")
        security.close()
        store.close()
        return 1
    if config.server_id is None and server_port_hint == "*":
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
    try:
        http_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
    except OSError as exc:
        sys.stderr.write(
            f"remem pageserver: cannot serve metrics on port {config.metrics_port}: {exc}\n"
        )
        security.close()
        store.close()
        return 1
    metrics_host = config.metrics_host
    if metrics_host in ("0.0.0.0", "::"):
        metrics_host = socket.gethostname()
    metrics_url = f"http://{metrics_host}:{http_server.server_port}/metrics"
    endpoint = advertised_endpoint(bound, config.advertise)

    def under_pressure() -> bool:
        reserve = int(config.host_reserve)
        server.under_pressure = reserve > 0 and host_available_bytes() < reserve
        return server.under_pressure

    if config.placement:
        server.connect_placement(
            config.placement,
            lambda msg_id: RegisterServerRequest(
                msg_id=msg_id,
                server_id=server.server_id,
                data_endpoint=endpoint,
                metrics_url=metrics_url,
                capacity_bytes=store.capacity_pages * PAGE_SIZE,
                used_bytes=store.used_pages * PAGE_SIZE,
                zone=config.zone,
                started_at=server.started_at,
                public_key=security.public_key,
            ),
            lambda msg_id: HeartbeatRequest(
                msg_id=msg_id,
                server_id=server.server_id,
                used_bytes=store.used_pages * PAGE_SIZE,
                capacity_bytes=store.capacity_pages * PAGE_SIZE,
                under_pressure=under_pressure(),
            ),
            placement_key,
        )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "ready endpoint=%s metrics=%s server_id=%s zone=%s capacity_pages=%d pages=%d curve=%s",
        endpoint,
        metrics_url,
        server.server_id,
        config.zone,
        store.capacity_pages,
        store.used_pages,
        "on" if security.enabled else "off",
    )
    started = time.monotonic()
    try:
        server.serve_forever()
    finally:
        http_server.shutdown()
        store.close()
        security.close()
        context.term()
    log.info("stopped after %.1fs", time.monotonic() - started)
    return 0
