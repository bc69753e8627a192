"""The fio table of `make bench`: nbdkit memory and remem up (k=1, k=2, k=2 without its
mirror) started side by side, each workload run against all of them.

Every server is started, filled and measured by remem_client.bench_nbd (one copy of that
plumbing): CPU per request is summed over each server's processes (`remem up`'s children
from its pid folder; nbdkit is one process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from remem_client.bench_nbd import (
    WORKLOADS as NBD_WORKLOADS,
)
from remem_client.bench_nbd import (
    WRITE_WORKLOADS,
    Server,
    Workload,
    compare,
    fill,
    start_nbdkit,
    start_remem,
    workload_name,
)

NBDKIT = "nbdkit"
K1 = "remem-k1"
K2 = "remem-k2"
K2_NO_MIRROR = "remem-k2-nomirror"
# How each server is named in tables and on the chart.
LABELS = {
    NBDKIT: "nbdkit memory",
    K1: "remem k=1",
    K2: "remem k=2",
    K2_NO_MIRROR: "remem k=2, no mirror",
}

# bench_nbd's workloads, and the 70/30 mix the issue asks for.
WORKLOADS: tuple[Workload, ...] = (*NBD_WORKLOADS, ("randrw", "4k", 8))
# The mirror only costs on writes (a read never touches it while the replicas answer).
MIRROR_WORKLOADS: frozenset[Workload] = frozenset(WRITE_WORKLOADS)


def starters(size: str) -> list[Callable[[Path], Server]]:
    """How to start each server of the table (all `remem up`s: 3 page servers, Unix
    sockets, pages encrypted, the mirror on unless named otherwise)."""
    return [
        lambda d: start_nbdkit(d, size),
        lambda d: start_remem(d, size, [], "cluster", K1, ["--replicas", "1"]),
        lambda d: start_remem(d, size, [], "cluster", K2, ["--replicas", "2"]),
        lambda d: start_remem(d, size, [], "cluster-no-mirror", K2_NO_MIRROR, ["--replicas", "2"]),
    ]


def run_fio_rows(
    servers: list[Server], region: str, runtime: float, rounds: int
) -> list[dict[str, Any]]:
    """Fill every server's region, then each workload against every server that runs it;
    one row per workload: {"workload", "results": {server name: Result as a dict}}."""
    for server in servers:
        fill(server, region)
    rows: list[dict[str, Any]] = []
    for workload in WORKLOADS:
        measured = [s for s in servers if s.name != K2_NO_MIRROR or workload in MIRROR_WORKLOADS]
        means = compare(measured, workload, region, runtime, rounds)
        rows.append(
            {
                "workload": workload_name(workload),
                "results": {name: asdict(result) for name, result in means.items()},
            }
        )
        base = means[NBDKIT].iops or float("nan")
        ratios = ", ".join(
            f"{name} {means[name].iops / base:.2f}x" for name in means if name != NBDKIT
        )
        print(f"fio {workload_name(workload)}: nbdkit {base:,.0f} IOPS; {ratios}", flush=True)
    return rows
