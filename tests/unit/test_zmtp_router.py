"""remem_common.zmtp_router against libzmq itself: pyzmq DEALER and REQ sockets must not
tell it from a libzmq ROUTER, over ipc and tcp, and nothing a peer sends may take it down."""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from remem_client.zmtp import ZmtpDealer
from remem_common.zmtp import (
    GREETING,
    RX_CHUNK,
    UNIX_SEND_BUFFER,
    FrameReader,
    command_frame,
    ready_command,
    zmtp_buffers,
)
from remem_common.zmtp_router import ZmtpRouter, speaks_zmtp

# Sizes either side of every boundary of the framing: empty, the short/long size switch at
# 256, the 256 KiB receive buffer, and a 4 MiB page batch.
SIZES = [0, 1, 255, 256, 4096, 65536, (256 << 10) - 5, (256 << 10) + 7, 4 << 20]
WAIT = 10.0
# What a Unix socket's SO_SNDBUF reads as when nobody set it (net.core.wmem_default).
DEFAULT_SEND_BUFFER = int(Path("/proc/sys/net/core/wmem_default").read_text())
SOL_SOCKET, SO_SNDBUF = socket.SOL_SOCKET, socket.SO_SNDBUF


class RouterThread:
    """A ZmtpRouter served from a thread of its own, as the page server's loop serves it.

    Every message received is put on `received` as (routing id, frames as bytes), then
    answered by `reply` (default: its own frames, an echo); `handled` counts them.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = 1000,
        reply: Callable[[list[bytes]], list[Any] | None] = lambda frames: frames,
    ) -> None:
        self.router = ZmtpRouter(hwm=hwm, on_violation=lambda exc: self.violations.put(exc))
        self.endpoint = self.router.bind(endpoint)
        self.received: queue.Queue[tuple[bytes, list[bytes]]] = queue.Queue()
        self.violations: queue.Queue[Exception] = queue.Queue()
        self.handled = 0
        self.refused: list[int] = []  # indexes of messages whose reply send() refused
        self._reply = reply
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _handle(self, frames: list[Any]) -> None:
        routing_id, *body = frames
        copied = [bytes(frame) for frame in body]  # the frames are only valid until we return
        self.received.put((routing_id, copied))
        answer = self._reply(copied)
        if answer is not None and not self.router.send([routing_id, *answer]):
            self.refused.append(self.handled)
        self.handled += 1

    def _serve(self) -> None:
        while not self._stop.is_set():
            self.router.serve(self._handle, 20)

    def close(self, *, unbind: bool = True) -> None:
        """Stop serving; without `unbind`, leave the ipc socket file as a killed server does."""
        self._stop.set()
        self._thread.join(WAIT)
        if not unbind:
            self.router._ipc_path = None  # close() then leaves the socket file behind
        self.router.close()


def endpoint_of(transport: str, tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/router.sock" if transport == "ipc" else "tcp://127.0.0.1:*"


@pytest.fixture(params=["ipc", "tcp"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def router(transport: str, tmp_path: Path) -> Iterator[RouterThread]:
    served = RouterThread(endpoint_of(transport, tmp_path))
    yield served
    served.close()


def socket_of(
    context: zmq.Context[zmq.Socket[bytes]], kind: int, endpoint: str, **options: Any
) -> zmq.Socket[bytes]:
    sock = context.socket(kind)
    sock.linger = 0
    sock.rcvtimeo = int(WAIT * 1000)
    for name, value in options.items():
        setattr(sock, name, value)
    sock.connect(endpoint)
    return sock


def test_a_dealer_and_a_req_round_trip_every_frame_size(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    dealer = socket_of(zmq_context, zmq.DEALER, router.endpoint)
    req = socket_of(zmq_context, zmq.REQ, router.endpoint)
    try:
        messages = [[b"", os.urandom(size), b"tail"] for size in SIZES]
        messages.append([b"", *(os.urandom(size) for size in SIZES)])
        for message in messages:
            dealer.send_multipart(message)
        assert [dealer.recv_multipart() for _ in messages] == messages
        for message in messages:  # a REQ adds the empty delimiter itself
            req.send_multipart(message[1:])
            assert req.recv_multipart() == message[1:]
    finally:
        dealer.close()
        req.close()


def test_routing_ids_are_libzmqs_or_the_peers_identity(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    anonymous = socket_of(zmq_context, zmq.DEALER, router.endpoint)
    alice = socket_of(zmq_context, zmq.DEALER, router.endpoint, routing_id=b"alice")
    try:
        anonymous.send_multipart([b"", b"who"])
        assert anonymous.recv_multipart() == [b"", b"who"]
        routing_id, _ = router.received.get(timeout=WAIT)
        assert len(routing_id) == 5 and routing_id[0] == 0  # as libzmq makes them
        alice.send_multipart([b"", b"me"])
        assert alice.recv_multipart() == [b"", b"me"]
        assert router.received.get(timeout=WAIT) == (b"alice", [b"", b"me"])
    finally:
        anonymous.close()
        alice.close()


def test_a_second_connection_with_an_id_in_use_is_refused(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    first = socket_of(zmq_context, zmq.DEALER, router.endpoint, routing_id=b"same")
    second = socket_of(zmq_context, zmq.DEALER, router.endpoint, routing_id=b"same", rcvtimeo=300)
    try:
        first.send_multipart([b"", b"first"])
        assert first.recv_multipart() == [b"", b"first"]
        second.send_multipart([b"", b"second"])
        with pytest.raises(zmq.Again):
            second.recv_multipart()
        first.send_multipart([b"", b"still"])
        assert first.recv_multipart() == [b"", b"still"]
        assert router.violations.empty()  # refused, not counted as broken
    finally:
        first.close()
        second.close()


def test_replies_larger_than_the_socket_buffers_wait_for_the_peer(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """40 replies of 4 MiB at once: the kernel takes a few MiB, the rest is written as the
    peer reads (EPOLLOUT), in order, none dropped."""
    dealer = socket_of(zmq_context, zmq.DEALER, router.endpoint)
    block = os.urandom(4 << 20)
    try:
        messages = [[b"", b"%d" % index, block] for index in range(40)]
        for message in messages:
            dealer.send_multipart(message)
        assert [dealer.recv_multipart() for _ in messages] == messages
        assert router.refused == []
    finally:
        dealer.close()


def test_a_peer_that_disconnects_and_reconnects_is_served_again(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    for round_number in range(3):
        dealer = socket_of(zmq_context, zmq.DEALER, router.endpoint, routing_id=b"back")
        try:
            dealer.send_multipart([b"", b"round %d" % round_number])
            assert dealer.recv_multipart() == [b"", b"round %d" % round_number]
        finally:
            dealer.close()
        # The id is free again once the router has seen the connection go.
        wait_for(lambda: b"back" not in router.router._by_id)
    assert router.violations.empty()


def test_a_restarted_router_on_the_same_ipc_path_is_reconnected(
    tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """The page server's restart: the old one killed (its socket file left behind), the new
    one binds the same path; a libzmq DEALER reconnects by itself."""
    endpoint = f"ipc://{tmp_path}/restart.sock"
    first = RouterThread(endpoint)
    dealer = socket_of(zmq_context, zmq.DEALER, endpoint)
    try:
        dealer.send_multipart([b"", b"before"])
        assert dealer.recv_multipart() == [b"", b"before"]
        first.close(unbind=False)
        assert stat.S_ISSOCK(os.lstat(tmp_path / "restart.sock").st_mode)
        second = RouterThread(endpoint)
        try:
            dealer.send_multipart([b"", b"after"])
            assert dealer.recv_multipart() == [b"", b"after"]
        finally:
            second.close()
        assert not (tmp_path / "restart.sock").exists()  # removed at unbind
    finally:
        dealer.close()


def test_a_file_that_is_not_a_socket_is_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "taken"
    path.write_text("data")
    router = ZmtpRouter()
    try:
        with pytest.raises(OSError):
            router.bind(f"ipc://{path}")
    finally:
        router.close()
    assert path.read_text() == "data"


def test_unbinding_leaves_a_successors_socket_file_alone(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/shared.sock"
    old, new = ZmtpRouter(), ZmtpRouter()
    try:
        old.bind(endpoint)
        new.bind(endpoint)  # a restart that began before the old process finished
        old.close()
        assert stat.S_ISSOCK(os.lstat(tmp_path / "shared.sock").st_mode)
    finally:
        new.close()
    assert not (tmp_path / "shared.sock").exists()


class RawPeer:
    """A hand-driven ZMTP peer on a plain socket (for what libzmq would never send)."""

    def __init__(self, endpoint: str) -> None:
        if endpoint.startswith("ipc://"):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(endpoint[len("ipc://") :])
        else:
            host, _, port = endpoint[len("tcp://") :].rpartition(":")
            self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(WAIT)

    def handshake(self, socket_type: bytes = b"DEALER") -> None:
        self.sock.sendall(GREETING + ready_command(socket_type))

    def send(self, frames: list[bytes]) -> None:
        self.sock.sendall(b"".join(bytes(part) for part in zmtp_buffers(frames)))

    def read_until_closed(self) -> bytes:
        """Everything the router sends until it closes the connection."""
        data = b""
        while chunk := self.sock.recv(1 << 16):
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize(
    ("what", "stream"),
    [
        ("not ZMTP", b"GET / HTTP/1.1\r\n\r\n" + bytes(64)),
        ("ZMTP 2", b"\xff" + bytes(8) + b"\x7f\x01" + bytes(53)),
        ("CURVE", GREETING[:12] + b"CURVE".ljust(20, b"\0") + GREETING[32:]),
        ("a PUB socket", GREETING + ready_command(b"PUB")),
        ("reserved flag bits", GREETING + ready_command(b"DEALER") + b"\x40\x00"),
        ("a 1 TiB frame", GREETING + ready_command(b"DEALER") + b"\x02" + (1 << 40).to_bytes(8)),
        ("a truncated READY", GREETING + b"\x04\x03\x05REA"),
        ("a message before READY", GREETING + b"\x00\x02hi"),
        ("a second READY", GREETING + ready_command(b"DEALER") * 2),
    ],
)
def test_a_peer_that_breaks_zmtp_is_closed_and_counted(
    router: RouterThread, zmq_context: zmq.Context[zmq.Socket[bytes]], what: str, stream: bytes
) -> None:
    peer = RawPeer(router.endpoint)
    try:
        peer.sock.sendall(stream)
        assert peer.read_until_closed().startswith(GREETING), what  # then closed
    finally:
        peer.close()
    router.violations.get(timeout=WAIT)
    assert router.router.violations == 1
    # and the router serves everyone else as before
    dealer = socket_of(zmq_context, zmq.DEALER, router.endpoint)
    try:
        dealer.send_multipart([b"", b"fine"])
        assert dealer.recv_multipart() == [b"", b"fine"]
    finally:
        dealer.close()


def test_a_ping_is_answered_with_its_context(router: RouterThread) -> None:
    peer = RawPeer(router.endpoint)
    try:
        peer.handshake()
        peer.sock.sendall(command_frame(b"PING", b"\x00\x0a" + b"ctx"))
        expected = GREETING + ready_command(b"ROUTER") + command_frame(b"PONG", b"ctx")
        got = b""
        while len(got) < len(expected):
            got += peer.sock.recv(1024)
        assert got == expected
    finally:
        peer.close()


def test_a_peer_that_stops_reading_gets_hwm_messages_queued_then_drops(
    transport: str, tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Each request is answered with 1 MiB; the peer never reads. The kernel takes a few MiB,
    then 8 (the hwm) wait in the queue, and every reply after that is dropped, as libzmq's
    ROUTER drops on a full pipe. Other peers are served meanwhile."""
    block = bytes(1 << 20)
    served = RouterThread(endpoint_of(transport, tmp_path), hwm=8, reply=lambda f: [b"", block])
    deaf = RawPeer(served.endpoint)
    try:
        deaf.handshake()
        requests = 200
        for index in range(requests):
            deaf.send([b"", b"%d" % index])
        wait_for(lambda: served.handled == requests)
        assert served.refused, "nothing was dropped"
        first_drop = served.refused[0]
        assert 8 <= first_drop < 150, first_drop  # the queue of 8 plus socket buffers
        assert served.refused == list(range(first_drop, requests))
        assert served.router.dropped == requests - first_drop
        dealer = socket_of(zmq_context, zmq.DEALER, served.endpoint)
        try:
            dealer.send_multipart([b"", b"other"])
            assert dealer.recv_multipart() == [b"", block]
        finally:
            dealer.close()
    finally:
        deaf.close()
        served.close()


