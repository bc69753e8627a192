"""The mirror as a real process on a file in /tmp: order, durability, bad input, shutdown.

Its socket's fuzzer is in test_zmq_fuzz.py with every other service's.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_client import mirror_link
from remem_client.mirror_link import MirrorLink
from remem_common.framing import encode
from remem_common.mirror_client import MirrorClient, MirrorError
from remem_common.protocol.client_mirror import (
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesRequest,
    WritePagesReply,
    WritePagesRequest,
)
from remem_common.protocol.pages import PAGE_SIZE
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from ..conftest import histogram_buckets

PAGES = 4096  # 16 MiB mirrors: big enough for runs, small enough to compare in memory
SIZE = f"{PAGES * PAGE_SIZE}"

StartMirror = Callable[..., ServiceProcess]


@pytest.fixture
def start_mirror(tmp_path: Path) -> Iterator[StartMirror]:
    """Start mirror processes on files in tmp_path; every one must stop at teardown.

    `start_mirror(name="m", extra=[...])`: the same name reuses the same file and bitmap,
    which is how a restart is tested.
    """
    started: list[ServiceProcess] = []

    def start(
        name: str = "m",
        size: str = SIZE,
        transport: str = "tcp",
        extra: list[str] | None = None,
    ) -> ServiceProcess:
        listen = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{tmp_path}/{name}.sock"
        args = [
            "mirror",
            "--path", str(tmp_path / f"{name}.img"),
            "--size", size,
            "--listen", listen,
            "--metrics-port", "0",
        ]  # fmt: skip
        service = start_service(name, args + (extra or []))
        started.append(service)
        return service

    yield start
    for service in started:
        if service.proc.poll() is None:
            assert service.stop() == 0


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


def client_of(service: ServiceProcess, timeout: float = 10.0) -> MirrorClient:
    return MirrorClient(service.ready["endpoint"], timeout=timeout)


def scrape(service: ServiceProcess) -> dict[str, float]:
    return scrape_metrics(service.ready["metrics"])


def pipeline(
    client: MirrorClient, requests: list[tuple[object, tuple[object, ...]]], window: int = 256
) -> list[tuple[object, list[object]]]:
    """Send all requests keeping up to `window` in flight; replies in order of sending.

    The window stays below ZeroMQ's high-water marks: a client that stops reading its
    replies loses them at the mirror's ROUTER, as with any ROUTER peer.
    """
    replies: list[tuple[object, list[object]]] = []
    inflight = 0
    for msg, payload in requests:
        if inflight >= window:
            replies.append(client.receive())
            inflight -= 1
        client.send(msg, *payload)  # type: ignore[arg-type]
        inflight += 1
    while inflight:
        replies.append(client.receive())
        inflight -= 1
    return replies


def direct_io_supported(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        assert exc.errno == errno.EINVAL
        return False
    os.close(fd)
    probe.unlink()
    return True


def open_flags(pid: int, path: Path) -> int:
    """The open flags of `pid`'s descriptor of `path`, from /proc/PID/fdinfo."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target == str(path):
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8)
    raise AssertionError(f"{pid} has no descriptor of {path}")


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_pipelined_writes_read_back_byte_identical(
    start_mirror: StartMirror, transport: str, tmp_path: Path
) -> None:
    mirror = start_mirror(transport=transport)
    rng = np.random.default_rng(1)
    device = np.zeros((PAGES, PAGE_SIZE), dtype=np.uint8)
    requests: list[tuple[object, tuple[object, ...]]] = []
    with client_of(mirror) as client:
        for index in range(1500):
            if index % 3 == 0:  # runs of single adjacent pages: what coalescing is for
                first, count = (index * 7) % (PAGES - 1), 1
            else:
                count = int(rng.integers(1, 257))
                first = int(rng.integers(0, PAGES - count + 1))
            data = pages_of(count, 1000 + index)
            device[first : first + count] = data  # later writes win, in sending order
            requests.append((client.write_request(first, count), (data,)))
        # Reads queued right behind the writes, sent before any write was answered.
        for first in range(0, PAGES, 256):
            requests.append(
                (ReadPagesRequest(msg_id=client.next_id(), first_page=first, count=256), ())
            )
        replies = pipeline(client, requests, window=400)
        # Replies come back in sending order.
        assert [r.parent_id for r, _ in replies] == [m.msg_id for m, _ in requests]  # type: ignore[attr-defined]
        writes, reads = replies[:1500], replies[1500:]
        assert all(isinstance(r, WritePagesReply) for r, _ in writes)
        for k, (reply, frames) in enumerate(reads):
            assert isinstance(reply, ReadPagesReply)
            assert bytes(frames[0]) == device[k * 256 : (k + 1) * 256].tobytes()
        # And once more, one request at a time.
        assert np.array_equal(client.read(0, 256), device[:256])
        described = client.describe()
        assert described.page_count == PAGES
        assert described.path == str(tmp_path / "m.img")
    metrics = scrape(mirror)
    assert metrics["mirror_write_requests_total"] == 1500
    assert metrics['mirror_requests_total{op="write",result="ok"}'] == 1500
    assert 0 < metrics["mirror_coalesced_writes_total"] <= 1500
    assert metrics["mirror_read_bytes_total"] == (PAGES + 256) * PAGE_SIZE
    assert metrics["mirror_pending_pages"] == 0
    assert metrics["mirror_write_lag_seconds"] == 0


