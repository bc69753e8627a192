"""The page server as a real process on loopback: data, capacity, restart, push, bad input.

Its sockets' fuzzers are in test_zmq_fuzz.py with every other service's.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_common.framing import encode
from remem_common.pageserver_client import PageServerClient, PageServerError
from remem_common.protocol.client_pageserver import GetPagesRequest, PutPagesRequest
from remem_common.protocol.envelope import ErrorCode
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    checksum_pages,
    make_keys,
)
from remem_common.testing import ServiceProcess, scrape_metrics

from ..conftest import StartPageServer, histogram_buckets


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


def seals_of(count: int, seed: int) -> np.ndarray:
    """Stand-ins for a client's nonces and tags: the server stores them unread."""
    return np.random.default_rng(seed).integers(0, 256, (count, SEAL_BYTES), dtype=np.uint8)


def scrape(service: ServiceProcess) -> dict[str, float]:
    """Samples of the service's /metrics as {'name{labels}': value}."""
    return scrape_metrics(service.ready["metrics"])


def client_of(service: ServiceProcess, timeout: float = 10.0) -> PageServerClient:
    return PageServerClient(service.ready["endpoint"], timeout=timeout)


def test_batched_put_get_delete_round_trip(start_pageserver: StartPageServer) -> None:
    server = start_pageserver()
    rng = np.random.default_rng(1)
    index = rng.choice(4 * SLAB_PAGES, 1024, replace=False)
    keys = make_keys(index // SLAB_PAGES, index % SLAB_PAGES)
    data = pages_of(1024, 2)
    with client_of(server) as client:
        assert client.put("t", 1, keys, data) == 1024
        found, crcs, got = client.get("t", 1, keys)
        assert found.all() and np.array_equal(got, data)
        assert np.array_equal(crcs, checksum_pages(data))
        assert client.delete("t", 1, keys[:500]) == 500
        found, _, got = client.get("t", 1, keys)
        assert not found[:500].any() and found[500:].all()
        assert not got[:500].any() and np.array_equal(got[500:], data[500:])
        # Another tenant and another volume see none of it.
        assert not client.get("other", 1, keys[500:])[0].any()
        assert not client.get("t", 2, keys[500:])[0].any()
        inventory = client.inventory()
        assert sum(slab.pages for slab in inventory.slabs) == 524
        assert {slab.tenant for slab in inventory.slabs} == {"t"}
    metrics = scrape(server)
    assert metrics["pageserver_pages_resident"] == 524
    assert metrics["pageserver_used_bytes"] == 524 * PAGE_SIZE
    assert metrics['pageserver_requests_total{op="put",result="ok"}'] == 1
    assert metrics['pageserver_request_duration_seconds_count{op="get"}'] == 4
    buckets = histogram_buckets(metrics, "pageserver_request_duration_seconds", op="get")
    # Sub-millisecond buckets (the library's default starts at 5 ms), cumulative, and the
    # last (+Inf) holds every GET.
    assert buckets[0][0] <= 0.0001 and buckets[-1] == (float("inf"), 4)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts)


def test_capacity_refusal_stores_nothing(start_pageserver: StartPageServer) -> None:
    server = start_pageserver(capacity="1MiB")  # 256 pages
    data = pages_of(257, 3)
    keys = make_keys([0] * 256 + [1], [*range(256), 0])
    with client_of(server) as client:
        client.put("t", 0, keys[:200], data[:200])
        # 57 new pages, 56 free: refused whole, nothing of it stored, nothing evicted.
        with pytest.raises(PageServerError) as refused:
            client.put("t", 0, keys[200:], data[200:])
        assert refused.value.code == ErrorCode.NO_SPACE
        assert "56 of 256 pages free" in refused.value.detail
        assert not client.get("t", 0, keys[200:])[0].any()
        assert np.array_equal(client.get("t", 0, keys[:200])[2], data[:200])
        client.put("t", 0, keys[200:256], data[200:256])  # exactly full still fits
        with pytest.raises(PageServerError) as full:
            client.put("t", 0, keys[256:], data[256:])
        assert full.value.code == ErrorCode.NO_SPACE
        client.delete("t", 0, keys[:1])
        assert client.put("t", 0, keys[256:], data[256:]) == 1
    assert scrape(server)['pageserver_requests_total{op="put",result="error"}'] == 2


