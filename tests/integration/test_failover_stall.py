"""A page server SIGKILLed under load, against real page server processes: the client's
requests in flight to it fail over as soon as its connection is lost, not after the replica
timeout (`make bench`'s failover stall); and the link to a page server restarted on its
endpoint serves new requests again.

Both of the client's dealers run: ZMTP from the event loop (plaintext; the loss is the
connection's end) and libzmq (Curve; the loss is its socket monitor's DISCONNECTED).
Placement is replaced by a fixed round-robin, as in test_remote_backend.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_client.links import PageServerLink, ReplicaFailure, page_keys
from remem_client.remote.backend import RemoteBackend
from remem_client.remote.slabmap import Replica
from remem_common.protocol.envelope import ErrorCode
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_BYTES,
    SLAB_PAGES,
    checksum_pages,
)
from remem_common.security import Security, load_public_key, write_keypair
from remem_common.testing import ServiceProcess, start_service

from ..faults.cluster import free_port

# Far longer than any request may take here: a request that waits for it is the bug.
REPLICA_TIMEOUT = 10.0
# The longest a request may take while a page server is killed under it: the loss is seen
# in milliseconds; this leaves room for a loaded machine, and is far below the timeout.
WITHIN = 2.0
SERVERS = 3
SIZE = 4 * SLAB_BYTES  # four slabs, each on two of the three servers
WORKERS = 32
CHUNK_PAGES = 64  # each worker's own pages in every slab: no two workers' requests overlap


@dataclass
class PageServers:
    """Page servers on fixed ports (a restart comes back on the same endpoint and arena),
    plaintext or Curve; stopped at teardown."""

    shm_dir: Path
    keys: Path | None  # Curve certificates, or None for plaintext
    ports: dict[str, int] = field(default_factory=dict)
    running: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str) -> ServiceProcess:
        port = self.ports.setdefault(name, free_port())
        args = [
            "pageserver", "--capacity", "256MiB", "--listen", f"tcp://127.0.0.1:{port}",
            "--metrics-port", "0", "--shm-path", str(self.shm_dir / f"{name}.arena"),
            "--server-id", name,
        ]  # fmt: skip
        if self.keys is not None:
            args += [
                "--no-insecure",
                "--curve-secret-key", str(self.keys / f"{name}.key_secret"),
                "--curve-authorized", str(self.keys),
            ]  # fmt: skip
        service = start_service(name, args)
        self.running[name] = service
        return service

    def replica(self, name: str) -> Replica:
        public_key = load_public_key(self.keys / f"{name}.key") if self.keys else None
        return Replica(name, self.running[name].ready["endpoint"], public_key)

    def client_security(self) -> Security:
        if self.keys is None:
            return Security.insecure()
        return Security.curve(self.keys / "client.key_secret")

    async def kill(self, name: str) -> None:
        """SIGKILL `name` and reap it off the loop (the loop goes on serving meanwhile)."""
        service = self.running[name]
        os.kill(service.pid, signal.SIGKILL)
        await asyncio.to_thread(service.proc.wait, 30)

    def stop(self) -> None:
        for service in self.running.values():
            if service.proc.poll() is None:
                service.stop()


@pytest.fixture(params=["zmtp", "libzmq-curve"])
def pageservers(
    request: pytest.FixtureRequest, shm_dir: Path, tmp_path: Path
) -> Iterator[PageServers]:
    keys = None
    if request.param == "libzmq-curve":
        keys = tmp_path / "keys"
        for index in range(SERVERS):
            write_keypair(keys, f"ps{index}", "pageserver", None)
        write_keypair(keys, "client", "client", "t")
    servers = PageServers(shm_dir, keys)
    try:
        for index in range(SERVERS):
            servers.start(f"ps{index}")
        yield servers
    finally:
        servers.stop()


class RoundRobinPlacement:
    """Replicas of slab n: servers n and n + 1 (mod 3); failures recorded."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.failures: list[str] = []

    async def allocate(self, slab: int) -> list[Replica]:
        count = len(self.replicas)
        return [self.replicas[(slab + i) % count] for i in range(2)]

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        self.failures.append(server_id)


