"""Fakes for unit tests of the remote backend's parts: page servers, links, placement, mirror.

`FakePool` stands in for `remote.linkpool.LinkPool`: each `FakeLink` answers a batch from a
`FakeServer` (a dict of pages) one loop turn later, or when the test releases a server it
holds, or fails it as a timeout would, so a test decides the order in which replicas answer.
Nothing here opens a socket; a test runs in milliseconds.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import crc32c
import numpy as np
from remem_client.links import GetResult, ReplicaFailure
from remem_client.mirror_link import MirrorFailure
from remem_client.remote.backend import RemoteBackend
from remem_client.remote.slabmap import Replica
from remem_client.sealing import PageSealer
from remem_common.protocol.pages import KEY_DTYPE, PAGE_SIZE, SEAL_BYTES, SLAB_BYTES

Key = tuple[int, int]


def page_of(page: int, version: int) -> bytes:
    """A page whose every 8-byte word is (page << 32 | version)."""
    return np.full(PAGE_SIZE // 8, (page << 32) | version, dtype=np.uint64).tobytes()


def pages_of(first: int, count: int, version: int) -> bytes:
    return b"".join(page_of(page, version) for page in range(first, first + count))


def versions(data: bytes | memoryview) -> list[int]:
    """The version of each page of `data` (0: zeros, never written)."""
    words = np.frombuffer(bytes(data), dtype=np.uint64).reshape(-1, PAGE_SIZE // 8)
    return [int(w) & 0xFFFFFFFF for w in words[:, 0]]


def _keys(keys: Any) -> list[Key]:
    raw = keys.tobytes() if isinstance(keys, np.ndarray) else bytes(keys)
    return [(int(k["slab"]), int(k["page"])) for k in np.frombuffer(raw, dtype=KEY_DTYPE)]


class FakeServer:
    """A page server: pages by key as stored (data, checksum, seal)."""

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.pages: dict[Key, tuple[bytes, int, bytes]] = {}
        self.down = False  # requests time out
        self.held = False  # answers wait for release()
        self._queued: list[Callable[[], None]] = []
        self.requests: list[tuple[str, list[Key]]] = []  # (op, keys) as submitted

    def release(self) -> None:
        """Answer everything held, in the order submitted."""
        self.held = False
        queued, self._queued = self._queued, []
        for answer in queued:
            answer()

    def holding(self) -> int:
        return len(self._queued)

    def ops(self, op: str) -> int:
        return sum(1 for kind, _ in self.requests if kind == op)

    def corrupt(self, key: Key) -> None:
        """Flip a byte of a stored page (its checksum no longer matches)."""
        data, crc, seal = self.pages[key]
        self.pages[key] = (bytes([data[0] ^ 0xFF]) + data[1:], crc, seal)

    def tamper(self, key: Key) -> None:
        """Alter a stored page and fix its checksum (only the AES-GCM tag can tell)."""
        data, _, seal = self.pages[key]
        altered = bytes([data[0] ^ 0xFF]) + data[1:]
        self.pages[key] = (altered, crc32c.crc32c(altered), seal)


class FakeLink:
    """A `remote.linkpool.Link` to a FakeServer; never gathers (one batch per submit)."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.closed = False

    def _later(self, future: asyncio.Future[Any], result: Callable[[], Any]) -> None:
        server = self.server

        def answer() -> None:
            if future.done():
                return
            if server.down or self.closed:
                future.set_exception(ReplicaFailure(server.server_id, "timeout", "no answer"))
            else:
                future.set_result(result())

        if server.held:
            server._queued.append(answer)
        else:
            asyncio.get_running_loop().call_soon(answer)

    def _submit(self, op: str, keys: Any) -> tuple[asyncio.Future[Any], list[Key]]:
        if self.closed:
            raise ReplicaFailure(self.server.server_id, "closed", "link closed")
        wanted = _keys(keys)
        self.server.requests.append((op, wanted))
        return asyncio.get_running_loop().create_future(), wanted

    def submit_get(self, keys: Any, first: int, last: int) -> tuple[asyncio.Future[Any], int]:
        future, wanted = self._submit("get", keys)
        pages = self.server.pages

        def serve() -> GetResult:
            found, crcs, data, seals = bytearray(), [], bytearray(), bytearray()
            for key in wanted:
                page, crc, seal = pages.get(key, (bytes(PAGE_SIZE), 0, bytes(SEAL_BYTES)))
                found.append(key in pages)
                crcs.append(crc)
                data += page
                seals += seal
            crc_raw = struct.pack(f"<{len(crcs)}I", *crcs)
            views = [memoryview(bytes(b)) for b in (found, crc_raw, data, seals)]
            return GetResult(len(wanted), *views)

        self._later(future, serve)
        return future, 0

    def submit_put(
        self, keys: Any, crcs: Any, data: Any, seals: Any, first: int, last: int
    ) -> asyncio.Future[Any]:
        future, wanted = self._submit("put", keys)
        rows = np.asarray(data).reshape(-1, PAGE_SIZE)
        seal_rows = np.asarray(seals).reshape(-1, SEAL_BYTES)
        crc_list = np.frombuffer(bytes(np.asarray(crcs, dtype="<u4")), dtype="<u4").tolist()
        # Copied now: what a real link would have put in its message.
        stored = [
            (key, (rows[i].tobytes(), crc_list[i], seal_rows[i].tobytes()))
            for i, key in enumerate(wanted)
        ]

        def put() -> None:
            self.server.pages.update(stored)

        self._later(future, put)
        return future

    def submit_delete(self, keys: Any, first: int, last: int) -> asyncio.Future[Any]:
        future, wanted = self._submit("delete", keys)

        def delete() -> None:
            for key in wanted:
                self.server.pages.pop(key, None)

        self._later(future, delete)
        return future

    def gathering(self, op: str) -> bool:
        return False


