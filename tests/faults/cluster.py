"""The fault suite's cluster: placement, page servers, the mirror and the client as separate
processes, each of which a test can SIGKILL, SIGSTOP, restart or cut off; and the workloads
that check data identity through NBD (fio with crc32c verification, nbdcopy round trips).

Every process listens on a port fixed at creation, so a restarted one comes back at the same
endpoint, and a restarted page server reopens the same arena file (its pages survive a
SIGKILL). Page servers may run under a command prefix (`ip netns exec NS`) with their own
listen address, which is how the partition test puts them behind a veth pair.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from remem_common.pageserver_client import PageServerClient
from remem_common.placement_requests import BlockingPlacementClient
from remem_common.protocol.admin_placement import GetStatusReply
from remem_common.protocol.client_placement import GetMapReply
from remem_common.protocol.pages import make_keys
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from ..integration.nbd_raw import RawNbd

MiB = 1 << 20
SIZE = 256 * MiB  # four 64 MiB slabs: a workload spread over them touches every server
TENANT = "faults"
VOLUME = 0
REPLICA_TIMEOUT = 0.5
# Placement scaled to small arenas and quick decisions (see tests/integration/placement_support).
# A push waits for the client to acknowledge the map listing its target (the client polls
# every 0.5 s and at once after a failure); --map-settle is only the fallback for a client
# that never polls, after which writes may miss the new copy. Long here, so every push
# waits for the acknowledgement, as it does in a healthy system.
PLACEMENT_POLICY = [
    "--heartbeat-interval", "0.25",
    "--min-free", "16MiB",
    "--alloc-reserve", "16MiB",
    "--scrape-interval", "0.5",
    "--map-settle", "10",
]  # fmt: skip

T = TypeVar("T")


def need(tool: str) -> str:
    path = shutil.which(tool)
    assert path is not None, f"{tool} is not installed (make deps)"
    return path


def run(args: list[str], timeout: float = 180) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{args[0]} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    return result.stdout


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago: fixed across a service's restarts."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(what: str, check: Callable[[], T | None], timeout: float) -> T:
    """Poll a condition of the running system every 0.1 s until it holds (never a fixed
    sleep); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class PageServerSpec:
    """How to (re)start one page server: same id, port and arena every time."""

    name: str
    zone: str
    host: str = "127.0.0.1"
    port: int = 0
    prefix: list[str] = field(default_factory=list)