def test_adjacent_single_page_writes_are_coalesced(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    data = pages_of(PAGES, 2)
    with client_of(mirror) as client:
        requests = [(client.write_request(page, 1), (data[page],)) for page in range(PAGES)]
        pipeline(client, requests, window=900)
        assert np.array_equal(
            np.concatenate([client.read(p, 256) for p in range(0, PAGES, 256)]), data
        )
    metrics = scrape(mirror)
    assert metrics["mirror_write_requests_total"] == PAGES
    assert metrics["mirror_written_bytes_total"] == PAGES * PAGE_SIZE
    # Writes queue up behind the disk and the writer takes them as runs: far fewer syscalls.
    assert metrics["mirror_coalesced_writes_total"] < PAGES / 2


def test_a_later_write_wins_and_reads_see_queued_writes(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    a, b, c, d = (pages_of(3, seed) for seed in (10, 11, 12, 13))
    with client_of(mirror) as client:
        requests = [
            (client.write_request(5, 1), (a[:1],)),
            (client.write_request(5, 1), (b[:1],)),
            (ReadPagesRequest(msg_id=client.next_id(), first_page=5, count=1), ()),
            (client.write_request(4, 3), (c,)),
            (client.write_request(5, 1), (d[:1],)),
            (ReadPagesRequest(msg_id=client.next_id(), first_page=4, count=3), ()),
            (client.write_request(7, 1), (a[:1],)),  # adjacent to 4..6: coalesces, still last
        ]
        replies = pipeline(client, requests, window=len(requests))
        assert bytes(replies[2][1][0]) == b[0].tobytes()
        assert bytes(replies[5][1][0]) == np.stack([c[0], d[0], c[2]]).tobytes()
        assert np.array_equal(client.read(4, 4), np.stack([c[0], d[0], c[2], a[0]]))


def test_trim_reads_zeros(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    data = pages_of(256, 3)
    with client_of(mirror) as client:
        client.write(100, data, replicated=False)
        client.send(TrimPagesRequest(msg_id=client.next_id(), first_page=110, count=100))
        client.receive()
        got = client.read(100, 256)
        assert np.array_equal(got[:10], data[:10]) and np.array_equal(got[110:], data[110:])
        assert not got[10:110].any()
        assert client.list_unreplicated().sum() == 156
        client.trim(0, PAGES)
        assert not client.read(100, 256).any()
        assert client.describe().unreplicated_pages == 0


def test_unreplicated_bitmap_is_listed_and_cleared(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    expect = np.zeros(PAGES, dtype=np.bool_)
    with client_of(mirror) as client:
        client.write(0, pages_of(8, 4))  # replicated: not listed
        for first, count in ((3, 1), (9, 20), (4000, 96), (1000, 256)):
            client.write(first, pages_of(count, first), replicated=False)
            expect[first : first + count] = True
        assert np.array_equal(client.list_unreplicated(), expect)
        assert client.describe().unreplicated_pages == int(expect.sum())
        assert client.mark_replicated(1000, 100) == int(expect.sum()) - 100
        expect[1000:1100] = False
        client.write(2000, pages_of(1, 5))  # a replicated write clears nothing
        assert np.array_equal(client.list_unreplicated(), expect)
    assert scrape(mirror)["mirror_unreplicated_pages"] == int(expect.sum())


def test_sigkill_keeps_acknowledged_data_and_the_bitmap(start_mirror: StartMirror) -> None:
    mirror = start_mirror(name="survivor")
    data = pages_of(PAGES, 6)
    with client_of(mirror) as client:
        requests = [
            (
                client.write_request(first, 256, replicated=first % 512 != 0),
                (data[first : first + 256],),
            )
            for first in range(0, PAGES, 256)
        ]
        replies = pipeline(client, requests)
        assert all(isinstance(r, WritePagesReply) for r, _ in replies)
        client.mark_replicated(512, 10)
        bitmap = client.list_unreplicated()
    assert bitmap.sum() == 8 * 256 - 10
    mirror.kill(signal.SIGKILL)
    assert mirror.proc.returncode == -signal.SIGKILL

    again = start_mirror(name="survivor")
    assert again.ready["unreplicated_pages"] == str(8 * 256 - 10)
    with client_of(again) as client:
        assert np.array_equal(client.list_unreplicated(), bitmap)
        for first in range(0, PAGES, 256):
            assert np.array_equal(client.read(first, 256), data[first : first + 256])
    again.stop()

    wiped = start_mirror(name="survivor", extra=["--forget"])
    assert wiped.ready["unreplicated_pages"] == "0"
    with client_of(wiped) as client:
        assert not client.read(0, 256).any()


def test_o_direct_is_used(start_mirror: StartMirror, tmp_path: Path) -> None:
    mirror = start_mirror()
    direct = direct_io_supported(tmp_path)
    assert mirror.ready["direct_io"] == ("on" if direct else "off")
    flags = open_flags(mirror.pid, tmp_path / "m.img")
    assert bool(flags & os.O_DIRECT) is direct
    with client_of(mirror) as client:
        assert client.describe().direct_io is direct
    assert scrape(mirror)["mirror_direct_io"] == (1.0 if direct else 0.0)


def test_back_pressure_with_a_small_queue_loses_nothing(start_mirror: StartMirror) -> None:
    mirror = start_mirror(extra=["--queue-pages", "32"])
    data = pages_of(PAGES, 7)
    with client_of(mirror) as client:
        requests = [
            (client.write_request(first, 16, sync=first % 1024 == 0), (data[first : first + 16],))
            for first in range(0, PAGES, 16)
        ]
        replies = pipeline(client, requests, window=256)
        assert len(replies) == PAGES // 16
        assert all(isinstance(r, WritePagesReply) for r, _ in replies)
        for first in range(0, PAGES, 256):
            assert np.array_equal(client.read(first, 256), data[first : first + 256])
    metrics = scrape(mirror)
    fsyncs = metrics["mirror_fsync_duration_seconds_count"]
    assert fsyncs >= 1
    buckets = histogram_buckets(metrics, "mirror_fsync_duration_seconds")
    # Sub-millisecond buckets, cumulative, and the last (+Inf) holds every fdatasync.
    assert buckets[0][0] <= 0.0001 and buckets[-1] == (float("inf"), fsyncs)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)


def test_metrics_are_exposed(start_mirror: StartMirror) -> None:
    mirror = start_mirror()
    with client_of(mirror) as client:
        client.write(0, pages_of(2, 8), sync=True)
        client.read(0, 2)
        with pytest.raises(MirrorError):
            client.read(PAGES, 1)
    metrics = scrape(mirror)
    for name in (
        "mirror_pending_pages",
        "mirror_write_lag_seconds",
        "mirror_written_bytes_total",
        "mirror_read_bytes_total",
        "mirror_fsync_duration_seconds_count",
        'mirror_fsync_duration_seconds_bucket{le="0.0001"}',
        "mirror_write_duration_seconds_count",
        'mirror_write_duration_seconds_bucket{le="5e-05"}',
        'mirror_requests_total{op="write",result="ok"}',
        'mirror_requests_total{op="read",result="error"}',
        'mirror_malformed_messages_total{reason="bad_fields"}',
        "mirror_unreplicated_pages",
        "mirror_coalesced_writes_total",
        "mirror_write_requests_total",
    ):
        assert name in metrics, name
    assert metrics["mirror_written_bytes_total"] == 2 * PAGE_SIZE
    assert metrics["mirror_fsync_duration_seconds_count"] == 1
    assert metrics['mirror_requests_total{op="read",result="error"}'] == 1
    assert metrics['mirror_malformed_messages_total{reason="bad_fields"}'] == 1


# -- lifecycle ---------------------------------------------------------------------------------


def test_sigterm_finishes_queued_writes_and_exits_0_promptly(
    start_mirror: StartMirror, zmq_context: zmq.Context
) -> None:
    mirror = start_mirror(name="term")
    sock = zmq_context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mirror.ready["endpoint"])
    data = pages_of(64, 10)
    for msg_id in range(1, 51):
        msg = WritePagesRequest(msg_id=msg_id, first_page=(msg_id - 1) * 64, count=64)
        sock.send_multipart(encode(msg, data))
    # One reply proves the mirror is serving these; the rest may still be queued.
    assert sock.poll(10000)
    answered = [sock.recv_multipart()[1]]
    mirror.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    while len(answered) < 50 and sock.poll(10000):
        answered.append(sock.recv_multipart()[1])
    sock.close(linger=0)
    assert mirror.proc.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 5
    assert len(answered) == 50
    assert all(b'"status":"ok"' in reply for reply in answered)
    again = start_mirror(name="term")
    with client_of(again) as client:
        assert np.array_equal(client.read(49 * 64, 64), data)


def test_startup_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "remem_cli", "mirror", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    image = str(tmp_path / "m.img")
    common = ["--listen", "tcp://127.0.0.1:0", "--metrics-port", "0"]
    for args, fragment in (
        (["--size", "12 parsecs", "--path", image], "--size"),
        (["--size", "5000", "--path", image], "--size"),
        (["--path", image], "--size"),
        (["--size", "1MiB"], "--path"),
        (["--size", "1MiB", "--path", image, "--direct-io", "maybe"], "--direct-io"),
        (["--size", "1MiB", "--path", image, "--listen", "http://x"], "--listen"),
        (["--size", "1MiB", "--path", str(tmp_path)], "neither a regular file"),
    ):
        bad = run(*args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert bad.stderr.count("\n") == 1 and fragment in bad.stderr, (args, bad.stderr)
    assert not (tmp_path / "m.img").exists()

    first = start_service("m", ["mirror", "--size", "1MiB", "--path", image, *common])
    assert first.stop() == 0
    mismatch = run("--size", "2MiB", "--path", image, *common)
    assert mismatch.returncode == 2 and mismatch.stderr.count("\n") == 1
    assert "--forget" in mismatch.stderr
    assert (tmp_path / "m.img").stat().st_size == 1 << 20

    printed = run("--size", "1MiB", "--path", image, "--print-config")
    assert printed.returncode == 0 and '"queue_pages": 16384' in printed.stdout
    env_size = subprocess.run(
        [sys.executable, "-m", "remem_cli", "mirror", "--path", image, "--print-config"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "REMEM_MIRROR_SIZE": "8MiB"},
    )
    assert env_size.returncode == 0 and '"size": 8388608' in env_size.stdout


async def test_page_outs_a_moment_apart_reach_the_mirror_in_one_request(
    start_mirror: StartMirror,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Write-behind is not in a write's acknowledgement: page-outs made within
    WRITE_BEHIND_DELAY of each other (the kernel's reclaim writes come one to four at a
    time) go to the mirror as one request, not one each, and land as written."""
    monkeypatch.setattr(mirror_link, "WRITE_BEHIND_DELAY", 0.5)  # loop turns apart, not time
    mirror = start_mirror()
    link = MirrorLink(
        mirror.ready["endpoint"], context=zmq_context, cache_bytes=1 << 20, timeout=10
    )
    pages = pages_of(3, 12)
    try:
        await link.attach()
        await link.write_behind(5, pages[:1])
        for _ in range(3):
            await asyncio.sleep(0)  # later loop turns: a send per turn would have gone by now
        await link.write_behind(9, pages[1:])
        await link.barrier()  # sends what gathered first, answered after it
        assert link.cache_bytes == 0
        assert scrape(mirror)['mirror_requests_total{op="write",result="ok"}'] == 1
    finally:
        link.close()
    with client_of(mirror) as client:
        assert np.array_equal(client.read(5, 1), pages[:1])
        assert np.array_equal(client.read(9, 2), pages[1:])
