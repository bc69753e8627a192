"""A client restart hands its NBD connections to the next process: the peer sees no disconnect.

`remem-client.service` (deploy/systemd) runs under the stand-in service manager of
tests/system/vm/units.py, which keeps a file-descriptor store as systemd 252 does, over a
remote backend (placement and three page servers on loopback). A libnbd client (nbdsh's
Python bindings, in the system Python) streams overlapping writes and verified reads, 16 in
flight, while the client is restarted twice: no request may fail, every byte must verify,
and the socket is the same one from start to end (libnbd never reconnects). Raw requests
cut in the middle (a header, a big WRITE's payload) cross the restart exactly. A full stop
empties the store and closes the connection; a second SIGTERM ends a handover at once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from remem_client.nbd import wire
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from ..system.vm.units import ServiceUnit, UnitFile, write_environment_file
from .nbd_raw import RawNbd
from .placement_support import FAST, wait_registered
from .test_nbd_clients import need

UNITS = Path(__file__).resolve().parents[2] / "deploy/systemd"
REMEM = str(Path(sys.executable).with_name("remem"))
MiB = 1 << 20
SIZE = 64 * MiB
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-libnbd's bindings live in Debian's Python

LOAD = textwrap.dedent(
    """
    import json, os, random, struct, sys
    import nbd

    uri, stop_path = sys.argv[1], sys.argv[2]
    BLOCK, BLOCKS, DEPTH = 4096, 2048, 16
    h = nbd.NBD()
    h.connect_uri(uri)
    fd = h.aio_get_fd()
    inode = os.fstat(fd).st_ino
    print("START", inode, flush=True)
    version = [0] * BLOCKS
    busy = set()
    inflight = []  # (cookie, kind, first, count, buffer, versions)
    rng = random.Random(7)
    done = errors = bad = 0

    def content(first, versions):
        # a block never written reads as zeros
        return b"".join(
            (struct.pack(">QQ", first + i, v) if v else bytes(16)) * (BLOCK // 16)
            for i, v in enumerate(versions)
        )

    def issue():
        count = rng.choice((1, 1, 2, 8, 32))  # 32 blocks: a 128 KiB WRITE, its own buffer
        first = rng.randrange(BLOCKS - count)
        blocks = range(first, first + count)
        if busy.intersection(blocks):
            return
        busy.update(blocks)
        if rng.random() < 0.5:
            for b in blocks:
                version[b] += 1
            versions = [version[b] for b in blocks]
            buf = nbd.Buffer.from_bytearray(bytearray(content(first, versions)))
            cookie = h.aio_pwrite(buf, first * BLOCK)
            inflight.append((cookie, "w", first, count, buf, versions))
        else:
            versions = [version[b] for b in blocks]
            buf = nbd.Buffer(count * BLOCK)
            cookie = h.aio_pread(buf, first * BLOCK)
            inflight.append((cookie, "r", first, count, buf, versions))

    def reap():
        global done, errors, bad
        for entry in list(inflight):
            cookie, kind, first, count, buf, versions = entry
            try:
                if not h.aio_command_completed(cookie):
                    continue
            except nbd.Error as exc:
                errors += 1
                print("ERROR", kind, first, count, exc, flush=True)
            else:
                if kind == "r" and buf.to_bytearray() != content(first, versions):
                    bad += 1
                    got = bytes(buf.to_bytearray()[:16])
                    print("BAD", first, count, versions[0], struct.unpack(">QQ", got), flush=True)
            inflight.remove(entry)
            busy.difference_update(range(first, first + count))
            done += 1
            if done % 500 == 0:
                print("DONE", done, flush=True)

    while not os.path.exists(stop_path):
        while len(inflight) < DEPTH:
            issue()
        h.poll(-1)
        reap()
    while inflight:
        h.poll(-1)
        reap()
    final = 0
    for first in range(0, BLOCKS, 256):
        data = h.pread(256 * BLOCK, first * BLOCK)
        if data != content(first, version[first : first + 256]):
            final += 1
    same = os.fstat(fd).st_ino == inode and h.aio_get_fd() == fd
    h.shutdown()
    print(json.dumps({"requests": done, "errors": errors, "bad_reads": bad,
                      "bad_final": final, "same_socket": same}), flush=True)
    """
)


@pytest.fixture(scope="module")
def placement(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Placement and three page servers; yields placement's endpoint."""
    shm = tmp_path_factory.mktemp("shm-link")
    arenas = Path("/dev/shm") / f"remem-handover-{os.getpid()}-{shm.name}"
    arenas.mkdir()
    started: list[ServiceProcess] = []
    try:
        central = start_service(
            "placement",
            ["placement", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0",
             "--heartbeat-interval", "0.25", *FAST],
        )  # fmt: skip
        started.append(central)
        for index in range(3):
            started.append(
                start_service(
                    f"ps-{index}",
                    [
                        "pageserver",
                        "--capacity",
                        "128MiB",
                        "--listen",
                        "tcp://127.0.0.1:0",
                        "--metrics-port",
                        "0",
                        "--zone",
                        f"z{index}",
                        "--placement",
                        central.ready["endpoint"],
                        "--server-id",
                        f"ps-{index}",
                        "--shm-path",
                        str(arenas / f"ps-{index}.arena"),
                        "--forget",
                    ],
                )
            )
        wait_registered(central, {f"ps-{index}" for index in range(3)})
        yield central.ready["endpoint"]
    finally:
        for service in reversed(started):
            service.stop(timeout=30)
        shutil.rmtree(arenas, ignore_errors=True)


@pytest.fixture
def client_unit(tmp_path: Path, placement: str) -> Iterator[ServiceUnit]:
    """remem-client.service over the cluster (its own volume), not started yet."""
    unit = UnitFile.load(UNITS / "remem-client.service")
    (env_name,) = unit.values("Service", "EnvironmentFile")
    env_file = tmp_path / "client.env"
    write_environment_file(
        env_file,
        {
            "REMEM_CLIENT_BACKEND": "remote",
            "REMEM_CLIENT_SIZE": str(SIZE),
            "REMEM_CLIENT_PLACEMENT": placement,
            "REMEM_CLIENT_TENANT": "handover",
            "REMEM_CLIENT_VOLUME": str(abs(hash(tmp_path.name)) % 1000),
            "REMEM_CLIENT_NBD_SOCKET": str(tmp_path / "nbd.sock"),
            "REMEM_CLIENT_PAGE_KEY": str(tmp_path / "page.key"),
            "REMEM_CLIENT_METRICS_PORT": "0",
            "REMEM_CLIENT_INSECURE": "1",
            "REMEM_CLIENT_LOCK_MEMORY": "false",
        },
    )
    service = ServiceUnit(
        unit=unit,
        executables={"/usr/local/bin/remem": REMEM},
        files={env_name: env_file},
        runtime=tmp_path,
        log_path=tmp_path / "client.log",
    )
    try:
        yield service
    finally:
        service.kill()


def uri_of(unit: ServiceUnit) -> str:
    for field in unit.status.split():
        if field.startswith("nbd_uri="):
            return field.removeprefix("nbd_uri=")
    raise AssertionError(f"no nbd_uri in STATUS={unit.status!r}")


def socket_path(unit: ServiceUnit) -> str:
    return uri_of(unit).partition("socket=")[2]


def metrics(unit: ServiceUnit) -> dict[str, float]:
    fields = dict(f.partition("=")[::2] for f in unit.status.split() if "=" in f)
    return scrape_metrics(fields["metrics"])


def served(samples: dict[str, float]) -> int:
    return int(sum(v for k, v in samples.items() if k.startswith("client_nbd_requests_total{")))


class LineReader:
    """A process's stdout lines, read by a thread; `wait_for` blocks until one matches."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def close(self) -> None:
        """Once the process is gone: finish reading and close the pipe."""
        self._thread.join(timeout=10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def wait_for(self, prefix: str, after: int = 0, timeout: float = 60) -> int:
        """Index of the first line from `after` on that starts with `prefix`."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for index in range(after, len(self.lines)):
                    if self.lines[index].startswith(prefix):
                        return index
                if not self._thread.is_alive() or time.monotonic() > deadline:
                    raise AssertionError(f"no {prefix!r} line; output: {self.lines[-20:]}")
                self._changed.wait(1.0)


def test_restarts_under_a_libnbd_stream_fail_nothing(client_unit: ServiceUnit) -> None:
    need("nbdsh")  # python3-libnbd
    client_unit.start()
    stop_file = Path(client_unit.runtime) / "stop-load"
    load = subprocess.Popen(
        [SYSTEM_PYTHON, "-c", LOAD, uri_of(client_unit), str(stop_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    reader = LineReader(load)
    per_process: list[int] = []
    restarts: list[float] = []
    try:
        mark = reader.wait_for("DONE")
        for _ in range(2):
            per_process.append(served(metrics(client_unit)))
            began = time.monotonic()
            assert client_unit.restart() == 0
            restarts.append(time.monotonic() - began)
            assert client_unit.passed[-1] == ["nbd-0"], client_unit.passed
            assert "resumed=1" in client_unit.status
            # the stream goes on in the new process
            mark = reader.wait_for("DONE", mark + 1)
            mark = reader.wait_for("DONE", mark + 1)
        per_process.append(served(metrics(client_unit)))
        stop_file.touch()
        assert load.wait(timeout=120) == 0, reader.lines[-20:]
    finally:
        if load.poll() is None:
            load.kill()
            load.wait(timeout=10)
        reader.close()
    result = json.loads(reader.lines[-1])
    print(f"handover: {result} restarts_s={restarts} served_per_process={per_process}")
    assert result["errors"] == 0, [line for line in reader.lines if line.startswith("ERROR")]
    assert result["bad_reads"] == 0 and result["bad_final"] == 0, [
        line for line in reader.lines if not line.startswith("DONE")
    ][:30]
    assert result["same_socket"]
    assert all(count > 0 for count in per_process), per_process
    assert client_unit.fd_store == []  # the new process took them out of the store


def test_requests_cut_in_the_middle_cross_the_restart_exactly(client_unit: ServiceUnit) -> None:
    client_unit.start()
    page = bytes(range(256)) * 16
    big = os.urandom(MiB)
    with RawNbd.unix(socket_path(client_unit), timeout=60).connect() as nbd:
        nbd.write(0, page)
        # 1. a request header cut after 10 bytes: the old process hands the 10 bytes over
        header = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.Cmd.WRITE, 7, 4096, 4096)
        nbd.pending[7] = (wire.Cmd.WRITE, 4096)
        nbd.send(header[:10])
        assert client_unit.restart() == 0
        nbd.send(header[10:] + page[::-1])
        reply = nbd.reply()
        assert (reply.handle, reply.error) == (7, 0)
        # 2. a 1 MiB WRITE whose payload is half sent: the old process reads the rest first
        header = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.Cmd.WRITE, 8, 2 * MiB, MiB)
        nbd.pending[8] = (wire.Cmd.WRITE, MiB)
        nbd.send(header + big[: MiB // 2])
        old = client_unit.proc
        assert old is not None
        restarted: list[int] = []
        thread = threading.Thread(target=lambda: restarted.append(client_unit.restart()))
        thread.start()
        try:
            wait_log(client_unit.log_path, "handing over")
            nbd.send(big[MiB // 2 :])
        finally:
            thread.join(timeout=120)
        assert restarted == [0]
        reply = nbd.reply()
        assert (reply.handle, reply.error) == (8, 0)
        assert client_unit.proc is not old
        assert nbd.read(0, 4096) == page
        assert nbd.read(4096, 4096) == page[::-1]
        assert nbd.read(2 * MiB, MiB, handle=9) == big
    assert client_unit.starts == 3


def test_a_full_stop_closes_the_connection(client_unit: ServiceUnit) -> None:
    client_unit.start()
    with RawNbd.unix(socket_path(client_unit), timeout=30).connect() as nbd:
        nbd.write(0, b"x" * 4096)
        assert client_unit.stop() == 0
        assert client_unit.fd_store == []
        assert nbd.closed_by_server()


def test_a_second_sigterm_ends_a_handover_at_once(client_unit: ServiceUnit) -> None:
    client_unit.start()
    proc = client_unit.proc
    assert proc is not None
    with RawNbd.unix(socket_path(client_unit), timeout=30).connect() as nbd:
        # a WRITE whose payload never completes holds the handover up to --drain-timeout
        header = wire.REQUEST.pack(wire.REQUEST_MAGIC, 0, wire.Cmd.WRITE, 3, 0, MiB)
        nbd.send(header + b"\0" * 4096)
        proc.send_signal(signal.SIGTERM)
        wait_log(client_unit.log_path, "handing over")
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 130
        assert time.monotonic() - began < 5
    assert "second signal" in client_unit.log_path.read_text()


def wait_log(path: Path, text: str, timeout: float = 30) -> None:
    """Until the service's log has `text` (its own announcement of the step)."""
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in {path}:\n{path.read_text()[-2000:]}")
        time.sleep(0.05)
