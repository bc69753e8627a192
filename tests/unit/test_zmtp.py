"""remem_client.zmtp against libzmq itself: the asyncio DEALER must be a peer a libzmq ROUTER
cannot tell from a libzmq DEALER, and must survive whatever a broken peer sends."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_client.zmtp import (
    GREETING,
    DealerBusy,
    FrameReader,
    ZmtpDealer,
    ZmtpError,
    ready_command,
    zmtp_buffers,
)
from remem_common.zmtp import LARGE_FRAMES_PER_BUFFER

# Sizes either side of every boundary of the framing: empty, the short/long size switch at
# 256, the 256 KiB receive buffer, and a 4 MiB page batch.
SIZES = [0, 1, 255, 256, 4096, 65536, (256 << 10) - 5, (256 << 10) + 7, 4 << 20]


class EchoRouter:
    """A libzmq ROUTER in a thread that sends every message back to its sender."""

    def __init__(self, endpoint: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.router.bind(endpoint)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
        self.received = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if self.router.poll(20):
                frames = self.router.recv_multipart()
                self.received += 1
                self.router.send_multipart(frames)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.router.close()
        self.context.term()


@pytest.fixture(params=["ipc", "tcp"])
def router(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EchoRouter]:
    endpoint = f"ipc://{tmp_path}/r.sock" if request.param == "ipc" else "tcp://127.0.0.1:0"
    echo = EchoRouter(endpoint)
    yield echo
    echo.close()


async def _exchange(dealer_endpoint: str, messages: list[list[bytes]]) -> list[list[bytes]]:
    got: asyncio.Queue[list[bytes]] = asyncio.Queue()
    dealer = ZmtpDealer(dealer_endpoint, lambda frames: got.put_nowait([bytes(f) for f in frames]))
    try:
        for frames in messages:
            dealer.send(frames)
        return [await asyncio.wait_for(got.get(), 10) for _ in messages]
    finally:
        dealer.close()


def test_every_frame_size_round_trips_through_a_libzmq_router(router: EchoRouter) -> None:
    messages = [[b"", os.urandom(size), b"tail"] for size in SIZES]
    messages.append([os.urandom(n) for n in SIZES])  # one message of every size
    assert asyncio.run(_exchange(router.endpoint, messages)) == messages


def test_a_burst_larger_than_the_socket_buffers_waits_in_the_queue(router: EchoRouter) -> None:
    """40 messages of 4 MiB at once: the kernel takes a few MiB, the rest waits for the
    socket to drain (none refused: 40 is under the default hwm)."""
    block = os.urandom(4 << 20)
    messages = [[b"", b"%d" % index, block] for index in range(40)]
    assert asyncio.run(_exchange(router.endpoint, messages)) == messages


def test_a_peer_that_stops_reading_gets_hwm_messages_then_refusals(tmp_path: Path) -> None:
    path = str(tmp_path / "deaf.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.sendall(GREETING + ready_command(b"ROUTER"))
        accepted.append(conn)  # and never read

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    async def scenario() -> int:
        dealer = ZmtpDealer(f"ipc://{path}", lambda f: None, hwm=8)
        block = bytes(1 << 20)
        try:
            while not dealer.connected:
                await asyncio.sleep(0.01)  # polling the dealer's own state
            for sent in range(10_000):
                try:
                    dealer.send([b"", block])
                except DealerBusy:
                    return sent
                await asyncio.sleep(0)  # let the loop write what the socket takes
            return -1
        finally:
            dealer.close()

    sent = asyncio.run(scenario())
    thread.join(5)
    for conn in accepted:
        conn.close()
    listener.close()
    # What the kernel buffers (a few MiB on a Unix socket) plus the 8 queued.
    assert 8 < sent < 200, sent


def test_sends_before_the_router_exists_are_delivered_once_it_binds(tmp_path: Path) -> None:
    """As a libzmq DEALER: connect first, queue, deliver after the handshake."""
    endpoint = f"ipc://{tmp_path}/late.sock"

    async def scenario() -> list[list[bytes]]:
        got: asyncio.Queue[list[bytes]] = asyncio.Queue()
        dealer = ZmtpDealer(endpoint, lambda f: got.put_nowait([bytes(x) for x in f]))
        dealer.send([b"", b"early"])
        # The router is not there yet: the dealer keeps retrying, and holds the message.
        while dealer.refused_attempts < 3:
            await asyncio.sleep(0.01)  # polling the dealer's own state
        assert not dealer.connected
        echo = EchoRouter(endpoint)
        try:
            return [await asyncio.wait_for(got.get(), 10)]
        finally:
            dealer.close()
            echo.close()

    assert asyncio.run(scenario()) == [[b"", b"early"]]


def test_a_router_restart_is_reconnected(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/again.sock"

    async def scenario() -> list[bytes]:
        got: asyncio.Queue[list[bytes]] = asyncio.Queue()
        dealer = ZmtpDealer(endpoint, lambda f: got.put_nowait([bytes(x) for x in f]))
        answers = []
        try:
            for round_number in range(2):
                echo = EchoRouter(endpoint)
                while not dealer.connected:
                    await asyncio.sleep(0.01)  # polling the dealer's own state
                dealer.send([b"", b"round %d" % round_number])
                answers.append((await asyncio.wait_for(got.get(), 10))[1])
                echo.close()
                while dealer.connected:
                    await asyncio.sleep(0.01)
        finally:
            dealer.close()
        return answers

    assert asyncio.run(scenario()) == [b"round 0", b"round 1"]


def test_a_full_queue_refuses_instead_of_buffering_without_bound(tmp_path: Path) -> None:
    async def scenario() -> None:
        dealer = ZmtpDealer(f"ipc://{tmp_path}/nobody.sock", lambda f: None, hwm=3)
        try:
            for _ in range(3):
                dealer.send([b"", b"x"])
            with pytest.raises(DealerBusy):
                dealer.send([b"", b"x"])
        finally:
            dealer.close()

    asyncio.run(scenario())


def _fake_server(path: str, reply: bytes) -> threading.Thread:
    """A server that answers one connection with `reply` and closes."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(1024)
        conn.sendall(reply)
        conn.recv(1024)  # until the dealer drops us
        conn.close()
        listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize(
    ("what", "reply"),
    [
        ("not ZMTP", b"HTTP/1.1 400 Bad Request\r\n" + bytes(64)),
        ("ZMTP 2", b"\xff" + bytes(8) + b"\x7f\x01" + bytes(53)),
        ("CURVE", GREETING[:12] + b"CURVE".ljust(20, b"\0") + GREETING[32:]),
        ("a DEALER", GREETING + ready_command(b"DEALER")),
        ("reserved flag bits", GREETING + ready_command(b"ROUTER") + b"\x40\x00"),
        ("a 1 TiB frame", GREETING + ready_command(b"ROUTER") + b"\x02" + (1 << 40).to_bytes(8)),
        ("a truncated READY", GREETING + b"\x04\x03\x05REA"),
    ],
)
def test_a_peer_that_breaks_zmtp_is_dropped_and_counted(
    tmp_path: Path, what: str, reply: bytes
) -> None:
    path = str(tmp_path / "bad.sock")
    server = _fake_server(path, reply)
    violations: list[ZmtpError] = []

    async def scenario() -> None:
        dealer = ZmtpDealer(f"ipc://{path}", lambda f: None, on_violation=violations.append)
        try:
            for _ in range(500):
                if violations or not server.is_alive():
                    break
                await asyncio.sleep(0.01)  # polling for the violation the dealer reports
        finally:
            dealer.close()

    asyncio.run(scenario())
    server.join(5)
    assert violations, what