def test_sigkill_and_restart_keeps_every_page(start_pageserver: StartPageServer) -> None:
    server = start_pageserver(name="survivor", capacity="32MiB")
    rng = np.random.default_rng(5)
    index = rng.choice(3 * SLAB_PAGES, 4000, replace=False)
    keys = make_keys(index // SLAB_PAGES, index % SLAB_PAGES)
    data = pages_of(4000, 6)
    with client_of(server) as client:
        for start in range(0, 4000, 1000):
            client.put("t", 0, keys[start : start + 1000], data[start : start + 1000])
        client.put("u", 4, keys[:10], data[:10])
        client.delete("t", 0, keys[:100])
        before = client.inventory().slabs
    server.kill(signal.SIGKILL)
    assert server.proc.returncode == -signal.SIGKILL

    again = start_pageserver(name="survivor", capacity="32MiB")
    assert again.ready["pages"] == str(3900 + 10)
    with client_of(again) as client:
        assert client.inventory().slabs == before
        for start in range(0, 4000, 1000):
            found, crcs, got = client.get("t", 0, keys[start : start + 1000])
            expect = np.arange(start, start + 1000) >= 100
            assert np.array_equal(found, expect)
            assert np.array_equal(got[expect], data[start : start + 1000][expect])
            assert np.array_equal(crcs[expect], checksum_pages(data[start : start + 1000][expect]))
        assert np.array_equal(client.get("u", 4, keys[:10])[2], data[:10])
    again.stop()

    wiped = start_pageserver(name="survivor", capacity="32MiB", forget=True)
    assert wiped.ready["pages"] == "0"
    with client_of(wiped) as client:
        assert client.inventory().slabs == []


def test_slab_push_goes_directly_between_servers(start_pageserver: StartPageServer) -> None:
    source = start_pageserver(name="source")
    target = start_pageserver(name="target")
    count = 3000  # several push chunks
    pages_idx = np.random.default_rng(8).choice(SLAB_PAGES, count, replace=False)
    data = pages_of(count, 9)
    seals = seals_of(count, 9)
    with client_of(source) as src, client_of(target) as dst:
        for start in (0, 1000, 2000):
            part = slice(start, start + 1000)
            src.put("t", 0, make_keys([7] * 1000, pages_idx[part]), data[part], seals[part])
        src.put("t", 0, make_keys([8], [0]), data[:1])  # another slab stays behind
        newer = pages_of(1, 10)
        dst.put("t", 0, make_keys([7], [pages_idx[0]]), newer)  # a live write raced ahead
        reply = src.push_slab("t", 0, 7, target.ready["endpoint"])
        assert (reply.pages, reply.bytes, reply.corrupt) == (count, count * PAGE_SIZE, 0)
        found, _, got = dst.get("t", 0, make_keys([7] * 1000, pages_idx[:1000]))
        assert found.all()
        assert np.array_equal(got[0], newer[0])  # the push did not overwrite the newer page
        assert np.array_equal(got[1:], data[1:1000])
        for start in (1000, 2000):
            part = slice(start, start + 1000)
            keys = make_keys([7] * 1000, pages_idx[part])
            found, _, got, got_seals = dst.get_sealed("t", 0, keys)
            assert found.all() and np.array_equal(got, data[part])
            # Each page's seal came along: its client can still decrypt the pushed copy.
            assert np.array_equal(got_seals, seals[part])
        assert [(s.slab, s.pages) for s in dst.inventory().slabs] == [(7, count)]
        assert src.drop_slab("t", 0, 7) == count
        assert [(s.slab, s.pages) for s in src.inventory().slabs] == [(8, 1)]
    sent = scrape(source)["pageserver_push_sent_bytes_total"]
    received = scrape(target)["pageserver_push_received_bytes_total"]
    assert sent == count * PAGE_SIZE
    assert received == (count - 1) * PAGE_SIZE  # the newer page was skipped


def test_push_to_a_dead_target_fails_in_time(start_pageserver: StartPageServer) -> None:
    source = start_pageserver(name="lonely")
    with client_of(source) as client:
        client.put("t", 0, make_keys([1], [1]), pages_of(1, 1))
        with pytest.raises(PageServerError) as failed:
            client.push_slab("t", 0, 1, "tcp://127.0.0.1:9", timeout=0.5)
        assert failed.value.code == ErrorCode.UNAVAILABLE
        assert client.get("t", 0, make_keys([1], [1]))[0].all()  # still serving


def test_bad_checksum_stores_nothing(start_pageserver: StartPageServer) -> None:
    server = start_pageserver()
    data = pages_of(4, 1)
    crcs = checksum_pages(data)
    crcs[2] ^= 1
    with client_of(server) as client:
        client.send(
            PutPagesRequest(msg_id=1, tenant="t", volume=0, count=4),
            make_keys([0] * 4, range(4)),
            crcs,
            data,
            seals_of(4, 1),
        )
        with pytest.raises(PageServerError) as refused:
            client.receive()
        assert refused.value.code == ErrorCode.BAD_CHECKSUM
        assert not client.get("t", 0, make_keys([0] * 4, range(4)))[0].any()


def test_put_with_malformed_seals_is_refused_and_counted(
    start_pageserver: StartPageServer,
) -> None:
    server = start_pageserver()
    data = pages_of(4, 1)
    cases = [
        ([], "bad_frames"),  # a client from before seals: 3 frames
        ([bytes(4 * SEAL_BYTES - 1)], "bad_payload"),
        ([bytes(4 * SEAL_BYTES + 28)], "bad_payload"),
        ([bytes(4 * SEAL_BYTES), b""], "bad_frames"),
    ]
    with client_of(server) as client:
        for seal_frames, _reason in cases:
            client.send(
                PutPagesRequest(msg_id=1, tenant="t", volume=0, count=4),
                make_keys([0] * 4, range(4)),
                checksum_pages(data),
                data,
                *seal_frames,
            )
            with pytest.raises(PageServerError) as refused:
                client.receive()
            assert refused.value.code == ErrorCode.MALFORMED
        assert not client.get("t", 0, make_keys([0] * 4, range(4)))[0].any()
    metrics = scrape(server)
    assert metrics['pageserver_malformed_messages_total{reason="bad_frames"}'] == 2
    assert metrics['pageserver_malformed_messages_total{reason="bad_payload"}'] == 2


def test_sigterm_finishes_queued_requests_and_exits_0(
    start_pageserver: StartPageServer, zmq_context: zmq.Context
) -> None:
    server = start_pageserver()
    sock = zmq_context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.ready["endpoint"])
    data = pages_of(64, 2)
    crcs = checksum_pages(data)
    for msg_id in range(1, 51):
        sock.send_multipart(
            encode(
                PutPagesRequest(msg_id=msg_id, tenant="t", volume=0, count=64),
                make_keys([msg_id] * 64, range(64)),
                crcs,
                data,
                seals_of(64, msg_id),
            )
        )
    server.proc.send_signal(signal.SIGTERM)
    answered = set()
    while len(answered) < 50 and sock.poll(10000):
        answered.add(sock.recv_multipart()[1])
    sock.close(linger=0)
    assert server.proc.wait(timeout=15) == 0
    assert len(answered) == 50
    assert all(b'"status":"ok"' in reply for reply in answered)


