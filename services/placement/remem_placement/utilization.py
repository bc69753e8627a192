"""Where page servers' used and capacity bytes come from: their /metrics, or Prometheus.

Both sources are blocking HTTP, so they run in a small thread pool and hand `Sample`s back
to the loop thread, which alone touches placement's state (see `server.py`). Each sample
carries the wall-clock time it describes: the policy counts allocations made after it.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

USED = "pageserver_used_bytes"
CAPACITY = "pageserver_capacity_bytes"


@dataclass(frozen=True)
class Target:
    server_id: str
    metrics_url: str


@dataclass(frozen=True)
class Sample:
    server_id: str
    used_bytes: int
    capacity_bytes: int
    at: float  # wall clock


def parse_metrics(text: str) -> tuple[int, int] | None:
    """(used, capacity) bytes from a page server's exposition text, None if absent."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in (USED, CAPACITY):
            for sample in family.samples:
                values[sample.name] = sample.value
    if USED not in values or CAPACITY not in values:
        return None
    return int(values[USED]), int(values[CAPACITY])


def scrape(target: Target, timeout: float) -> Sample | None:
    """Fetch and parse one page server's /metrics; None on any failure (logged by caller)."""
    at = time.time()
    with urllib.request.urlopen(target.metrics_url, timeout=timeout) as response:
        text = response.read(4 << 20).decode()
    parsed = parse_metrics(text)
    if parsed is None:
        return None
    return Sample(target.server_id, parsed[0], parsed[1], at)


def instance_of(metrics_url: str) -> str:
    """Prometheus's default `instance` label of a scrape URL: host:port."""
    return urllib.parse.urlsplit(metrics_url).netloc


def query_prometheus(base_url: str, targets: list[Target], timeout: float) -> list[Sample]:
    """One instant query for both metrics; series matched to servers by `instance` label
    (or a `server_id` label, if the scrape config adds one)."""
    query = urllib.parse.urlencode({"query": f'{{__name__=~"{USED}|{CAPACITY}"}}'})
    url = base_url.rstrip("/") + "/api/v1/query?" + query
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = json.loads(response.read(16 << 20))
    if body.get("status") != "success":
        raise ValueError(f"prometheus query failed: {body.get('error', body)!r}")
    by_instance = {instance_of(t.metrics_url): t.server_id for t in targets}
    by_id = {t.server_id for t in targets}
    found: dict[str, dict[str, tuple[float, float]]] = {}
    for series in body["data"]["result"]:
        labels = series["metric"]
        server_id = labels.get("server_id")
        if server_id not in by_id:
            server_id = by_instance.get(labels.get("instance", ""))
        if server_id is None:
            continue
        stamp, value = series["value"]
        found.setdefault(server_id, {})[labels["__name__"]] = (float(stamp), float(value))
    samples = []
    for server_id, values in found.items():
        if USED in values and CAPACITY in values:
            at = min(values[USED][0], values[CAPACITY][0])
            samples.append(Sample(server_id, int(values[USED][1]), int(values[CAPACITY][1]), at))
    return samples


class UtilizationPoller:
    """Starts a round of samples every `interval` seconds; `collect` returns finished ones.

    Never blocks the caller: requests run in the pool with `timeout`, and a round is not
    started while the previous one is still running.
    """

    def __init__(
        self,
        source: str,
        *,
        interval: float,
        timeout: float,
        prometheus_url: str | None = None,
        workers: int = 4,
    ) -> None:
        self.source = source
        self.interval = interval
        self.timeout = timeout
        self.prometheus_url = prometheus_url
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="utilization")
        self._futures: list[Future[list[Sample]]] = []
        self._next = 0.0
        self.errors = 0

    def due(self, now: float) -> bool:
        return now >= self._next and not self._futures

    def soon(self) -> None:
        """Sample at the next opportunity (a server just registered)."""
        self._next = 0.0

    def start(self, targets: list[Target], now: float) -> None:
        self._next = now + self.interval
        if not targets:
            return
        if self.source == "prometheus":
            assert self.prometheus_url is not None
            url = self.prometheus_url
            self._futures.append(self._pool.submit(query_prometheus, url, targets, self.timeout))
        else:
            for target in targets:
                self._futures.append(self._pool.submit(_scrape_list, target, self.timeout))

    def collect(self) -> tuple[list[Sample], list[str]]:
        """(samples of finished requests, error texts); leaves unfinished ones running."""
        samples: list[Sample] = []
        errors: list[str] = []
        pending = []
        for future in self._futures:
            if not future.done():
                pending.append(future)
                continue
            try:
                samples.extend(future.result())
            except Exception as exc:  # any HTTP/parse failure: keep the older sample
                self.errors += 1
                errors.append(f"{type(exc).__name__}: {exc}")
        self._futures = pending
        return samples, errors

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _scrape_list(target: Target, timeout: float) -> list[Sample]:
    sample = scrape(target, timeout)
    return [] if sample is None else [sample]
