"""`remem mirror`: validate config, open the mirror file, bind, serve until SIGTERM."""

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
from remem_common.security import KeyFileError, Security

from remem_mirror.config import ENV_PREFIX, MirrorConfig
from remem_mirror.metrics import MirrorGauges, MirrorMetrics
from remem_mirror.server import ADMITTED_ROLES, MirrorServer
from remem_mirror.store import MirrorStore, MirrorStoreError


def main(argv: list[str] | None = None) -> int:
    """Run the mirror; returns the process exit status."""
    config = load_config(
        MirrorConfig,
        argv,
        prog="remem mirror",
        env_prefix=ENV_PREFIX,
        description="Keep a local write-behind copy of every page-out.",
    )
    log = setup_logging("mirror", config.log_level)
    try:
        security = Security.from_settings(config, "mirror")
    except KeyFileError as exc:
        sys.stderr.write(f"remem mirror: {exc}\n")
        return 2
    try:
        store = MirrorStore(
            config.path,
            config.page_count,
            config.bitmap_path,
            direct_io=config.direct_io,
            forget=config.forget,
        )
    except (MirrorStoreError, OSError) as exc:
        sys.stderr.write(f"remem mirror: {exc}\n")
        return 2
    if store.unreplicated_pages:
        log.warning(
            "reopened with pages held by the mirror only path=%s unreplicated_pages=%d",
            config.path,
            store.unreplicated_pages,
        )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    metrics = MirrorMetrics(REGISTRY)
    security.serve(context, ADMITTED_ROLES, metrics.auth)
    server = MirrorServer(
        store,
        metrics,
        context,
        queue_pages=config.queue_pages,
        drain_timeout=config.drain_timeout,
        security=security,
    )
    try:
        endpoint = server.bind(bind_address(config.listen))
    except zmq.ZMQError as exc:
        sys.stderr.write(f"remem mirror: cannot bind {config.listen}: {exc}\n")
        server.router.close(linger=0)
        server.close()
        store.close()
        security.close()
        context.term()
        return 1
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
    try:
        http_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
    except OSError as exc:
        sys.stderr.write(
            f"remem mirror: cannot serve metrics on port {config.metrics_port}: {exc}\n"
        )
        server.router.close(linger=0)
        server.close()
        store.close()
        security.close()
        context.term()
        return 1
    metrics_host = config.metrics_host
    if metrics_host in ("0.0.0.0", "::"):
        metrics_host = socket.gethostname()
    metrics_url = f"http://{metrics_host}:{http_server.server_port}/metrics"

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info(
        "ready endpoint=%s metrics=%s path=%s page_count=%d direct_io=%s unreplicated_pages=%d "
        "clean=%s curve=%s",
        endpoint,
        metrics_url,
        config.path,
        store.page_count,
        "on" if store.direct_io else "off",
        store.unreplicated_pages,
        store.clean,
        "on" if security.enabled else "off",
    )
    started = time.monotonic()
    try:
        finished = server.serve_forever()
    finally:
        http_server.shutdown()
    if not finished:
        # The writer may still hold the device: leave the file to the kernel, fail loudly.
        return 1
    server.close()
    store.close()  # fdatasync of data and bitmap
    security.close()
    context.term()
    log.info("stopped after %.1fs", time.monotonic() - started)
    return 0
