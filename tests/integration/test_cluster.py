"""The whole system as `remem up` runs it: placement, 3 page servers, 2 replicas, the client,
driven through NBD by real clients (nbdinfo, nbdcopy, qemu-io, fio with verification), with a
page server SIGKILLed in the middle of a verified fio run.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from remem_common.placement_requests import BlockingPlacementClient
from remem_common.process import ServiceProcess
from remem_common.testing import scrape_metrics, start_service

from .test_nbd_clients import fio, need, qemu_io, run

MiB = 1 << 20
SIZE = 512 * MiB


def start_cluster(state: Path, *extra: str) -> ServiceProcess:
    return start_service(
        "remem-up",
        ["up", "--state-dir", str(state), "--size", str(SIZE), "--forget",
         "--pageserver-capacity", "512MiB", *extra],
        timeout=240,
    )  # fmt: skip


def ready_fields(log_file: Path) -> dict[str, str]:
    """Fields of the ready line in one child's log under the state dir."""
    for line in log_file.read_text().splitlines():
        if " ready " in f" {line.split(':', 1)[-1]} ":
            return dict(part.split("=", 1) for part in line.split() if "=" in part)
    raise AssertionError(f"no ready line in {log_file}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Path]]:
    state = tmp_path_factory.mktemp("cluster")
    up = start_cluster(state)
    yield up, state
    assert up.stop(timeout=60) == 0, up.log()
    assert not list((state / "pids").iterdir()), "pid files left behind"


def test_up_starts_every_process_and_writes_pid_files(cluster) -> None:
    up, state = cluster
    names = {p.name for p in (state / "pids").iterdir()}
    assert names == {
        "placement.pid",
        "pageserver-0.pid",
        "pageserver-1.pid",
        "pageserver-2.pid",
        "mirror.pid",
        "client.pid",
    }
    for pid_file in (state / "pids").iterdir():
        os.kill(int(pid_file.read_text()), 0)  # alive
    assert up.ready["nbd_uri"].startswith("nbd+unix:///remem?socket=")


def test_up_talks_over_unix_sockets_only_its_user_can_open(cluster) -> None:
    """The local mode's ZeroMQ sockets live in STATE_DIR/zmq, mode 0700: the file system is
    what keeps other users out (so no Curve is needed), and no TCP port is bound."""
    _, state = cluster
    sockets = state / "zmq"
    assert sockets.stat().st_mode & 0o777 == 0o700
    for name in ("placement", "pageserver-0", "pageserver-1", "pageserver-2", "mirror"):
        endpoint = ready_fields(state / "logs" / f"{name}.log")["endpoint"]
        assert endpoint == f"ipc://{sockets / name}.sock", name


def test_nbdinfo_shows_the_replicated_device(cluster) -> None:
    up, _ = cluster
    info = json.loads(run([need("nbdinfo"), "--json", up.ready["nbd_uri"]]))
    export = info["exports"][0]
    assert export["export-size"] == SIZE
    assert export["block_size_preferred"] == 4096
    assert export["block_size_minimum"] == 1
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"):
        assert export[flag] is True, flag


def test_nbdcopy_256mib_round_trip_is_identical(cluster, tmp_path: Path) -> None:
    up, state = cluster
    source = tmp_path / "source.img"
    with source.open("wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * MiB))
    uri = up.ready["nbd_uri"]
    run([need("nbdcopy"), "--flush", str(source), uri], timeout=180)
    back = tmp_path / "back.img"
    run(["nbdcopy", uri, str(back)], timeout=180)
    with back.open("r+b") as f:
        f.truncate(256 * MiB)  # the device is larger than the image
    digests = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (source, back)]
    assert digests[0] == digests[1]
    # Every page is on two page servers, in distinct zones.
    placement = ready_fields(state / "logs" / "placement.log")["endpoint"]
    with BlockingPlacementClient(placement) as admin:
        status = admin.status()
    used = [s.used_bytes for s in status.servers if s.state == "live"]
    assert sum(used) >= 2 * 256 * MiB
    client_metrics = scrape_metrics(ready_fields(state / "logs" / "client.log")["metrics"])
    # Location metadata: far under the 64 KiB per GiB of device asked for.
    assert client_metrics["client_location_metadata_bytes"] <= 64 * 1024 * SIZE / (1 << 30)


def test_qemu_io_unaligned_patterns(cluster) -> None:
    up, _ = cluster
    uri = up.ready["nbd_uri"]
    base = 300 * MiB
    qemu_io(
        uri,
        f"write -P 0x11 {base} 65536",
        f"write -P 0xab {base + 1000} 5000",
        f"write -P 0xcd {base + 7} 1",
        f"write -P 0x5a {base + 40961} 12345",
        f"write -P 0xee {SIZE - 777} 777",
    )
    qemu_io(
        uri,
        f"read -P 0x11 {base} 7",
        f"read -P 0xcd {base + 7} 1",
        f"read -P 0x11 {base + 8} 992",
        f"read -P 0xab {base + 1000} 5000",
        f"read -P 0x11 {base + 6000} 34961",
        f"read -P 0x5a {base + 40961} 12345",
        f"read -P 0x11 {base + 53306} {65536 - 53306}",
        f"read -P 0xee {SIZE - 777} 777",
    )


def test_fio_verify_qd32_and_multi_connection(cluster) -> None:
    up, _ = cluster
    uri = up.ready["nbd_uri"]
    fio(
        uri,
        "--name=verify32",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=32",
        "--offset=400M",
        "--size=16M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    )
    fio(
        uri,
        "--name=multi",
        "--numjobs=4",
        "--rw=randwrite",
        "--bssplit=4k/50:64k/30:256k/20",
        "--iodepth=16",
        "--offset=420M",
        "--size=8M",
        "--offset_increment=8M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--group_reporting=0",
    )


def test_page_server_sigkill_during_fio_verify_loses_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = start_cluster(state)
    try:
        uri = up.ready["nbd_uri"]
        victim = int((state / "pids" / "pageserver-1.pid").read_text())
        placement = ready_fields(state / "logs" / "placement.log")["endpoint"]
        killed = threading.Event()

        def kill_once_written() -> None:
            with BlockingPlacementClient(placement) as admin:
                for _ in range(600):
                    if sum(s.slabs for s in admin.status().servers) >= 2:
                        break
                    killed.wait(0.05)  # polling placement's view while fio writes
            os.kill(victim, signal.SIGKILL)
            killed.set()

        killer = threading.Thread(target=kill_once_written)
        killer.start()
        job = [
            "--name=survive",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--size=96M",
            "--verify=crc32c",
            "--verify_fatal=1",
        ]
        fio(uri, *job, "--do_verify=1")
        killer.join(timeout=60)
        assert killed.is_set()
        # Placement re-replicates the dead server's slabs; then everything verifies again,
        # now also from the new replicas.
        pause = threading.Event()  # never set: a wait that cannot be cut short
        with BlockingPlacementClient(placement) as admin:
            for _ in range(600):
                status = admin.status()
                if not status.degraded and not status.pushes:
                    break
                pause.wait(0.05)
            assert not status.degraded, status
        fio(uri, *job, "--verify_only=1")
        metrics = scrape_metrics(ready_fields(state / "logs" / "client.log")["metrics"])
        assert metrics["client_replica_failures_total"] >= 1
        # Pushed copies carry their pages' seals: every one read decrypted where it was.
        assert metrics["client_page_auth_failures_total"] == 0
    finally:
        assert up.stop(timeout=60) == 0, up.log()