def test_a_reused_buffer_hands_out_every_message_whole() -> None:
    """The router's reader refills one buffer: each message must be intact when handed out,
    whatever the read sizes, frame sizes (either side of the buffer's) and commands between."""
    rng = np.random.default_rng(5)
    commands: list[bytes] = []
    reader = FrameReader(lambda name, props: commands.append(name), reuse=True)
    sizes = [0, 3, 300, 40_000, RX_CHUNK - 20, RX_CHUNK + 20, 1 << 20, 5 << 20]
    messages = [
        [rng.bytes(int(size)) for size in rng.choice(sizes, rng.integers(1, 5))] for _ in range(60)
    ]
    stream = GREETING + ready_command(b"DEALER")
    for index, message in enumerate(messages):
        stream += b"".join(bytes(part) for part in zmtp_buffers(message))
        if index % 7 == 0:
            stream += command_frame(b"PING", b"\x00\x01")
    got: list[list[bytes]] = []
    at = 0
    while at < len(stream):
        buffer = reader.buffer()
        count = min(len(buffer), int(rng.integers(1, 300_000)), len(stream) - at)
        buffer[:count] = stream[at : at + count]
        at += count
        got += [[bytes(frame) for frame in frames] for frames in reader.advance(count)]
    assert got == messages
    assert commands == [b"READY"] + [b"PING"] * 9


