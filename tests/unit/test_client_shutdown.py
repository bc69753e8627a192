"""The client's stop is bounded: the placement link's close, and the NBD server's close.

A restart under a handover once hung for good (1 run in about 20 of
test_client_handover.py's libnbd stream): the placement link's close cancelled its map poll
just as a failure report's reply had woken it, and on Python 3.11 `asyncio.wait_for` then
returns normally instead of raising CancelledError, so the poll went on and close() awaited
it forever. These tests put the close exactly there, and a backend whose close never ends
behind the server's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import zmq
from prometheus_client import CollectorRegistry
from remem_client.memory_backend import MemoryBackend
from remem_client.metrics import build_metrics
from remem_client.placement_link import PlacementLink
from remem_client.server import NbdServer

Context = zmq.Context[zmq.Socket[bytes]]


@pytest.mark.parametrize("turns", [0, 1, 2, 3])
async def test_closing_the_placement_link_as_a_report_wakes_its_poll_ends_the_poll(
    turns: int, zmq_context: Context
) -> None:
    silent = zmq_context.socket(zmq.ROUTER)  # a placement that takes requests, answers none
    silent.bind("tcp://127.0.0.1:*")
    endpoint = silent.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    link = PlacementLink(
        endpoint.decode(),
        tenant="t",
        volume=0,
        replicas=1,
        context=zmq_context,
        timeout=0.2,
        poll_interval=30.0,
    )
    try:
        # The poll as start() begins it, waiting for its next round...
        link._spawn(link._poll_map())
        await asyncio.sleep(0.05)
        # ...woken as a failure report's reply wakes it, and closed `turns` loop turns later
        # (0 and 1 hung before: the wake-up and the cancellation met inside wait_for).
        link._refresh.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        began = time.monotonic()
        await asyncio.wait_for(link.close(), 5)
        assert time.monotonic() - began < 1
        assert not link._tasks  # the poll ended; nothing left running
    finally:
        silent.close(linger=0)


class UnclosableBackend(MemoryBackend):
    """A backend whose close never returns (a peer or a task that does not end)."""

    closes = 0

    async def close(self) -> None:
        self.closes += 1
        await asyncio.Event().wait()


async def test_the_servers_close_is_bounded_and_idempotent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = UnclosableBackend(1 << 20)
    server = NbdServer(backend, build_metrics(CollectorRegistry()))
    path = tmp_path / "nbd.sock"
    await server.listen_unix(path)
    with caplog.at_level(logging.WARNING):
        assert await server.drain(1.0) is True  # nobody connected: drained at once
        began = time.monotonic()
        await server.close(timeout=0.2)
        assert time.monotonic() - began < 1  # bounded by its timeout, not by the backend
        await server.close(timeout=0.2)  # again (the lifecycle's cleanup after a handover)
    assert backend.closes == 1
    assert not path.exists()
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "the backend did not close within 0.2s; exiting without it"
    ]
