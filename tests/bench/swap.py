"""The kernel-swap part of `make bench` (root): the Linux kernel swaps a memory hog through
nbdfuse and a direct-I/O loop device to `nbdkit memory` and to `remem up` (k=2, three page
servers, the mirror), and pages it back in sequential and in random order.

Rounds alternate which server goes first; within a round one server is started once and
swapped to in both orders (tests/system/bench_swap.py starts the servers, kernel_swap.py
runs the hog and verifies every byte). A hog that reads back a wrong byte fails the run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..system.bench_swap import nbdkit_memory, remem_up
from ..system.kernel_swap import PageInOrder, SwapResult, available, run_hog

ORDERS: tuple[PageInOrder, ...] = ("sequential", "random")
# Quantiles of the page-in touch times the hog reports: every percent, then the tail.
QUANTILES: tuple[float, ...] = (
    *(q / 100 for q in range(1, 100)),
    0.995,
    0.999,
    0.9999,
    1.0,
)


def run_swap(hog_mib: int, limit_mib: int, rounds: int) -> dict[str, Any]:
    """{"skipped": why} where the kernel path cannot run (not root, no nbdfuse...); else
    per order and server the mean figures of the rounds, and remem's ratio to nbdkit."""
    why_not = available()
    if why_not:
        return {"skipped": why_not}
    size = f"{max(2, -(-2 * hog_mib // 1024))}GiB"
    runners: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
        "nbdkit": lambda d: nbdkit_memory(d, size.removesuffix("iB")),
        "remem": lambda d: remem_up(d, size, ["--replicas", "2"]),
    }
    samples: dict[str, dict[str, list[SwapResult]]] = {
        order: {name: [] for name in runners} for order in ORDERS
    }
    for round_number in range(rounds):
        names = list(runners) if round_number % 2 == 0 else list(reversed(runners))
        for name in names:
            with (
                tempfile.TemporaryDirectory(prefix=f"remem-bench-swap-{name}-") as tmp,
                runners[name](Path(tmp)) as uri,
            ):
                for order in ORDERS:
                    work = Path(tmp) / order
                    work.mkdir()
                    result = run_hog(
                        uri,
                        work,
                        hog_mib=hog_mib,
                        limit_mib=limit_mib,
                        order=order,
                        quantiles=QUANTILES,
                    )
                    print(
                        f"swap round {round_number + 1} {name} {order}: {result.total_s:.1f} s,"
                        f" {result.errors} bad pages, {result.major_faults} major faults, out "
                        f"{result.swapped_out_mib} MiB, in {result.swapped_in_mib} MiB",
                        flush=True,
                    )
                    if not result.ok:
                        raise RuntimeError(f"kernel swap to {name} failed: {result}")
                    samples[order][name].append(result)
    return {
        "hog_mib": hog_mib,
        "limit_mib": limit_mib,
        "rounds": rounds,
        "quantiles": list(QUANTILES),
        "orders": {
            order: {
                "servers": {name: mean_swap(results) for name, results in by_name.items()},
                "ratio": sum(r.total_s for r in by_name["remem"])
                / sum(r.total_s for r in by_name["nbdkit"]),
            }
            for order, by_name in samples.items()
        },
    }


def mean_swap(results: list[SwapResult]) -> dict[str, Any]:
    """Means over rounds: seconds of the hog (total, swap-out phase, page-in phase), major
    faults of the page-in, and each quantile of the touch times."""
    n = len(results)
    return {
        "total_s": sum(r.total_s for r in results) / n,
        "write_s": sum(r.write_s for r in results) / n,
        "pagein_s": sum(r.verify_s for r in results) / n,
        "major_faults": sum(r.major_faults for r in results) / n,
        "swapped_out_mib": sum(r.swapped_out_mib for r in results) / n,
        "swapped_in_mib": sum(r.swapped_in_mib for r in results) / n,
        "quantiles_us": [
            sum(qs) / n for qs in zip(*(r.quantiles_us for r in results), strict=True)
        ],
        "samples": [{k: v for k, v in asdict(r).items() if k != "quantiles_us"} for r in results],
    }