class FakePool:
    """A `remote.linkpool.Links` over FakeServers."""

    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self.servers = servers
        self.links: dict[str, FakeLink] = {}

    def link(self, replica: Replica) -> FakeLink:
        self.connect(replica)
        return self.links[replica.server_id]

    def get(self, server_id: str) -> FakeLink | None:
        return self.links.get(server_id)

    def connect(self, replica: Replica) -> None:
        if replica.server_id not in self.links:
            self.links[replica.server_id] = FakeLink(self.servers[replica.server_id])

    def keep_only(self, server_ids: Any) -> None:
        for server_id in list(self.links):
            if server_id not in set(server_ids):
                self.links.pop(server_id).closed = True

    def close(self) -> None:
        for link in self.links.values():
            link.closed = True


class FakePlacement:
    """Replicas of slab n: servers n, n+1, ... (mod the number of servers)."""

    def __init__(self, server_ids: list[str], replicas: int) -> None:
        self.servers = [Replica(sid, f"inproc://{sid}") for sid in server_ids]
        self.replicas = replicas
        self.reports: list[tuple[str, int, str, bool]] = []

    async def allocate(self, slab: int) -> list[Replica]:
        count = len(self.servers)
        return [self.servers[(slab + i) % count] for i in range(self.replicas)]

    def report_failure(
        self, server_id: str, slab: int, detail: str, *, missed_write: bool = False
    ) -> None:
        self.reports.append((server_id, slab, detail, missed_write))

    def missed(self) -> list[tuple[str, int]]:
        return [(sid, slab) for sid, slab, _, missed in self.reports if missed]


