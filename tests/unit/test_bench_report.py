"""`make bench`'s report (tests/bench/report.py): each target of issue 14 is judged from the
right figure and printed beside its row; a part that did not run says why."""

from __future__ import annotations

from typing import Any

from tests.bench.fio_rows import K1, K2, K2_NO_MIRROR, NBDKIT
from tests.bench.report import evaluate_targets, render_markdown


def fio_result(iops: float, p50_us: float = 100.0, cpu: float = 10.0) -> dict[str, float]:
    return {
        "iops": iops,
        "mbps": iops * 4096 / 1e6,
        "clat_us": p50_us,
        "cpu_us_per_op": cpu,
        "p50_us": p50_us,
        "p99_us": 2 * p50_us,
        "max_us": 10 * p50_us,
    }


def results(**parts: Any) -> dict[str, Any]:
    rows = [
        {
            "workload": "randread 4k qd1",
            "results": {NBDKIT: fio_result(20000, 40), K1: fio_result(5000, 110),
                        K2: fio_result(5000, 130)},
        },
        {
            "workload": "randread 4k qd32",
            "results": {NBDKIT: fio_result(50000), K1: fio_result(30000),
                        K2: fio_result(26000, cpu=35.0)},
        },
        {
            "workload": "randwrite 4k qd32",
            "results": {NBDKIT: fio_result(40000), K1: fio_result(20000),
                        K2: fio_result(10000, cpu=55.0), K2_NO_MIRROR: fio_result(12500)},
        },
    ]  # fmt: skip
    base: dict[str, Any] = {
        "date": "2026-01-01 00:00 UTC",
        "elapsed_s": 600,
        "machine": {"CPU": "test", "load_start": "1 1 1", "load_end": "1 1 1"},
        "settings": {"runtime": 5, "rounds": 2, "region": "256M", "size": "1G"},
        "fio": {"rows": rows},
        "metadata": {"bytes": 33024, "device_bytes": 1 << 30, "bytes_per_gib": 33024.0},
        "failover": {"error": "RuntimeError: slabs not re-replicated"},
        "swap": {"skipped": "needs root"},
    }
    return base | parts


def by_what(targets: list[Any]) -> dict[str, Any]:
    return {t.what: t for t in targets}


def test_targets_are_judged_from_k2_against_nbdkit() -> None:
    targets = by_what(evaluate_targets(results()))
    assert len(targets) == 13
    read32 = targets["4K randread QD32 IOPS, k=2 / nbdkit"]
    assert read32.measured == 26000 / 50000 and read32.met is True
    write32 = targets["4K randwrite QD32 IOPS, k=2 / nbdkit"]
    assert write32.measured == 0.25 and write32.met is False
    latency = targets["4K randread QD1 p50 latency, k=2 / nbdkit"]
    assert latency.measured == 130 / 40 and latency.met is False  # 3.25x > 3x
    assert targets["CPU per 4K request, all k=2 processes, randread QD32"].met is True
    assert targets["CPU per 4K request, all k=2 processes, randwrite QD32"].met is False
    metadata = targets["client location metadata per GiB of device"]
    assert metadata.shown == "32.2 KiB" and metadata.met is True
    # Not measured: a workload that did not run, a failed part, a skipped one.
    assert targets["1M sequential read QD8 MB/s, k=2 / nbdkit"].met is None
    assert targets["failover stall (longest request, page server SIGKILLed)"].met is None
    assert targets["kernel swap hog time, random page-in, remem / nbdkit"].met is None
    assert targets["page server RAM overhead"].shown == "not measured"


def test_markdown_puts_each_target_beside_its_row_and_says_why_a_part_is_missing() -> None:
    text = render_markdown(results(), "BENCHMARKS.png")
    k2_row = next(line for line in text.splitlines() if line.startswith("|  | remem k=2 | 26,000"))
    assert "IOPS >= 0.50x; CPU <= 40.0 us" in k2_row
    assert k2_row.endswith("| yes; yes |")
    assert "skipped (needs root)" in text
    assert "**failed**: RuntimeError: slabs not re-replicated" in text
    assert "| randwrite 4k qd32 | 12,500 | 10,000 | 0.80x |" in text  # the mirror's cost
    assert "![remem against nbdkit memory](BENCHMARKS.png)" in text
    assert "3 of 13 targets met." in text


def test_swap_and_failover_figures_are_reported_when_measured() -> None:
    quantiles = [0.5, 0.9, 0.99, 0.999, 1.0]
    servers = {
        "nbdkit": {"total_s": 10.0, "write_s": 1.0, "pagein_s": 9.0, "major_faults": 100,
                   "quantiles_us": [80, 150, 700, 4000, 30000]},
        "remem": {"total_s": 12.0, "write_s": 2.0, "pagein_s": 10.0, "major_faults": 100,
                  "quantiles_us": [100, 200, 900, 5000, 40000]},
    }  # fmt: skip
    swap = {
        "hog_mib": 512,
        "limit_mib": 128,
        "rounds": 2,
        "quantiles": quantiles,
        "orders": {
            "sequential": {"servers": servers, "ratio": 1.2},
            "random": {"servers": servers, "ratio": 1.3},
        },
    }
    failover = {
        "victim": "pageserver-0", "victim_slabs": 3, "fio_seconds": 10, "fio_iops": 3000,
        "stall_ms": 150.0, "p99_ms": 5.0, "detect_s": 1.5, "rereplicated_bytes": 192 << 20,
        "copy_s": 0.5, "rereplication_mbps": 402.7, "whole_again_s": 3.0,
    }  # fmt: skip
    targets = by_what(evaluate_targets(results(swap=swap, failover=failover)))
    assert targets["kernel swap hog time, sequential page-in, remem / nbdkit"].met is True
    assert targets["kernel swap hog time, random page-in, remem / nbdkit"].met is False
    assert targets["failover stall (longest request, page server SIGKILLed)"].met is True
    assert targets["re-replication rate, loopback"].met is True
    text = render_markdown(results(swap=swap, failover=failover), None)
    assert "| random | nbdkit memory | 10.00 | 1.00 | 9.00 | 100 | 80.0 | 150.0 |" in text
    assert "1.30x | time <= 1.25x | **no** |" in text
    assert "| re-replication rate | 403 MB/s | >= 300 MB/s | yes |" in text