@dataclass
class FaultCluster:
    """Placement, page servers, optionally the mirror, and the client; all restartable."""

    state: Path
    shm_dir: Path
    placement_host: str = "127.0.0.1"
    with_mirror: bool = False
    restart_grace: float = 1.0
    placement_port: int = 0
    specs: dict[str, PageServerSpec] = field(default_factory=dict)
    placement: ServiceProcess | None = None
    pageservers: dict[str, ServiceProcess] = field(default_factory=dict)
    mirror: ServiceProcess | None = None
    client: ServiceProcess | None = None
    mirror_port: int = 0

    # -- processes -------------------------------------------------------------------------

    @property
    def placement_endpoint(self) -> str:
        return f"tcp://{self.placement_host}:{self.placement_port}"

    @property
    def socket(self) -> Path:
        return self.state / "nbd.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///remem?socket={self.socket}"

    def start_placement(self) -> ServiceProcess:
        if not self.placement_port:
            self.placement_port = free_port(self.placement_host)
        self.placement = start_service(
            "placement",
            ["placement", "--listen", self.placement_endpoint, "--metrics-port", "0",
             "--restart-grace", str(self.restart_grace), *PLACEMENT_POLICY],
        )  # fmt: skip
        return self.placement

    def add_pageserver(self, spec: PageServerSpec) -> ServiceProcess:
        if not spec.port:
            # Inside a namespace its address is not the host's: any port free here will do
            # (nothing else listens in there).
            spec.port = free_port("127.0.0.1" if spec.prefix else spec.host)
        self.specs[spec.name] = spec
        return self.start_pageserver(spec.name, forget=True)

    def start_pageserver(self, name: str, *, forget: bool = False) -> ServiceProcess:
        """Start (or restart, on the same port and arena) the page server `name`."""
        spec = self.specs[name]
        args = [
            "pageserver", "--capacity", "160MiB",
            "--listen", f"tcp://{spec.host}:{spec.port}",
            "--metrics-host", spec.host, "--metrics-port", "0", "--zone", spec.zone,
            "--placement", self.placement_endpoint, "--server-id", name,
            "--shm-path", str(self.arena(name)),
        ]  # fmt: skip
        service = start_service(name, args + (["--forget"] if forget else []), prefix=spec.prefix)
        self.pageservers[name] = service
        return service

    def arena(self, name: str) -> Path:
        return self.shm_dir / f"{name}.arena"

    def start_mirror(self, *, forget: bool = False) -> ServiceProcess:
        if not self.mirror_port:
            self.mirror_port = free_port()
        args = ["mirror", "--listen", f"tcp://127.0.0.1:{self.mirror_port}",
                "--metrics-port", "0", "--path", str(self.state / "mirror.img"),
                "--size", str(SIZE)]  # fmt: skip
        self.mirror = start_service("mirror", args + (["--forget"] if forget else []))
        return self.mirror

    def start_client(self) -> ServiceProcess:
        args = [
            "client", "--backend", "remote", "--size", str(SIZE),
            "--tenant", TENANT, "--volume", str(VOLUME),
            "--placement", self.placement_endpoint,
            "--nbd-socket", str(self.socket), "--metrics-port", "0",
            "--replica-timeout", str(REPLICA_TIMEOUT), "--map-poll-interval", "0.5",
            "--no-lock-memory", "--page-key", str(self.state / "page.key"),
        ]  # fmt: skip
        if self.with_mirror:
            args += ["--mirror", f"tcp://127.0.0.1:{self.mirror_port}"]
        self.client = start_service("client", args)
        return self.client

    def start(self, pageservers: list[PageServerSpec]) -> None:
        self.start_placement()
        for spec in pageservers:
            self.add_pageserver(spec)
        self.wait_registered(set(self.specs))
        if self.with_mirror:
            self.start_mirror(forget=True)
        self.start_client()

    def stop(self) -> None:
        """Stop whatever still runs (teardown): resume stopped ones so SIGTERM can act."""
        for service in [self.client, self.mirror, *self.pageservers.values(), self.placement]:
            if service is not None and service.proc.poll() is None:
                service.kill(signal.SIGCONT)
                try:
                    service.stop(timeout=20)
                except Exception:  # teardown: stop the rest before reporting
                    service.proc.kill()

    # -- observing -------------------------------------------------------------------------

    def print_logs(self, lines: int = 150) -> None:
        """The last lines each process printed (for a failed test's report)."""
        for service in [self.placement, *self.pageservers.values(), self.mirror, self.client]:
            if service is not None:
                tail = "\n".join(service.log().splitlines()[-lines:])
                print(f"----- {service.name} (pid {service.pid}) -----\n{tail}")

    def client_metrics(self) -> dict[str, float]:
        assert self.client is not None
        return scrape_metrics(self.client.ready["metrics"])

    def mirror_metrics(self) -> dict[str, float]:
        assert self.mirror is not None
        return scrape_metrics(self.mirror.ready["metrics"])

    def scrape_pageserver(self, name: str) -> dict[str, float]:
        return scrape_metrics(self.pageservers[name].ready["metrics"])

    def nbd_errors(self) -> float:
        """NBD requests the client answered with an error, every command."""
        metrics = self.client_metrics()
        return sum(v for k, v in metrics.items() if 'result="error"' in k)

    def status(self) -> GetStatusReply:
        with BlockingPlacementClient(self.placement_endpoint) as admin:
            return admin.status()

    def slab_map(self) -> GetMapReply:
        with BlockingPlacementClient(self.placement_endpoint) as admin:
            return admin.get_map(TENANT, VOLUME)

    def wait_registered(self, names: set[str], timeout: float = 30) -> None:
        def ready() -> bool:
            status = self.status()
            seen = {
                s.server_id
                for s in status.servers
                if s.state == "live" and s.utilization_from == "metrics"
            }
            return names <= seen and not status.in_grace

        wait_until(f"page servers {sorted(names)} live", ready, timeout)

    def wait_fully_replicated(self, slabs: int, timeout: float = 60) -> GetMapReply:
        """Until placement's map lists `slabs` slabs, each with 2 replicas on live servers,
        nothing degraded and no push in flight."""
        live_states = ("live",)

        def replicated() -> GetMapReply | None:
            status = self.status()
            live = {s.server_id for s in status.servers if s.state in live_states}
            if status.degraded or status.pushes:
                return None
            slab_map = self.slab_map()
            ok = len(slab_map.slabs) == slabs and all(
                len(replicas) == 2 and set(replicas) <= live and not filling
                for _, replicas, filling in slab_map.slabs
            )
            return slab_map if ok else None

        return wait_until(f"{slabs} slabs at 2 live replicas", replicated, timeout)

    def holders(self) -> dict[str, list[int]]:
        """server id -> slabs placement lists on it."""
        held: dict[str, list[int]] = {}
        for slab, replicas, _ in self.slab_map().slabs:
            for server_id in replicas:
                held.setdefault(server_id, []).append(slab)
        return held


