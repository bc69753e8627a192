"""Page encryption in the whole system: what a page server holds, and a tampered page.

Real processes on loopback: placement, three page servers (arenas in a private /dev/shm
folder, which the test reads and alters as someone with access to a donor host could), and
`remem client` (two replicas, no mirror: a page that fails authentication must come from
the other replica), driven through NBD by nbdcopy and qemu-io.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import crc32c
import numpy as np
import pytest
from remem_common.protocol.pages import PAGE_SIZE, SLAB_PAGES
from remem_common.testing import ServiceProcess, scrape_metrics, start_service
from remem_pageserver.store import HEADER, SLOT_DTYPE, SLOT_USED, TENANT_ENTRY_BYTES, TENANTS_OFFSET

from .nbd_raw import RawNbd
from .placement_support import FAST, status_of, wait_until
from .test_nbd_clients import need, qemu_io, run

MiB = 1 << 20
SIZE = 64 * MiB  # one slab: every page lives on the same two of the three servers
SECRET = b"remem-secret-page-"


@dataclass
class Cluster:
    state: Path
    shm_dir: Path
    placement: ServiceProcess | None = None
    pageservers: list[ServiceProcess] = field(default_factory=list)
    clients: list[ServiceProcess] = field(default_factory=list)

    def socket(self, tenant: str) -> Path:
        return self.state / f"{tenant}.sock"

    def start(self) -> None:
        self.placement = start_service(
            "placement",
            ["placement", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", *FAST],
        )
        for index in range(3):
            args = [
                "pageserver", "--capacity", "128MiB", "--listen", "tcp://127.0.0.1:0",
                "--metrics-port", "0", "--zone", f"z{index}",
                "--placement", self.placement.ready["endpoint"], "--server-id", f"ps-{index}",
                "--shm-path", str(self.arena(index)), "--forget",
            ]  # fmt: skip
            self.pageservers.append(start_service(f"ps-{index}", args))

    def arena(self, index: int) -> Path:
        return self.shm_dir / f"ps-{index}.arena"

    def start_client(self, tenant: str, *extra: str) -> ServiceProcess:
        assert self.placement is not None
        client = start_service(
            f"client-{tenant}",
            ["client", "--backend", "remote", "--size", str(SIZE), "--tenant", tenant,
             "--placement", self.placement.ready["endpoint"],
             "--nbd-socket", str(self.socket(tenant)), "--metrics-port", "0",
             "--replica-timeout", "2", "--no-lock-memory", *extra],
        )  # fmt: skip
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for service in [*self.clients, *self.pageservers, self.placement]:
            if service is not None and service.proc.poll() is None:
                service.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    state = tmp_path_factory.mktemp("encryption")
    shm_dir = Path("/dev/shm") / f"remem-test-enc-{uuid.uuid4().hex[:12]}"
    shm_dir.mkdir()
    running = Cluster(state=state, shm_dir=shm_dir)
    try:
        running.start()
        yield running
    finally:
        running.stop()
        for child in shm_dir.iterdir():
            child.unlink()
        shm_dir.rmdir()


@pytest.fixture(scope="module")
def sealed_client(cluster: Cluster) -> ServiceProcess:
    return cluster.start_client("sealed", "--page-key", str(cluster.state / "page.key"))


def patterned(marker: bytes, first_page: int, count: int) -> bytes:
    """Pages that each say what they are, over and over: easy to find in a memory dump."""
    out = bytearray()
    for page in range(first_page, first_page + count):
        line = marker + b"%08d|" % page
        out += (line * (PAGE_SIZE // len(line) + 1))[:PAGE_SIZE]
    return bytes(out)


def write_pages(uri: str, tmp_path: Path, first_page: int, data: bytes) -> None:
    source = tmp_path / f"source-{first_page}.img"
    source.write_bytes(data)
    offset = first_page * PAGE_SIZE
    qemu_io(uri, f"write -s {source} {offset} {len(data)}", "flush")


def read_pages(socket_path: Path, first_page: int, count: int) -> bytes:
    """One NBD read of the pages (over 64 pages: the client's general read path)."""
    with RawNbd.unix(str(socket_path)) as nbd:
        nbd.connect()
        return nbd.read(first_page * PAGE_SIZE, count * PAGE_SIZE)


@dataclass
class Arena:
    """A page server's arena file as anyone with access to the donor host can read it."""

    raw: np.memmap
    tenants: dict[str, int]
    slots: np.ndarray
    data: np.ndarray

    @classmethod
    def open(cls, path: Path) -> Arena:
        raw = np.memmap(path, dtype=np.uint8, mode="r+")
        _magic, _fmt, _page, capacity, slots_off, data_off = HEADER.unpack(
            raw[: HEADER.size].tobytes()
        )
        tenants = {}
        for index in range(1024):
            row = raw[TENANTS_OFFSET + index * TENANT_ENTRY_BYTES :][:TENANT_ENTRY_BYTES]
            if not row[0]:
                break
            tenants[bytes(row[1 : 1 + row[0]]).decode()] = index
        slots = raw[slots_off : slots_off + capacity * SLOT_DTYPE.itemsize].view(SLOT_DTYPE)
        data = raw[data_off : data_off + capacity * PAGE_SIZE].reshape(capacity, PAGE_SIZE)
        return cls(raw, tenants, slots, data)

    def used(self, tenant: str) -> np.ndarray:
        """Slot numbers holding pages of `tenant`."""
        if tenant not in self.tenants:
            return np.empty(0, dtype=np.intp)
        mine = (self.slots["state"] == SLOT_USED) & (self.slots["tenant"] == self.tenants[tenant])
        return np.flatnonzero(mine)

    def slot_of(self, tenant: str, slab: int, page: int) -> int | None:
        used = self.used(tenant)
        hit = used[(self.slots["slab"][used] == slab) & (self.slots["page"][used] == page)]
        return int(hit[0]) if hit.size else None

    def contains(self, needle: bytes) -> bool:
        return needle in self.data.tobytes()


def test_page_servers_hold_only_ciphertext(
    cluster: Cluster, sealed_client: ServiceProcess, tmp_path: Path
) -> None:
    count = 2048  # 8 MiB
    data = patterned(SECRET, 0, count)
    write_pages(sealed_client.ready["nbd_uri"], tmp_path, 0, data)
    whole = tmp_path / "back.img"
    run([need("nbdcopy"), sealed_client.ready["nbd_uri"], str(whole)], timeout=180)
    assert whole.read_bytes()[: len(data)] == data

    arenas = [Arena.open(cluster.arena(index)) for index in range(3)]
    holders = [arena for arena in arenas if arena.used("sealed").size]
    assert len(holders) == 2  # two replicas of the one slab
    for arena in holders:
        assert arena.used("sealed").size >= count  # every page is there...
    for arena in arenas:
        assert not arena.contains(SECRET)  # ...and none of it readable
    metrics = scrape_metrics(sealed_client.ready["metrics"])
    assert metrics["client_page_encryption"] == 1

    # The check can fail: a client told not to encrypt leaves its pages readable.
    plain_client = cluster.start_client("plain", "--no-encrypt-pages")
    visible = patterned(b"remem-visible-page-", 0, 16)
    write_pages(plain_client.ready["nbd_uri"], tmp_path, 0, visible)
    assert any(Arena.open(cluster.arena(i)).contains(b"remem-visible-page-") for i in range(3))
    assert scrape_metrics(plain_client.ready["metrics"])["client_page_encryption"] == 0
    plain_client.stop()
    assert not any(Arena.open(cluster.arena(i)).contains(SECRET) for i in range(3))


def test_a_tampered_page_is_read_from_the_other_replica(
    cluster: Cluster, sealed_client: ServiceProcess, tmp_path: Path
) -> None:
    uri = sealed_client.ready["nbd_uri"]
    first = 4096  # 16 MiB in: apart from the other tests' pages
    data = patterned(b"remem-tamper-page-", first, 128)
    write_pages(uri, tmp_path, first, data)
    before = scrape_metrics(sealed_client.ready["metrics"])["client_page_auth_failures_total"]

    # Each replica gets pages altered, different ones on each, with their checksums fixed up
    # so only the AEAD tag can tell: whichever replica a read prefers, one altered copy is
    # read, and the other replica holds that page intact. The client then writes the intact
    # copy back over the altered one (read repair), so each phase alters fresh pages.
    holders = [
        arena
        for arena in (Arena.open(cluster.arena(i)) for i in range(3))
        if arena.slot_of("sealed", 0, first) is not None
    ]
    assert len(holders) == 2

    def tamper(pages: tuple[int, int]) -> None:
        for arena, page in zip(holders, pages, strict=True):
            slot = arena.slot_of("sealed", first // SLAB_PAGES, page % SLAB_PAGES)
            assert slot is not None
            arena.data[slot, 100:108] ^= 0x5A
            arena.slots["crc"][slot] = crc32c.crc32c(arena.data[slot].tobytes())
            arena.raw.flush()

    def auth_failures() -> float:
        return scrape_metrics(sealed_client.ready["metrics"])["client_page_auth_failures_total"]

    def repaired() -> float:
        metrics = scrape_metrics(sealed_client.ready["metrics"])
        return metrics['client_read_repairs_total{result="ok"}']

    socket_path = cluster.socket("sealed")
    tamper((first + 1, first + 2))
    repairs_before = repaired()
    assert read_pages(socket_path, first, 128) == data  # the general read path
    after_bulk = auth_failures()
    assert after_bulk >= before + 1
    deadline = time.monotonic() + 30
    while repaired() < repairs_before + 1:  # the altered copy read is replaced by the intact one
        assert time.monotonic() < deadline, "no read repair after an authentication failure"
        time.sleep(0.1)
    # Single-page reads take the client's fast path, which hands over to the general one.
    tamper((first + 5, first + 6))
    for page in (first + 5, first + 6):
        offset = (page - first) * PAGE_SIZE
        assert read_pages(socket_path, page, 1) == data[offset : offset + PAGE_SIZE]
    assert auth_failures() >= after_bulk + 1
    assert sealed_client.proc.poll() is None


def test_a_re_replicated_page_still_decrypts(
    cluster: Cluster, sealed_client: ServiceProcess, tmp_path: Path
) -> None:
    """A slab pushed from page server to page server keeps its pages' seals: with the one
    original replica left silenced, the pushed copy alone serves (and authenticates)."""
    assert cluster.placement is not None
    uri = sealed_client.ready["nbd_uri"]
    first = 6144
    data = patterned(b"remem-pushed-page-", first, 128)
    write_pages(uri, tmp_path, first, data)
    holders = [
        index
        for index in range(3)
        if Arena.open(cluster.arena(index)).slot_of("sealed", 0, first) is not None
    ]
    assert len(holders) == 2
    victim, survivor = holders
    (newcomer,) = set(range(3)) - set(holders)
    cluster.pageservers[victim].kill(signal.SIGKILL)

    def repaired() -> int:
        if Arena.open(cluster.arena(newcomer)).slot_of("sealed", 0, first) is None:
            return 0  # placement has not noticed yet, or the push has not begun
        status = status_of(cluster.placement)  # type: ignore[arg-type]
        return status.epoch if not status.degraded and not status.pushes else 0

    epoch = wait_until("the slab re-replicated onto the third server", repaired, timeout=60)

    def client_has_map() -> bool:
        metrics = scrape_metrics(sealed_client.ready["metrics"])
        return metrics["client_map_epoch"] >= epoch

    # Until the client has that map, the newcomer is only a write target to it.
    wait_until("the client to apply the repaired map", client_has_map, timeout=30)
    before = scrape_metrics(sealed_client.ready["metrics"])["client_page_auth_failures_total"]
    cluster.pageservers[survivor].kill(signal.SIGSTOP)  # silent: only the pushed copy answers
    try:
        assert read_pages(cluster.socket("sealed"), first, 128) == data
    finally:
        cluster.pageservers[survivor].kill(signal.SIGCONT)
    metrics = scrape_metrics(sealed_client.ready["metrics"])
    assert metrics["client_page_auth_failures_total"] == before


def test_a_restarted_client_still_decrypts(
    cluster: Cluster, sealed_client: ServiceProcess, tmp_path: Path
) -> None:
    """The key and nonce state on the client host are all a restarted client needs, and
    it starts past every nonce the killed one may have used."""
    uri = sealed_client.ready["nbd_uri"]
    first = 8192
    data = patterned(b"remem-restart-page-", first, 4)
    write_pages(uri, tmp_path, first, data)
    sealed_client.kill(signal.SIGKILL)
    sealed_client.proc.wait(timeout=10)
    cluster.clients.remove(sealed_client)
    again = cluster.start_client("sealed", "--page-key", str(cluster.state / "page.key"))
    assert read_pages(cluster.socket("sealed"), first, 4) == data
    later = patterned(b"remem-restart-page-", first + 4, 4)
    write_pages(again.ready["nbd_uri"], tmp_path, first + 4, later)
    assert read_pages(cluster.socket("sealed"), first, 8) == data + later
    # The re-replication test may have left a slab push running (a server stopped there
    # for long can be declared dead and refilled): compare arenas once placement is settled.
    assert cluster.placement is not None

    def settled() -> bool:
        status = status_of(cluster.placement)  # type: ignore[arg-type]
        return not status.degraded and not status.pushes

    wait_until("placement to have every slab whole", settled, timeout=60)
    # Every page an arena holds, from before and after the kill, has its own nonce.
    holders = 0
    for index in range(3):
        if cluster.pageservers[index].proc.poll() is not None:
            continue  # the server the re-replication test killed
        arena = Arena.open(cluster.arena(index))
        if arena.slot_of("sealed", 0, first) is None:
            continue  # not a replica of the slab
        holders += 1
        for page in range(first, first + 8):  # sealed before and after the restart
            assert arena.slot_of("sealed", 0, page) is not None
        nonces = arena.slots["seal"][arena.used("sealed"), :12]
        assert np.unique(nonces, axis=0).shape[0] == nonces.shape[0]
    assert holders == 2