@pytest.mark.parametrize(
    ("endpoint", "spoken"),
    [
        ("ipc:///run/remem/ps.sock", True),
        ("ipc://relative.sock", True),
        ("ipc://@abstract", False),
        ("ipc://*", False),
        ("tcp://127.0.0.1:7100", True),
        ("tcp://*:*", True),
        ("tcp://[::1]:0", True),
        ("tcp://eth0:7100", False),
        ("tcp://localhost:7100", False),
        ("inproc://pageserver", False),
    ],
)
def test_zmtp_binds_what_it_can_reach_and_leaves_the_rest_to_libzmq(
    endpoint: str, spoken: bool
) -> None:
    assert speaks_zmtp(endpoint) is spoken


def test_the_bound_endpoint_names_the_port_chosen() -> None:
    router = ZmtpRouter()
    try:
        bound = router.bind("tcp://*:*")
        host, _, port = bound.rpartition(":")
        assert host == "tcp://0.0.0.0" and int(port) > 0
    finally:
        router.close()


def wait_for(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Wait until `condition()` holds (the router thread gets there by itself)."""
    done = threading.Event()
    for _ in range(int(timeout * 100)):
        if condition():
            return
        done.wait(0.01)
    raise AssertionError("condition not met in time")


def serve_until(
    router: ZmtpRouter, handle: Callable[[list[Any]], None], done: Callable[[], bool]
) -> None:
    """Serve from this thread until `done()` (the test fails after WAIT seconds)."""
    deadline = time.monotonic() + WAIT
    while not done():
        assert time.monotonic() < deadline, "timed out"
        router.serve(handle, 20)


def test_kept_frames_stay_valid_while_later_messages_arrive(
    transport: str, tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    # The mirror queues frames for its writer thread: they must not be overwritten by what
    # the router reads next.
    router = ZmtpRouter(keep_frames=True)
    dealer = socket_of(zmq_context, zmq.DEALER, router.bind(endpoint_of(transport, tmp_path)))
    try:
        sent = [[b"", os.urandom(size)] for size in SIZES * 3]
        kept: list[list[Any]] = []
        for message in sent:
            dealer.send_multipart(message)
        serve_until(router, kept.append, lambda: len(kept) == len(sent))
        assert [[bytes(frame) for frame in frames[1:]] for frames in kept] == sent
    finally:
        dealer.close()
        router.close()


def test_drain_stops_after_the_reads_asked_for(
    tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    router = ZmtpRouter()
    endpoint = router.bind(endpoint_of("ipc", tmp_path))
    dealers = [socket_of(zmq_context, zmq.DEALER, endpoint) for _ in range(2)]
    try:
        got: list[bytes] = []
        for index, dealer in enumerate(dealers):  # handshakes first
            dealer.send_multipart([b"", b"hello %d" % index])
        serve_until(router, lambda frames: got.append(bytes(frames[-1])), lambda: len(got) == 2)
        for index, dealer in enumerate(dealers):
            dealer.send_multipart([b"", b"again %d" % index])
        # Both connections readable: their events stay pending (level-triggered) until read.
        deadline = time.monotonic() + WAIT
        while len(router._epoll.poll(0.02)) < 2:
            assert time.monotonic() < deadline, "timed out"
        assert router.drain(lambda frames: got.append(bytes(frames[-1])), 1) == 1
        assert len(got) == 3
        serve_until(router, lambda frames: got.append(bytes(frames[-1])), lambda: len(got) == 4)
    finally:
        for dealer in dealers:
            dealer.close()
        router.close()


def test_send_all_answers_every_peer_and_close_lingers_for_the_rest(
    transport: str, tmp_path: Path, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    router = ZmtpRouter()
    endpoint = router.bind(endpoint_of(transport, tmp_path))
    dealers = [socket_of(zmq_context, zmq.DEALER, endpoint) for _ in range(2)]
    try:
        received: list[list[Any]] = []
        for index, dealer in enumerate(dealers):
            dealer.send_multipart([b"", b"%d" % index])
        serve_until(
            router,
            lambda frames: received.append([bytes(f) for f in frames]),
            lambda: len(received) == 2,
        )
        big = os.urandom(8 << 20)  # more than a socket buffer: left queued when sent
        replies = [[routing, b"", b"reply", big] for routing, *_ in received for _ in range(2)]
        assert router.send_all(replies) == 0
        router.close(linger_ms=int(WAIT * 1000))  # what is still queued leaves first
        for dealer in dealers:
            for _ in range(2):
                assert dealer.recv_multipart() == [b"", b"reply", big]
    finally:
        for dealer in dealers:
            dealer.close()


def test_both_ends_of_a_unix_link_can_queue_a_whole_page_batch(tmp_path: Path) -> None:
    """The client's DEALER and the router's accepted connection ask for UNIX_SEND_BUFFER: a
    4 MiB batch crossed the default (~208 KiB) in pieces that each woke both processes."""
    wanted = min(UNIX_SEND_BUFFER, int(Path("/proc/sys/net/core/wmem_max").read_text()))
    if wanted <= DEFAULT_SEND_BUFFER:
        pytest.skip("net.core.wmem_max leaves no room above the default send buffer")
    served = RouterThread(endpoint_of("ipc", tmp_path))

    async def send_buffers() -> tuple[int, int]:
        """The dealer's and the router's side, while the link is up."""
        got: asyncio.Queue[list[bytes]] = asyncio.Queue()
        dealer = ZmtpDealer(served.endpoint, lambda frames: got.put_nowait(frames))
        try:
            dealer.send([b"", b"hello"])
            await asyncio.wait_for(got.get(), WAIT)
            transport = dealer._transport
            assert transport is not None
            (peer,) = served.router._peers.values()
            return (
                int(transport.get_extra_info("socket").getsockopt(SOL_SOCKET, SO_SNDBUF)),
                peer.sock.getsockopt(SOL_SOCKET, SO_SNDBUF),
            )
        finally:
            dealer.close()

    try:
        # The kernel reports twice what was asked (its bookkeeping overhead included).
        dealer_side, router_side = asyncio.run(send_buffers())
        assert dealer_side >= wanted
        assert router_side >= wanted
    finally:
        served.close()
