"""Placement assembled from its config: the cluster state, the utilization poller, bound sockets
(`start` for `remem_common.lifecycle.run_service`).
"""

from __future__ import annotations

import time

import zmq
from prometheus_client import REGISTRY
from remem_common.lifecycle import Lifecycle, Servable, Started
from remem_common.security import (
    Role,
    Security,
)

from remem_placement.config import PlacementConfig
from remem_placement.metrics import PlacementMetrics, StateGauges
from remem_placement.policy import (
    Cluster,
)
from remem_placement.server import PlacementServer
from remem_placement.utilization import UtilizationPoller

ADMITTED_ROLES: tuple[Role, ...] = ("pageserver", "client", "admin")


def start(config: PlacementConfig, lifecycle: Lifecycle) -> Started[Servable]:
    """Build the cluster state, bind: placement, ready to serve."""
    security = Security.from_settings(config, "placement")
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
    context = lifecycle.zmq_context()
    lifecycle.serve_security(security, context, ADMITTED_ROLES, metrics.auth)
    utilization = UtilizationPoller(
        config.utilization_source,
        interval=config.scrape_interval,
        timeout=config.scrape_timeout,
        prometheus_url=config.prometheus_url,
    )
    server = PlacementServer(config, cluster, metrics, context, utilization, security)
    lifecycle.callback(server.close)
    with lifecycle.as_failure("cannot bind", zmq.ZMQError):
        endpoint = server.bind(config.listen)
        publish = server.bind_publish(config.publish) if config.publish else None
    ready: dict[str, object] = {
        "endpoint": endpoint,
        "metrics": lifecycle.metrics_endpoint(config.metrics_port, config.metrics_host),
    }
    if publish:
        ready["publish"] = publish
    ready |= {
        "source": config.utilization_source,
        "grace": f"{config.restart_grace:.1f}s",
        "curve": security.enabled,
    }
    return Started(server, ready)


def _count_states(cluster: Cluster) -> dict[str, int]:
    counts: dict[str, int] = {}
    for server in cluster.servers.values():
        counts[server.state] = counts.get(server.state, 0) + 1
    return counts