def test_over_ipc_zmtp_peers_are_served_and_a_broken_one_is_counted(
    start_pageserver: StartPageServer, zmq_context: zmq.Context, tmp_path: Path
) -> None:
    """Plaintext, the page server serves its ROUTER from its own loop (zmtp_router): a libzmq
    REQ and DEALER are served as by libzmq's ROUTER; a peer that breaks ZMTP is closed and
    counted; the socket file goes away with the server."""
    path = tmp_path / "ps.sock"
    server = start_pageserver(extra=["--listen", f"ipc://{path}"])
    assert server.ready["endpoint"] == f"ipc://{path}"
    broken = socket.socket(socket.AF_UNIX)
    broken.settimeout(10)
    broken.connect(str(path))
    broken.sendall(b"GET /metrics HTTP/1.1\r\n\r\n" + bytes(64))
    while broken.recv(4096):
        pass  # until the server closes the connection
    broken.close()
    req = zmq_context.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(server.ready["endpoint"])
    _, header, keys = encode(
        GetPagesRequest(msg_id=7, tenant="t", volume=0, count=1), make_keys([0], [0])
    )
    req.send_multipart([header, keys])  # a REQ puts the empty delimiter first itself
    assert req.poll(10000)
    reply = req.recv_multipart()
    req.close(linger=0)
    assert b'"parent_id":7' in reply[0] and b'"status":"ok"' in reply[0]
    with client_of(server) as client:
        data = pages_of(8, 3)
        assert client.put("t", 0, make_keys([0] * 8, range(8)), data) == 8
        assert np.array_equal(client.get("t", 0, make_keys([0] * 8, range(8)))[2], data)
    assert scrape(server)['pageserver_malformed_messages_total{reason="bad_frames"}'] == 1
    server.stop()
    assert not path.exists()


def test_startup_errors_exit_2_with_one_line(shm_dir: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "remem_cli", "pageserver", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad = run("--capacity", "12 parsecs")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--capacity" in bad.stderr
    arena = str(shm_dir / "mismatch.arena")
    common = ["--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", "--shm-path", arena]
    proc = subprocess.Popen(
        [sys.executable, "-m", "remem_cli", "pageserver", "--capacity", "1MiB", *common],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if "ready" in line:
            break
    proc.terminate()
    assert proc.wait(timeout=15) == 0
    proc.stderr.close()
    mismatch = run("--capacity", "2MiB", *common)
    assert mismatch.returncode == 2 and "--forget" in mismatch.stderr
