"""`make bench-pageserver`: batched PUT and GET pages/s over loopback, and RAM overhead.

Starts a real page server process, drives it with a pipelined DEALER client, then fills it
to 1M pages (4 GiB) and reads its RSS from /proc: overhead = RSS - page bytes, over page bytes.
The first PUT pass writes new pages, so it includes committing their memory (the arena is
sparse: ~2 us a page of kernel time here, which an arena allocated whole paid at start); the
second overwrites them, the path of pages already held.
Prints a table and one JSON line. Environment: BENCH_PAGES (default 1048576), BENCH_BATCH
(64), BENCH_WINDOW (8), BENCH_SHM (arena path, default /dev/shm/remem-bench.arena),
BENCH_CURVE (1, the services' default: CurveZMQ with fresh keys; 0: plaintext, --insecure).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from remem_common.pageserver_client import PageServerClient
from remem_common.protocol.client_pageserver import GetPagesRequest, PutPagesRequest
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    checksum_pages,
    make_keys,
)
from remem_common.security import Security, load_public_key, write_keypair
from remem_common.testing import start_service

TENANT = "bench"


def rss_breakdown(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far: what a phase cost the server, which
    unlike its rate does not depend on how busy the machine's other cores are."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def put_batches(
    total: int, batch: int, data: np.ndarray[Any, Any], crcs: Any, client: PageServerClient
) -> Any:
    # Random bytes where a client's nonces and tags go: the server stores them unread.
    seals = np.random.default_rng(1).integers(0, 256, (batch, SEAL_BYTES), dtype=np.uint8)
    for start in range(0, total, batch):
        count = min(batch, total - start)
        index = np.arange(start, start + count)
        keys = make_keys(index // SLAB_PAGES, index % SLAB_PAGES)
        yield (
            PutPagesRequest(msg_id=client.next_id(), tenant=TENANT, volume=0, count=count),
            (keys, crcs[:count], data[:count], seals[:count]),
        )


def get_batches(
    total: int, held: int, batch: int, client: PageServerClient, rng: np.random.Generator
) -> Any:
    for start in range(0, total, batch):
        count = min(batch, total - start)
        index = rng.choice(held, size=count, replace=False)
        keys = make_keys(index // SLAB_PAGES, index % SLAB_PAGES)
        yield (
            GetPagesRequest(msg_id=client.next_id(), tenant=TENANT, volume=0, count=count),
            (keys,),
        )


def main() -> int:
    total = int(os.environ.get("BENCH_PAGES", 1 << 20))
    batch = int(os.environ.get("BENCH_BATCH", 64))
    window = int(os.environ.get("BENCH_WINDOW", 8))
    shm = os.environ.get("BENCH_SHM", "/dev/shm/remem-bench.arena")
    capacity = total * PAGE_SIZE
    curve = os.environ.get("BENCH_CURVE", "1") != "0"
    key_dir = Path(tempfile.mkdtemp(prefix="remem-bench-keys-"))
    security_args = ["--insecure"]
    client_security: dict[str, Any] = {}
    if curve:
        server_key, _ = write_keypair(key_dir, "bench-pageserver", "pageserver", None)
        _, client_secret = write_keypair(key_dir, "bench-client", "client", TENANT)
        security_args = [
            "--no-insecure",
            "--curve-secret-key", str(key_dir / "bench-pageserver.key_secret"),
            "--curve-authorized", str(key_dir),
        ]  # fmt: skip
        client_security = {
            "security": Security.curve(client_secret),
            "server_key": load_public_key(server_key),
        }
    server = start_service(
        "pageserver",
        [
            "pageserver",
            "--capacity",
            str(capacity),
            "--listen",
            "tcp://127.0.0.1:0",
            "--metrics-port",
            "0",
            "--shm-path",
            shm,
            "--forget",
            *security_args,
        ],
    )
    results: dict[str, Any] = {"pages": total, "batch": batch, "window": window, "curve": curve}
    try:
        rng = np.random.default_rng(7)
        data = rng.integers(0, 256, size=(batch, PAGE_SIZE), dtype=np.uint8)
        crcs = checksum_pages(data)
        idle = rss_breakdown(server.pid)
        with PageServerClient(server.ready["endpoint"], timeout=30, **client_security) as client:
            cpu = cpu_seconds(server.pid)
            started = time.perf_counter()
            client.pipeline(put_batches(total, batch, data, crcs, client), window)
            put_s = time.perf_counter() - started
            put_cpu = cpu_seconds(server.pid) - cpu
            full = rss_breakdown(server.pid)
            cpu = cpu_seconds(server.pid)
            started = time.perf_counter()
            client.pipeline(put_batches(total, batch, data, crcs, client), window)
            overwrite_s = time.perf_counter() - started
            overwrite_cpu = cpu_seconds(server.pid) - cpu
            reads = min(total, 262144)
            cpu = cpu_seconds(server.pid)
            started = time.perf_counter()
            client.pipeline(get_batches(reads, total, batch, client, rng), window)
            get_s = time.perf_counter() - started
            get_cpu = cpu_seconds(server.pid) - cpu
            single = 20000
            started = time.perf_counter()
            client.pipeline(get_batches(single, total, 1, client, rng), 1)
            single_s = time.perf_counter() - started
        page_bytes = total * PAGE_SIZE
        overhead = full["VmRSS"] - page_bytes
        results.update(
            put_pages_per_s=round(total / put_s),
            put_mib_per_s=round(total * PAGE_SIZE / put_s / 2**20),
            put_overwrite_pages_per_s=round(total / overwrite_s),
            get_pages_per_s=round(reads / get_s),
            get_mib_per_s=round(reads * PAGE_SIZE / get_s / 2**20),
            get_single_page_qd1_per_s=round(single / single_s),
            server_cpu_us_per_put_page=round(put_cpu / total * 1e6, 2),
            server_cpu_us_per_overwrite_page=round(overwrite_cpu / total * 1e6, 2),
            server_cpu_us_per_get_page=round(get_cpu / reads * 1e6, 2),
            rss_idle_bytes=idle["VmRSS"],
            rss_full_bytes=full["VmRSS"],
            rss_shmem_bytes=full["RssShmem"],
            rss_anon_bytes=full["RssAnon"],
            overhead_bytes=overhead,
            overhead_pct=round(100 * overhead / page_bytes, 2),
        )
    finally:
        server.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(shm)
        for path in key_dir.iterdir():
            path.unlink()
        key_dir.rmdir()
    mode = "CurveZMQ" if curve else "plaintext (--insecure)"
    print(f"page server, batches of {batch} pages, {window} in flight, loopback, {mode}")
    print(f"  PUT  {results['put_pages_per_s']:>10,} pages/s  {results['put_mib_per_s']:>6} MiB/s")
    print(f"  PUT over held pages {results['put_overwrite_pages_per_s']:>10,} pages/s")
    print(f"  GET  {results['get_pages_per_s']:>10,} pages/s  {results['get_mib_per_s']:>6} MiB/s")
    print(f"  GET 1 page QD1 {results['get_single_page_qd1_per_s']:>10,} req/s")
    print(
        f"  server CPU per page: PUT {results['server_cpu_us_per_put_page']} us, "
        f"PUT over held {results['server_cpu_us_per_overwrite_page']} us, "
        f"GET {results['server_cpu_us_per_get_page']} us"
    )
    print(
        f"  RAM with {total:,} pages: RSS {results['rss_full_bytes'] / 2**20:,.0f} MiB, "
        f"pages {total * PAGE_SIZE / 2**20:,.0f} MiB, overhead "
        f"{results['overhead_bytes'] / 2**20:,.1f} MiB = {results['overhead_pct']}%"
    )
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
