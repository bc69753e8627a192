"""The mirror in the whole system: every page server cut off (SIGSTOP: silent, like a network
partition), the data set read back from the mirror, writes going on during the outage, the
servers back, resync, then the mirror stopped and everything read back from the page servers.
Also a client SIGKILLed mid-workload and restarted: every acknowledged write is there.

Real processes on loopback: placement, three page servers, `remem mirror`, `remem client`,
driven through NBD by nbdcopy, qemu-io and a raw NBD client.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from .nbd_raw import RawNbd
from .placement_support import FAST
from .test_nbd_clients import need, qemu_io, run

MiB = 1 << 20
SIZE = 128 * MiB


@dataclass
class Cluster:
    """Placement, page servers, the mirror and the client, each its own process."""

    state: Path
    shm_dir: Path
    placement: ServiceProcess | None = None
    pageservers: list[ServiceProcess] = field(default_factory=list)
    mirror: ServiceProcess | None = None
    client: ServiceProcess | None = None

    @property
    def socket(self) -> Path:
        return self.state / "nbd.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///remem?socket={self.socket}"

    def start(self) -> None:
        self.placement = start_service(
            "placement",
            ["placement", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", *FAST],
        )
        for index in range(3):
            args = [
                "pageserver", "--capacity", "256MiB", "--listen", "tcp://127.0.0.1:0",
                "--metrics-port", "0", "--zone", f"z{index}",
                "--placement", self.placement.ready["endpoint"], "--server-id", f"ps-{index}",
                "--shm-path", str(self.shm_dir / f"ps-{index}.arena"), "--forget",
            ]  # fmt: skip
            self.pageservers.append(start_service(f"ps-{index}", args))
        self.start_mirror(forget=True)
        self.start_client()

    def start_mirror(self, forget: bool = False) -> None:
        args = ["mirror", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0",
                "--path", str(self.state / "mirror.img"), "--size", str(SIZE)]  # fmt: skip
        self.mirror = start_service("mirror", args + (["--forget"] if forget else []))

    def start_client(self) -> None:
        assert self.placement is not None and self.mirror is not None
        self.client = start_service(
            "client",
            ["client", "--backend", "remote", "--size", str(SIZE),
             "--placement", self.placement.ready["endpoint"],
             "--mirror", self.mirror.ready["endpoint"],
             "--nbd-socket", str(self.socket), "--metrics-port", "0",
             "--page-key", str(self.state / "page.key"),
             "--replica-timeout", "0.5", "--no-lock-memory"],
        )  # fmt: skip

    def client_metrics(self) -> dict[str, float]:
        assert self.client is not None
        return scrape_metrics(self.client.ready["metrics"])

    def stop(self) -> None:
        for service in [self.client, self.mirror, *self.pageservers, self.placement]:
            if service is not None and service.proc.poll() is None:
                service.kill(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                service.stop()


@pytest.fixture
def cluster(tmp_path: Path, shm_dir: Path) -> Iterator[Cluster]:
    running = Cluster(state=tmp_path, shm_dir=shm_dir)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition of a running system (not a fixed sleep) until it holds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def read_device(uri: str, path: Path, length: int) -> bytes:
    run([need("nbdcopy"), uri, str(path)], timeout=180)
    return path.read_bytes()[:length]


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_network_down_mirror_serves_then_resyncs(cluster: Cluster, tmp_path: Path) -> None:
    data_set = bytearray(os.urandom(32 * MiB))
    source = tmp_path / "source.img"
    source.write_bytes(data_set)
    run([need("nbdcopy"), "--flush", str(source), cluster.uri], timeout=180)
    wait_until(
        lambda: cluster.client_metrics()["client_mirror_cache_bytes"] == 0,
        30,
        "the mirror to confirm every page",
    )

    # Every page server goes silent at once.
    for server in cluster.pageservers:
        server.kill(signal.SIGSTOP)
    back = read_device(cluster.uri, tmp_path / "back.img", len(data_set))
    assert digest(back) == digest(bytes(data_set))
    metrics = cluster.client_metrics()
    assert metrics['client_mirror_pages_total{kind="read"}'] > 0

    # Writing goes on during the outage: acknowledged once on the mirror's disk.
    qemu_io(cluster.uri, f"write -P 0x5a {40 * MiB} {8 * MiB}", f"write -P 0x3c {4 * MiB} {MiB}")
    expected = data_set + bytes(16 * MiB)
    expected[40 * MiB : 48 * MiB] = b"\x5a" * (8 * MiB)
    expected[4 * MiB : 5 * MiB] = b"\x3c" * MiB
    metrics = cluster.client_metrics()
    assert metrics["client_unreplicated_pages"] == (8 * MiB + MiB) // 4096
    assert metrics['client_mode{mode="network_down"}'] == 1
    back = read_device(cluster.uri, tmp_path / "back2.img", len(expected))
    assert digest(back) == digest(bytes(expected))

    # The servers come back: the outage's pages go to their replicas.
    for server in cluster.pageservers:
        server.kill(signal.SIGCONT)
    wait_until(
        lambda: cluster.client_metrics()["client_unreplicated_pages"] == 0,
        60,
        "the resync of every mirror-only page",
    )
    metrics = cluster.client_metrics()
    assert metrics['client_mode{mode="normal"}'] == 1
    assert metrics['client_mirror_pages_total{kind="resynced"}'] >= (8 * MiB + MiB) // 4096

    # Without the mirror, the page servers alone serve every byte.
    assert cluster.mirror is not None
    assert cluster.mirror.stop() == 0
    back = read_device(cluster.uri, tmp_path / "back3.img", len(expected))
    assert digest(back) == digest(bytes(expected))


def test_client_sigkilled_mid_workload_keeps_every_acknowledged_write(cluster: Cluster) -> None:
    block = 64 * 1024
    acknowledged: list[int] = []
    stop = threading.Event()

    def content(index: int) -> bytes:
        return hashlib.sha256(index.to_bytes(8, "little")).digest() * (block // 32)

    def writer() -> None:
        try:
            with RawNbd.unix(str(cluster.socket)) as nbd:
                nbd.connect()
                for index in range(SIZE // block):
                    if stop.is_set():
                        return
                    nbd.write(index * block, content(index))  # returns once acknowledged
                    acknowledged.append(index)
        except (OSError, EOFError):
            return  # the client died under us: what was acknowledged must survive

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    wait_until(lambda: len(acknowledged) >= 200, 60, "200 acknowledged writes")
    assert cluster.client is not None
    cluster.client.kill(signal.SIGKILL)
    thread.join(timeout=30)
    stop.set()
    done = list(acknowledged)
    assert 200 <= len(done) < SIZE // block

    cluster.start_client()
    with RawNbd.unix(str(cluster.socket)) as nbd:
        nbd.connect()
        for index in done:
            assert nbd.read(index * block, block) == content(index), f"block {index}"


def test_page_outs_reach_the_mirror_batched_and_whole(cluster: Cluster, tmp_path: Path) -> None:
    """4K random writes at queue depth 32 go to the mirror many to a message, and the mirror
    ends up holding exactly what the device holds."""
    writes = 6000
    run(
        [need("fio"), "--name=pageouts", "--ioengine=nbd", f"--uri={cluster.uri}",
         "--rw=randwrite", "--bs=4k", "--iodepth=32", f"--size={SIZE}",
         f"--number_ios={writes}", "--randrepeat=0", "--output-format=terse"],
        timeout=300,
    )  # fmt: skip
    assert cluster.mirror is not None
    nbd_writes = cluster.client_metrics()['client_nbd_requests_total{cmd="write",result="ok"}']
    assert nbd_writes >= writes

    def mirror() -> dict[str, float]:
        return scrape_metrics(cluster.mirror.ready["metrics"])  # type: ignore[union-attr]

    # Write-behind: the mirror confirms after the client acknowledged.
    wait_until(
        lambda: mirror()["mirror_written_bytes_total"] >= nbd_writes * 4096,
        60,
        "the mirror to have every page-out on disk",
    )
    requests = mirror()["mirror_write_requests_total"]
    assert requests <= nbd_writes / 4, f"{requests} mirror writes for {nbd_writes} page-outs"
    device = read_device(cluster.uri, tmp_path / "device.img", SIZE)
    assert digest((cluster.state / "mirror.img").read_bytes()[:SIZE]) == digest(device)
