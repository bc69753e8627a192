"""A page server process lends the RAM its pages use: its arena file grows as slabs fill and
shrinks when a slab is pushed away and dropped (placement's order after a move), as its
allocated blocks and the pageserver_arena_committed_bytes gauge show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from remem_common.pageserver_client import PageServerClient
from remem_common.protocol.pages import PAGE_SIZE, make_keys
from remem_common.testing import ServiceProcess, scrape_metrics
from remem_pageserver.store import REGION_PAGES, SLOT_DTYPE, SLOTS_OFFSET

from ..conftest import StartPageServer

REGION_BYTES = REGION_PAGES * (PAGE_SIZE + SLOT_DTYPE.itemsize)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def committed_gauge(server: ServiceProcess) -> float:
    return scrape_metrics(server.ready["metrics"])["pageserver_arena_committed_bytes"]


def test_a_pushed_and_dropped_slab_gives_its_memory_back(
    start_pageserver: StartPageServer, shm_dir: Path
) -> None:
    source = start_pageserver(name="source", capacity="256MiB")
    target = start_pageserver(name="target", capacity="256MiB")
    source_arena, target_arena = shm_dir / "source.arena", shm_dir / "target.arena"
    assert allocated(source_arena) == SLOTS_OFFSET  # nothing but the header: 256 MiB lent
    rng = np.random.default_rng(4)
    moved = rng.integers(0, 256, (4 * REGION_PAGES, PAGE_SIZE), dtype=np.uint8)
    stays = rng.integers(0, 256, (REGION_PAGES, PAGE_SIZE), dtype=np.uint8)
    with (
        PageServerClient(source.ready["endpoint"], timeout=10) as src,
        PageServerClient(target.ready["endpoint"], timeout=10) as dst,
    ):
        for start in range(0, moved.shape[0], 256):
            # Interleaved with the other slab, as a client's writes arrive.
            src.put("t", 0, make_keys([3] * 256, range(start, start + 256)), moved[start:][:256])
            if start == 0:
                src.put("t", 0, make_keys([9] * REGION_PAGES, range(REGION_PAGES)), stays)
        assert allocated(source_arena) == SLOTS_OFFSET + 5 * REGION_BYTES
        assert committed_gauge(source) == allocated(source_arena)
        reply = src.push_slab("t", 0, 3, target.ready["endpoint"])
        assert reply.pages == moved.shape[0]
        assert allocated(target_arena) == SLOTS_OFFSET + 4 * REGION_BYTES
        assert src.drop_slab("t", 0, 3) == moved.shape[0]
        assert allocated(source_arena) == SLOTS_OFFSET + REGION_BYTES
        assert committed_gauge(source) == allocated(source_arena)
        found, _, got = src.get("t", 0, make_keys([9] * REGION_PAGES, range(REGION_PAGES)))
        assert found.all() and np.array_equal(got, stays)
        found, _, got = dst.get("t", 0, make_keys([3] * moved.shape[0], range(moved.shape[0])))
        assert found.all() and np.array_equal(got, moved)