def test_the_reader_hands_out_frames_that_later_reads_never_overwrite() -> None:
    """Frames are views into the receive buffer: a buffer is never refilled once handed out."""
    commands: list[bytes] = []
    reader = FrameReader(lambda name, props: commands.append(name))
    stream = GREETING + ready_command(b"ROUTER")
    bodies = [os.urandom(n) for n in (10, 300, 200_000, 100_000, 5, 1 << 20)]
    for body in bodies:
        stream += b"".join(bytes(part) for part in zmtp_buffers([body]))
    kept = []
    at = 0
    while at < len(stream):
        buf = reader.buffer()
        n = min(len(buf), 7777, len(stream) - at)  # odd read sizes split every header
        buf[:n] = stream[at : at + n]
        at += n
        kept += reader.advance(n)
    assert commands == [b"READY"]
    assert [bytes(frames[0]) for frames in kept] == bodies


def test_large_frames_share_buffers_made_with_room_for_the_next_ones() -> None:
    """A stream of 1 MiB replies read as the kernel hands it over (about 200 KiB a read):
    a buffer made for a large frame takes the next ones too, so only a few are made (and
    only the frames that straddle a buffer's end are moved)."""
    reader = FrameReader(lambda name, props: None)
    messages = [[b"h" * 60, os.urandom(1 << 20), b"s" * 7168] for _ in range(12)]
    stream = GREETING + ready_command(b"ROUTER")
    for frames in messages:
        stream += b"".join(bytes(part) for part in zmtp_buffers(frames))
    received = []
    at = 0
    while at < len(stream):
        buf = reader.buffer()
        n = min(len(buf), 200_000, len(stream) - at)
        buf[:n] = stream[at : at + n]
        at += n
        received += reader.advance(n)
    assert [[bytes(frame) for frame in frames] for frames in received] == messages
    buffers = {id(frames[1].obj) for frames in received}
    assert len(buffers) <= len(messages) // LARGE_FRAMES_PER_BUFFER + 2


def test_a_strided_array_is_sent_as_its_bytes_in_order() -> None:
    strided = np.arange(48, dtype=np.uint8).reshape(6, 8)[:, ::2]
    reader = FrameReader(lambda name, props: None)
    stream = GREETING + b"".join(bytes(p) for p in zmtp_buffers([strided, b"end"]))
    buf = reader.buffer()
    buf[: len(stream)] = stream
    (message,) = reader.advance(len(stream))
    assert [bytes(f) for f in message] == [strided.tobytes(), b"end"]