class FakeMirror:
    """A `mirror_link.MirrorLink` kept in a dict: pages by number, applied at once."""

    def __init__(self, *, complete: bool = True) -> None:
        self.pages: dict[int, bytes] = {}
        self.unreplicated: set[int] = set()
        self.incomplete = not complete
        self.up = True
        self.losses = 0
        self.down = False  # reads and durable writes fail

    def _store(self, first: int, rows: Any) -> None:
        rows = np.asarray(rows, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        for offset, row in enumerate(rows):
            self.pages[first + offset] = row.tobytes()

    async def write_behind(self, first: int, pages: Any) -> None:
        self._store(first, pages)

    async def write_durable(self, first: int, pages: Any) -> None:
        if self.down:
            raise MirrorFailure("fake mirror down")
        self._store(first, pages)
        self.unreplicated.update(range(first, first + len(pages)))

    async def read(self, first: int, count: int, *, mirror_only: bool = False) -> Any:
        if self.down or not self.up or (self.incomplete and not mirror_only):
            raise MirrorFailure("fake mirror cannot serve")
        blank = bytes(PAGE_SIZE)
        data = b"".join(self.pages.get(page, blank) for page in range(first, first + count))
        return np.frombuffer(data, dtype=np.uint8).reshape(count, PAGE_SIZE).copy()

    def queue_write(self, first: int, data: bytes) -> None:
        self._store(first, np.frombuffer(data, dtype=np.uint8))

    def trim(self, first: int, count: int) -> None:
        for page in range(first, first + count):
            self.pages.pop(page, None)
        self.clear_unreplicated(first, count)

    def clear_unreplicated(self, first: int, count: int) -> None:
        self.unreplicated.difference_update(range(first, first + count))

    async def mark_replicated(self, first: int, count: int) -> None:
        self.clear_unreplicated(first, count)

    async def wait_for_room(self, nbytes: int) -> None:
        return None

    async def barrier(self) -> None:
        return None

    def usable(self) -> bool:
        return self.up

    async def detach(self) -> bool:
        return not self.incomplete

    def close(self) -> None:
        self.up = False


class Rig:
    """A RemoteBackend over FakeServers, FakePlacement and (optionally) a FakeMirror."""

    def __init__(
        self,
        servers: int = 3,
        replicas: int = 2,
        *,
        mirror: FakeMirror | None = None,
        sealer: PageSealer | None = None,
        size: int = 2 * SLAB_BYTES,
    ) -> None:
        ids = [f"ps{i}" for i in range(servers)]
        self.servers = {sid: FakeServer(sid) for sid in ids}
        self.placement = FakePlacement(ids, replicas)
        self.mirror = mirror
        self.backend = RemoteBackend(
            size=size,
            tenant="t",
            volume=0,
            placement=self.placement,
            replica_timeout=1.0,
            sealer=sealer,
            mirror=mirror,
            links=FakePool(self.servers),
        )

    def server(self, index: int) -> FakeServer:
        return self.servers[f"ps{index}"]

    def holders(self, slab: int) -> Iterator[FakeServer]:
        """The servers holding `slab`, its preferred reader first."""
        replicas = self.backend.slabs.replicas[slab] or []
        shift = slab % len(replicas) if replicas else 0
        for replica in replicas[shift:] + replicas[:shift]:
            yield self.servers[replica.server_id]

    async def write(self, page: int, count: int, version: int) -> None:
        await self.backend.pwrite(
            page * PAGE_SIZE, memoryview(pages_of(page, count, version)), False
        )

    async def read(self, page: int, count: int) -> list[int]:
        return versions(await self.backend.pread(page * PAGE_SIZE, count * PAGE_SIZE))


@asynccontextmanager
async def rig(*args: Any, **kwargs: Any) -> AsyncIterator[Rig]:
    made = Rig(*args, **kwargs)
    try:
        yield made
    finally:
        for server in made.servers.values():
            server.release()
        await made.backend.close()


async def turns_until(condition: Callable[[], bool], limit: int = 1000) -> None:
    """Let the loop run until `condition()` holds (a few turns: the fakes answer in one)."""
    for _ in range(limit):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")
