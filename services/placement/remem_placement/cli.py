"""`remem placement`: validate config, bind, serve the control plane until SIGTERM."""

from __future__ import annotations

import signal
import sys
import time
from types import FrameType

import zmq
from prometheus_client import REGISTRY, start_http_server
from remem_common.config import load_config
from remem_common.logs import setup_logging
from remem_common.security import KeyFileError, Security

from remem_placement.config import ENV_PREFIX, PlacementConfig
from remem_placement.metrics import PlacementMetrics, StateGauges
from remem_placement.policy import Cluster
from remem_placement.server import ADMITTED_ROLES, PlacementServer
from remem_placement.utilization import UtilizationPoller


def main(argv: list[str] | None = None) -> int:
    """Run placement; returns the process exit status."""
    config = load_config(
        PlacementConfig,
        argv,
        prog="remem placement",
        env_prefix=ENV_PREFIX,
        description="Control plane: page server registry, slab placement and repair.",
    )
    log = setup_logging("placement", config.log_level)
    try:
        security = Security.from_settings(config, "placement")
    except KeyFileError as exc:
        sys.stderr.write(f"remem placement: {exc}\n")
        return 2
    # Epochs only need to grow, also across restarts of placement: start from the clock in
    # microseconds, far above anything a previous run could have counted up to.
    cluster = Cluster(config.policy(), started=time.monotonic(), epoch_start=time.time_ns() // 1000)
    metrics = PlacementMetrics(REGISTRY)
    metrics.watch(
        StateGauges(
            servers=lambda: _count_states(cluster),
            slabs=cluster.slab_states,
            epoch=lambda: cluster.epoch,
        )
    )
    utilization = UtilizationPoller(
        config.utilization_source,
        interval=config.scrape_interval,
        timeout=config.scrape_timeout,
        prometheus_url=config.prometheus_url,
    )
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    security.serve(context, ADMITTED_ROLES, metrics.auth)
    server = PlacementServer(config, cluster, metrics, context, utilization, security)
    try:
        endpoint = server.bind(config.listen)
        publish = server.bind_publish(config.publish) if config.publish else None
    except zmq.ZMQError as exc:
        sys.stderr.write(f"remem placement: cannot bind: {exc}\n")
        server.close()
        security.close()
        context.term()
        return 1
    try:
        http_server, _ = start_http_server(config.metrics_port, addr=config.metrics_host)
    except OSError as exc:
        sys.stderr.write(
            f"remem placement: cannot serve metrics on port {config.metrics_port}: {exc}\n"
        )
        server.close()
        security.close()
        context.term()
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        server.request_stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    extra = f" publish={publish}" if publish else ""
    log.info(
        "ready endpoint=%s metrics=http://%s:%d/metrics%s source=%s grace=%.1fs curve=%s",
        endpoint,
        config.metrics_host,
        http_server.server_port,
        extra,
        config.utilization_source,
        config.restart_grace,
        "on" if security.enabled else "off",
    )
    started = time.monotonic()
    try:
        server.serve_forever()
    finally:
        http_server.shutdown()
        security.close()
        context.term()
    log.info("stopped after %.1fs", time.monotonic() - started)
    return 0


def _count_states(cluster: Cluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in cluster.servers.values():
        counts[server.state] = counts.get(server.state, 0) + 1
    return counts
