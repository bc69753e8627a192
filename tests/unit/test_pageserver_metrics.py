"""The page server's tallied metrics scrape exactly as prometheus_client's own calls would."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, generate_latest
from remem_pageserver.metrics import LATENCY_BUCKETS, OPS, PageServerMetrics

# (op, failed, seconds): every bucket, its bounds exactly, and past the last one.
REQUESTS = [
    (op, index % 3 == 0, seconds)
    for index, op in enumerate(OPS * 5)
    for seconds in (0.0, *LATENCY_BUCKETS, LATENCY_BUCKETS[index % 14] * 1.5, 50.0)
]


def exposition(registry: CollectorRegistry) -> str:
    """The scrape without the creation timestamps, which differ between registries."""
    return re.sub(r"(?m)^\S+_created[{ ].*\n", "", generate_latest(registry).decode())


def test_record_then_scrape_equals_the_library_counting_each_request() -> None:
    tallied, direct = CollectorRegistry(), CollectorRegistry()
    by_tally, by_library = PageServerMetrics(tallied), PageServerMetrics(direct)
    for op, failed, seconds in REQUESTS:
        by_tally.record(op, failed, seconds)
        (by_library.error if failed else by_library.ok)[op].inc()
        by_library.latency[op].observe(seconds)
    by_tally.pages_tally[0] += 7
    by_tally.pages_tally[1] += 5
    by_library.pages_in.inc(7)
    by_library.pages_out.inc(5)
    assert exposition(tallied) == exposition(direct)
    # Later requests are added once, however many scrapes come in between.
    by_tally.record("get", False, 0.0003)
    by_library.ok["get"].inc()
    by_library.latency["get"].observe(0.0003)
    assert exposition(tallied) == exposition(tallied) == exposition(direct)
    assert "pageserver_requests_total" in exposition(direct)


def test_the_metrics_keep_their_order_and_filtered_scrapes_are_current() -> None:
    registry = CollectorRegistry()
    metrics = PageServerMetrics(registry)
    names = [metric.name for metric in registry.collect()]
    assert names.index("pageserver_requests") < names.index("pageserver_malformed_messages")
    assert names.index("pageserver_malformed_messages") < names.index(
        "pageserver_request_duration_seconds"
    )
    assert names.index("pageserver_pages") < names.index("pageserver_push_sent_bytes")
    metrics.record("put", False, 0.001)
    only = registry.restricted_registry(["pageserver_requests_total"])
    value = next(
        sample.value
        for metric in only.collect()
        for sample in metric.samples
        if sample.name == "pageserver_requests_total" and sample.labels["op"] == "put"
    )
    assert value == 1