@pytest.fixture
async def backend(
    pageservers: PageServers, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> AsyncIterator[tuple[RemoteBackend, RoundRobinPlacement]]:
    names = [f"ps{index}" for index in range(SERVERS)]
    placement = RoundRobinPlacement([pageservers.replica(name) for name in names])
    remote = RemoteBackend(
        size=SIZE,
        tenant="t",
        volume=0,
        placement=placement,
        context=zmq_context,
        replica_timeout=REPLICA_TIMEOUT,
        sealer=None,
        security=pageservers.client_security(),
    )
    yield remote, placement
    await remote.close()  # every socket it made: zmq_context fails the test otherwise


def worker_pages(worker: int) -> list[int]:
    """The first page of each of `worker`'s chunks, one chunk in every slab."""
    return [slab * SLAB_PAGES + worker * CHUNK_PAGES for slab in range(SIZE // SLAB_BYTES)]


@dataclass
class Load:
    """WORKERS coroutines reading and writing their own pages, each read checked against
    what the worker last wrote there; every request's duration recorded."""

    remote: RemoteBackend
    model: bytearray = field(default_factory=lambda: bytearray(SIZE))
    durations: list[float] = field(default_factory=list)
    done: int = 0
    stop: bool = False

    async def fill(self) -> None:
        for worker in range(WORKERS):
            for first in worker_pages(worker):
                data = os.urandom(CHUNK_PAGES * PAGE_SIZE)
                await self.remote.pwrite(first * PAGE_SIZE, memoryview(data), False)
                self.model[first * PAGE_SIZE : first * PAGE_SIZE + len(data)] = data

    async def worker(self, worker: int) -> None:
        rng = np.random.default_rng(worker)
        loop = asyncio.get_running_loop()
        chunks = worker_pages(worker)
        while not self.stop:
            count = int(rng.integers(1, 9))
            first = int(rng.choice(chunks)) + int(rng.integers(0, CHUNK_PAGES - count + 1))
            offset, length = first * PAGE_SIZE, count * PAGE_SIZE
            started = loop.time()
            if rng.random() < 0.3:
                data = os.urandom(length)
                await self.remote.pwrite(offset, memoryview(data), False)
                self.model[offset : offset + length] = data
            else:
                got = bytes(await self.remote.pread(offset, length))
                assert got == self.model[offset : offset + length], f"page {first} x{count}"
            self.durations.append(loop.time() - started)
            self.done += 1


async def until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll the test's own state until `predicate` holds (the loop runs meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not within {timeout}s"
        await asyncio.sleep(0.005)


async def test_requests_in_flight_to_a_sigkilled_page_server_fail_over_at_once(
    pageservers: PageServers, backend: tuple[RemoteBackend, RoundRobinPlacement]
) -> None:
    remote, placement = backend
    load = Load(remote)
    await load.fill()
    workers = [asyncio.ensure_future(load.worker(index)) for index in range(WORKERS)]
    try:
        await until(lambda: load.done >= 1000, "the load to get going")
        # ps1 holds a replica of slabs 0, 1 and 3: most requests in flight touch it.
        await pageservers.kill("ps1")
        killed_at = load.done
        await until(lambda: load.done >= killed_at + 2000, "the load to go on without ps1")
    finally:
        load.stop = True
        results = await asyncio.gather(*workers, return_exceptions=True)
    assert [r for r in results if r is not None] == []  # every request succeeded, reads right
    assert "ps1" in placement.failures  # requests did meet the dead server, and failed over
    worst = max(load.durations)
    assert worst < WITHIN, f"slowest request {worst:.3f}s (replica timeout {REPLICA_TIMEOUT}s)"
    # Everything written, the last of it while ps1 was dead, reads back from the survivors.
    assert bytes(await remote.pread(0, SIZE)) == load.model


async def test_a_page_server_link_fails_in_flight_at_once_then_serves_the_restarted_server(
    pageservers: PageServers, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    replica = pageservers.replica("ps0")
    link = PageServerLink(
        "ps0",
        replica.endpoint,
        context=zmq_context,
        tenant="t",
        volume=0,
        timeout=REPLICA_TIMEOUT,
        security=pageservers.client_security(),
        server_key=replica.public_key,
    )
    loop = asyncio.get_running_loop()
    try:
        pages = np.frombuffer(os.urandom(8 * PAGE_SIZE), dtype=np.uint8).reshape(8, PAGE_SIZE)
        seals = np.zeros((8, SEAL_BYTES), dtype=np.uint8)
        keys = page_keys(0, 8, SLAB_PAGES)
        stored = await link.submit_put(keys, checksum_pages(pages), pages, seals, 0, 7)
        assert stored == 8  # the future of a put gives the pages the server stored

        # A read in flight (sent, unanswered: the server is stopped) when the server dies.
        service = pageservers.running["ps0"]
        service.kill(signal.SIGSTOP)
        in_flight, _ = link.submit_get(keys, 0, 7)
        await until(lambda: not link.gathering("get"), "the read to be sent")
        killed = loop.time()
        await pageservers.kill("ps0")
        with pytest.raises(ReplicaFailure) as failure:
            await asyncio.wait_for(in_flight, REPLICA_TIMEOUT / 2)
        assert failure.value.code == ErrorCode.UNAVAILABLE, failure.value
        assert loop.time() - killed < WITHIN

        # Until the server is back, a request fails as it is sent, not at the timeout.
        refused, _ = link.submit_get(keys, 0, 7)
        with pytest.raises(ReplicaFailure) as failure:
            await asyncio.wait_for(refused, WITHIN)
        assert failure.value.code == ErrorCode.UNAVAILABLE, failure.value

        # Restarted on the same endpoint and arena: the same link reconnects and reads the
        # pages written before the kill.
        await asyncio.to_thread(pageservers.start, "ps0")
        assert pageservers.replica("ps0").endpoint == replica.endpoint

        async def read_back() -> bytes | None:
            future, start = link.submit_get(keys, 0, 7)
            try:
                result = await future
            except ReplicaFailure as exc:
                assert exc.code == ErrorCode.UNAVAILABLE, exc  # not connected again yet
                return None
            assert result.found[start : start + 8].all()
            return bytes(result.data[start : start + 8])

        deadline = loop.time() + 30
        while (got := await read_back()) is None:
            assert loop.time() < deadline, "the link never reconnected"
            await asyncio.sleep(0.01)
        assert got == pages.tobytes()
    finally:
        link.close()