# -- workloads -----------------------------------------------------------------------------

# Four fio jobs (four NBD connections), each writing 16 MiB of 64 KiB blocks in its own slab:
# every slab, so every page server, carries part of the data set.
FIO_SPREAD = [
    "--name=spread", "--numjobs=4", "--rw=randwrite", "--bs=64k", "--iodepth=8",
    "--size=16M", "--offset_increment=64M", "--verify=crc32c", "--verify_fatal=1",
    "--group_reporting=0",
]  # fmt: skip
FIO_SPREAD_BYTES = 4 * (16 << 20)  # what FIO_SPREAD writes and verifies


@dataclass
class FioRun:
    """A fio process running in the background; `wait` checks and returns its report."""

    proc: subprocess.Popen[str]
    args: list[str]
    started: float

    def wait(self, timeout: float = 240) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        self.seconds = time.monotonic() - self.started
        assert self.proc.returncode == 0, (
            f"fio failed ({self.proc.returncode}):\n{err}\n{out[-3000:]}"
        )
        report: dict[str, Any] = json.loads(out[out.index("{") :])
        for job in report["jobs"]:
            assert job["error"] == 0, job
        return report

    def running(self) -> bool:
        return self.proc.poll() is None


def start_fio(uri: str, *args: str) -> FioRun:
    command = [need("fio"), "--ioengine=nbd", f"--uri={uri}", "--output-format=json",
               "--verify_state_save=0", *args]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return FioRun(proc=proc, args=command, started=time.monotonic())


def fio(uri: str, *args: str) -> dict[str, Any]:
    return start_fio(uri, *args).wait()


def verified_bytes(report: dict[str, Any]) -> int:
    """Bytes fio read back and checked (its verify phase counts as reads)."""
    return sum(int(job["read"]["io_bytes"]) for job in report["jobs"])


def max_latency_seconds(report: dict[str, Any]) -> float:
    """The slowest single I/O of any job, read or write (completion latency)."""
    worst = 0
    for job in report["jobs"]:
        for direction in ("read", "write"):
            clat = job[direction]["clat_ns"]
            if job[direction]["total_ios"]:
                worst = max(worst, int(clat["max"]))
    return worst / 1e9


def data_set(size: int, seed: bytes) -> bytes:
    """`size` deterministic pseudo-random bytes (a known data set to write and compare)."""
    return b"".join(
        hashlib.shake_256(seed + block.to_bytes(4, "little")).digest(MiB)
        for block in range(-(-size // MiB))
    )[:size]


def write_through(socket_path: Path, offset: int, data: bytes, timeout: float = 30) -> None:
    """Write `data` at `offset` on a new NBD connection, 1 MiB per request; each one
    returns once the client acknowledged it."""
    with RawNbd.unix(str(socket_path), timeout=timeout) as nbd:
        nbd.connect()
        for start in range(0, len(data), MiB):
            nbd.write(offset + start, data[start : start + MiB])
        nbd.disconnect()


def read_back(socket_path: Path, offset: int, length: int, timeout: float = 30) -> bytes:
    """`length` bytes at `offset`, read on a new NBD connection in 1 MiB requests."""
    out = bytearray()
    with RawNbd.unix(str(socket_path), timeout=timeout) as nbd:
        nbd.connect()
        for start in range(offset, offset + length, MiB):
            out += nbd.read(start, min(MiB, offset + length - start))
        nbd.disconnect()
    return bytes(out)


def assert_replicas_identical(cluster: FaultCluster, pages: int) -> None:
    """Every replica placement lists for a slab holds pages 0..pages-1 of it, byte for byte
    the same as the slab's other replicas (read from each page server directly)."""
    slab_map = cluster.slab_map()
    for slab, replicas, _ in slab_map.slabs:
        copies = []
        for server_id in replicas:
            with PageServerClient(slab_map.servers[server_id]) as client:
                parts = []
                for start in range(0, pages, 1024):
                    stop = min(pages, start + 1024)
                    keys = make_keys([slab] * (stop - start), range(start, stop))
                    found, _crcs, data = client.get(TENANT, VOLUME, keys)
                    assert found.all(), f"slab {slab}: pages missing on {server_id}"
                    parts.append(data.tobytes())
            copies.append((server_id, digest(b"".join(parts))))
        assert len({d for _, d in copies}) == 1, f"slab {slab}: replicas differ: {copies}"
