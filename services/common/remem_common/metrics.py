"""The metrics every remem service (page server, placement, mirror) exports the same way.

Each service's `metrics.py` builds on `ServiceMetrics`, on a registry the caller chooses
(production: the default registry; tests: a fresh one):

    <service>_requests_total{op,result}          op in the service's OPS, result ok/error
    <service>_malformed_messages_total{reason}   reason in `envelope.MALFORMED_REASONS`
    <service>_auth_refused_total{reason}, <service>_forbidden_requests_total
                                                 `security.AuthMetrics`

Label children are created up front, so every series exists from the first scrape.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter

from remem_common.protocol.envelope import MALFORMED_REASONS, ProtocolError
from remem_common.security import AuthMetrics

# For work of tens to hundreds of microseconds (a page server's request, an O_DIRECT write
# of a few pages): the library's default buckets start at 5 ms.
SUB_MS_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0, 10.0,
)  # fmt: skip


class ServiceMetrics:
    """Requests by operation and result, malformed messages by reason, and authentication,
    of the service named `service` (the metrics' prefix) whose operations are `ops`."""

    def __init__(self, registry: CollectorRegistry, service: str, ops: Sequence[str]) -> None:
        self.auth = AuthMetrics(registry, service)
        self.requests = Counter(
            f"{service}_requests_total",
            "Requests handled, by operation and result",
            ["op", "result"],
            registry=registry,
        )
        self.malformed = Counter(
            f"{service}_malformed_messages_total",
            "Messages rejected as malformed, by reason",
            ["reason"],
            registry=registry,
        )
        self.ok = {op: self.requests.labels(op, "ok") for op in ops}
        self.error = {op: self.requests.labels(op, "error") for op in ops}
        self.malformed_by = {reason: self.malformed.labels(reason) for reason in MALFORMED_REASONS}
        self._registry = registry

    def count_malformed(self, exc: ProtocolError) -> None:
        """Count a message refused as malformed on any of the service's sockets."""
        if exc.reason in MALFORMED_REASONS:
            self.malformed_by[exc.reason].inc()
