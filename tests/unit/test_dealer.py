"""remem_client.dealer: the pending-request table on its own, then the dealer over a real
libzmq ROUTER in both of its modes (ZMTP from the loop for plaintext tcp/ipc; libzmq for
Curve and for inproc), losing its connection and finding the router again, and every link
counting its peer's ZMTP violations and failing its requests when its connection is lost."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zmq
from remem_client.dealer import (
    DealerBusy,
    LibzmqDealer,
    PendingRequests,
    ZmtpDealer,
    open_dealer,
    speaks_zmtp,
)
from remem_client.links import PageServerLink, ReplicaFailure, page_keys
from remem_client.metrics import MalformedReplies
from remem_client.mirror_link import MirrorFailure, MirrorLink
from remem_client.placement_link import PlacementLink, PlacementLinkError
from remem_client.zmtp import GREETING, ZmtpError, ready_command
from remem_common.framing import encode
from remem_common.pageserver_client import REPLY_ADAPTER, AnyReply
from remem_common.protocol.client_pageserver import PutPagesReply
from remem_common.protocol.envelope import ErrorCode, ErrorReply
from remem_common.protocol.pages import SLAB_PAGES
from remem_common.security import Security, write_keypair

Context = zmq.Context[zmq.Socket[bytes]]


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll the test's own state until `predicate` holds (the loop runs meanwhile)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def reply_to(msg_id: int) -> list[bytes]:
    """The frames of a page server's answer to request `msg_id`, as a DEALER receives them."""
    return encode(PutPagesReply(msg_id=0, parent_id=msg_id, stored=1))


class Table:
    """A PendingRequests of page server replies with short timeouts, recording expiries."""

    def __init__(self, timeout: float = 0.05) -> None:
        self.malformed = MalformedReplies()
        self.expired: list[asyncio.Future[Any]] = []
        self.pending: PendingRequests[AnyReply] = PendingRequests(
            REPLY_ADAPTER,
            peer="pageserver",
            timeout=timeout,
            on_expire=self.expired.append,
            malformed=self.malformed,
        )
        self.loop = asyncio.get_running_loop()

    def request(self) -> tuple[int, asyncio.Future[Any]]:
        msg_id = self.pending.next_id()
        future: asyncio.Future[Any] = self.loop.create_future()
        self.pending.add(msg_id, future)
        return msg_id, future

    async def expire_a_later_request(self) -> asyncio.Future[Any]:
        """Add a request and wait for it to expire: every request added before it with the
        same timeout had its chance to expire by then."""
        _, later = self.request()
        await until(lambda: later in self.expired)
        return later

    def malformed_total(self) -> int:
        return sum(count for (peer, _), count in self.malformed.counts.items())


# -- the pending-request table ----------------------------------------------------------------


async def test_an_answered_request_never_expires() -> None:
    table = Table()
    msg_id, future = table.request()
    taken = table.pending.take(reply_to(msg_id))
    assert taken is not None
    reply, payload, taken_future = taken
    assert isinstance(reply, PutPagesReply) and reply.parent_id == msg_id and payload == []
    assert taken_future is future and not future.done()  # the link resolves it, not the table
    later = await table.expire_a_later_request()
    assert table.expired == [later]
    assert len(table.pending) == 0


async def test_an_unanswered_request_expires_once_and_its_late_reply_is_counted() -> None:
    table = Table()
    msg_id, future = table.request()
    await until(lambda: bool(table.expired))
    assert table.expired == [future] and len(table.pending) == 0
    assert table.pending.take(reply_to(msg_id)) is None  # late: dropped...
    assert table.malformed.late["pageserver"] == 1  # ...and counted
    assert table.malformed_total() == 0
    later = await table.expire_a_later_request()
    assert table.expired == [future, later]  # the first one did not fire again


async def test_a_discarded_request_is_answered_late_and_never_expires() -> None:
    table = Table()
    msg_id, _ = table.request()
    table.pending.discard(msg_id)
    assert table.pending.take(reply_to(msg_id)) is None
    assert table.malformed.late["pageserver"] == 1
    later = await table.expire_a_later_request()
    assert table.expired == [later]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b""], "no_header"),
        ([b"", b"{not json"], "bad_json"),
        ([b"", b'{"type": "no_such_reply", "version": 1, "msg_id": 0}'], "unknown_type"),
        ([b"", b'{"type": "put_pages_reply", "version": 1, "msg_id": 0}'], "bad_fields"),
    ],
)
async def test_a_malformed_reply_is_counted_by_reason_and_the_request_still_waits(
    frames: list[bytes], reason: str
) -> None:
    table = Table(timeout=10.0)
    msg_id, future = table.request()
    assert table.pending.take(frames) is None
    assert table.malformed.counts[("pageserver", reason)] == 1
    assert table.malformed_total() == 1 and table.malformed.late["pageserver"] == 0
    taken = table.pending.take(reply_to(msg_id))
    assert taken is not None and taken[2] is future
    table.pending.fail_all(lambda: RuntimeError("unused"))


async def test_fail_all_fails_each_future_with_its_own_exception_and_stops_the_timers() -> None:
    table = Table()
    futures = [table.request()[1] for _ in range(3)]
    futures[1].cancel()  # a caller that gave up is left alone
    table.pending.fail_all(lambda: ConnectionError("closed"))
    assert len(table.pending) == 0
    errors = [future.exception() for future in (futures[0], futures[2])]
    assert all(isinstance(error, ConnectionError) for error in errors)
    assert errors[0] is not errors[1]
    later = await table.expire_a_later_request()
    assert table.expired == [later]


async def test_a_zmtp_violation_is_counted_as_bad_frames() -> None:
    table = Table()
    table.pending.violation(ZmtpError("frame flags 0x40 has reserved bits set"))
    assert table.malformed.counts[("pageserver", "bad_frames")] == 1


def test_zmtp_is_spoken_where_the_loop_can_reach_the_endpoint() -> None:
    assert speaks_zmtp("tcp://127.0.0.1:5555") and speaks_zmtp("ipc:///run/remem/ps.sock")
    assert not speaks_zmtp("inproc://pageserver") and not speaks_zmtp("ipc://@abstract")


# -- the dealer over a libzmq ROUTER ----------------------------------------------------------


class Router:
    """A libzmq ROUTER in a thread answering each request as a page server would, with the
    request's msg_id as parent_id. A request whose payload is b"hold" is answered only
    together with the next request (so its reply comes late, on the same connection)."""

    def __init__(self, context: Context, endpoint: str, secret_key: bytes | None) -> None:
        self.router = context.socket(zmq.ROUTER)
        self.router.linger = 0
        self.secret_key = secret_key  # a restarted router binds the same endpoint and key
        self.public_key: str | None = None  # z85, with Curve
        if secret_key is not None:
            public_key = zmq.curve_public(secret_key)
            self.router.curve_secretkey = secret_key
            self.router.curve_publickey = public_key
            self.router.curve_server = True
            self.public_key = public_key.decode()
        self.router.bind(endpoint)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()  # type: ignore[union-attr]
        self._held: list[list[bytes]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def holding(self) -> int:
        """Requests received and not answered yet (b"hold")."""
        return len(self._held)

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self.router.poll(20):
                continue
            routing, _, header, *payload = self.router.recv_multipart()
            msg_id = json.loads(header)["msg_id"]
            if payload == [b"hold"]:
                self._held.append([routing, *reply_to(msg_id)])
                continue
            for frames in self._held:
                self.router.send_multipart(frames)
            self._held.clear()
            self.router.send_multipart([routing, *reply_to(msg_id)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.router.close(linger=0)


@dataclass
class Link:
    """A dealer and its pending table, as a link holds them."""

    dealer: Any
    table: Table

    def on_message(self, frames: list[Any]) -> None:
        taken = self.table.pending.take(frames)
        if taken is not None and not taken[2].done():
            taken[2].set_result(taken[0])

    def request(self, payload: bytes = b"") -> asyncio.Future[Any]:
        msg_id = self.table.pending.next_id()
        header = json.dumps({"type": "put_pages_request", "msg_id": msg_id}).encode()
        self.dealer.send([b"", header, payload] if payload else [b"", header])
        future: asyncio.Future[Any] = self.table.loop.create_future()
        self.table.pending.add(msg_id, future)
        return future


MODES: dict[str, tuple[str, bool, type[ZmtpDealer | LibzmqDealer]]] = {
    # mode: (transport, Curve, the dealer open_dealer must pick)
    "zmtp-ipc": ("ipc", False, ZmtpDealer),
    "zmtp-tcp": ("tcp", False, ZmtpDealer),
    "libzmq-inproc": ("inproc", False, LibzmqDealer),
    "libzmq-curve-ipc": ("ipc", True, LibzmqDealer),
}


@pytest.fixture(params=list(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def served(mode: str, zmq_context: Context, tmp_path: Path) -> Iterator[tuple[Router, Security]]:
    """A Router for `mode` and the client security that reaches it."""
    transport, curve, _ = MODES[mode]
    endpoint = {
        "ipc": f"ipc://{tmp_path}/router.sock",
        "tcp": "tcp://127.0.0.1:0",
        "inproc": f"inproc://router-{mode}",
    }[transport]
    security = Security.insecure()
    secret_key = None
    if curve:
        _, secret_path = write_keypair(tmp_path / "keys", "host", "client", "acme")
        security = Security.curve(secret_path)
        _, secret_key = zmq.curve_keypair()
    router = Router(zmq_context, endpoint, secret_key)
    yield router, security
    router.close()


def open_link(
    router: Router, security: Security, context: Context, table: Table, **options: Any
) -> Link:
    """A Link to `router`; `options` go to open_dealer (on_disconnect, ...)."""
    link = Link(None, table)
    link.dealer = open_dealer(
        router.endpoint,
        link.on_message,
        context=context,
        security=security,
        server_key=router.public_key,
        hwm=256,
        on_violation=table.pending.violation,
        **options,
    )
    return link


async def test_a_burst_of_requests_is_answered_each_to_its_own(
    mode: str, served: tuple[Router, Security], zmq_context: Context
) -> None:
    """More requests than one wake-up reads: libzmq's edge-triggered FD must not strand any."""
    router, security = served
    link = open_link(router, security, zmq_context, Table(timeout=10.0))
    try:
        assert isinstance(link.dealer, MODES[mode][2])
        futures = [link.request() for _ in range(200)]
        replies = await asyncio.wait_for(asyncio.gather(*futures), 10)
        assert [reply.parent_id for reply in replies] == list(range(1, 201))
        assert len(link.table.pending) == 0 and link.table.malformed_total() == 0
    finally:
        link.dealer.close()


async def test_a_reply_after_its_timeout_is_late_and_the_link_goes_on(
    served: tuple[Router, Security], zmq_context: Context
) -> None:
    router, security = served
    link = open_link(router, security, zmq_context, Table(timeout=0.5))
    try:
        await asyncio.wait_for(link.request(), 10)  # connected (a Curve handshake takes a while)
        held = link.request(b"hold")
        await until(lambda: held in link.table.expired)
        answered = await asyncio.wait_for(link.request(), 10)  # releases the held reply first
        assert answered.parent_id == 3 and not held.done()
        assert link.table.malformed.late["pageserver"] == 1
        assert link.table.expired == [held]
    finally:
        link.dealer.close()


async def test_a_closed_dealer_refuses_and_delivers_nothing_more(
    served: tuple[Router, Security], zmq_context: Context
) -> None:
    router, security = served
    link = open_link(router, security, zmq_context, Table(timeout=1.0))
    try:
        await asyncio.wait_for(link.request(), 10)
        unanswered = link.request()
    finally:
        link.dealer.close()
    link.dealer.close()  # twice is fine
    with pytest.raises(DealerBusy):
        link.dealer.send([b"", b"{}"])
    # The router answers within milliseconds; a closed dealer hands nothing on, so the
    # request runs into its timeout.
    await until(lambda: unanswered in link.table.expired)
    assert not unanswered.done() and link.table.malformed.late["pageserver"] == 0


@pytest.mark.parametrize("refuse", [True, False], ids=["refusing", "queueing"])
async def test_a_lost_connection_fails_what_was_in_flight_at_once_and_the_router_is_found_again(
    mode: str, served: tuple[Router, Security], zmq_context: Context, refuse: bool
) -> None:
    """The router goes away with a request unanswered: `on_disconnect` is told at once (the
    request would otherwise wait 30 s). Until a router is back on the endpoint, a send is
    refused (`refuse_while_reconnecting`) or queued for it; then requests are answered."""
    if MODES[mode][0] == "inproc":
        pytest.skip("an inproc connection is never lost")
    router, security = served
    table = Table(timeout=30.0)
    losses: list[int] = []  # requests waiting at each loss

    def lost() -> None:
        losses.append(len(table.pending))
        table.pending.fail_all(lambda: ConnectionError("connection lost"))

    link = open_link(
        router, security, zmq_context, table, on_disconnect=lost, refuse_while_reconnecting=refuse
    )
    again: Router | None = None
    try:
        await asyncio.wait_for(link.request(), 10)  # connected (Curve's handshake included)
        held = link.request(b"hold")
        await until(lambda: router.holding == 1)  # received: in flight, unanswered
        router.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(held, 5)
        assert losses == [1]
        queued: asyncio.Future[Any] | None = None
        if refuse:
            with pytest.raises(DealerBusy, match="connection lost"):
                link.request()
        else:
            queued = link.request()  # waits for the router's return
        again = Router(zmq_context, router.endpoint, router.secret_key)
        if queued is not None:
            assert (await asyncio.wait_for(queued, 10)).parent_id == 3
        # Refused until the dealer has connected again (it retries every 100 ms).
        while True:
            try:
                answered = link.request()
                break
            except DealerBusy:
                assert refuse
                await asyncio.sleep(0.01)
        assert (await asyncio.wait_for(answered, 10)).parent_id > 2
        assert losses == [1] and table.expired == [] and len(table.pending) == 0
        assert table.malformed.late["pageserver"] == 0
    finally:
        link.dealer.close()
        if again is not None:
            again.close()


async def test_a_libzmq_dealer_with_no_server_refuses_past_its_high_water_mark(
    zmq_context: Context, tmp_path: Path
) -> None:
    _, secret_path = write_keypair(tmp_path, "host", "client", "acme")
    server_public, _ = zmq.curve_keypair()
    dealer = open_dealer(
        f"ipc://{tmp_path}/nobody.sock",
        lambda frames: None,
        context=zmq_context,
        security=Security.curve(secret_path),
        server_key=server_public.decode(),
        hwm=4,
    )
    try:
        assert isinstance(dealer, LibzmqDealer)
        sent = 0
        with pytest.raises(DealerBusy):
            for sent in range(1, 100):  # noqa: B007
                dealer.send([b"", b"x"])
        assert 4 <= sent <= 9, sent  # libzmq queues about the high-water mark, then refuses
    finally:
        dealer.close()


# -- every link counts its peer's ZMTP violations ---------------------------------------------


def _breaking_server(path: str) -> threading.Thread:
    """A Unix socket server that answers a ZMTP greeting as a DEALER (a DEALER's peer must be
    a ROUTER), then waits for the client to drop it."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        listener.close()  # reconnections are refused from now on
        conn.recv(1024)
        conn.sendall(GREETING + ready_command(b"DEALER"))
        conn.recv(1024)
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("peer", ["pageserver", "mirror", "placement"])
async def test_every_link_counts_its_peers_zmtp_violations(
    peer: str, zmq_context: Context, tmp_path: Path
) -> None:
    endpoint = f"ipc://{tmp_path}/{peer}.sock"
    server = _breaking_server(endpoint[len("ipc://") :])
    malformed = MalformedReplies()
    close: Callable[[], Any]
    if peer == "pageserver":
        page_link = PageServerLink(
            "ps0", endpoint, context=zmq_context, tenant="acme", volume=1, timeout=5,
            malformed=malformed,
        )  # fmt: skip
        close = page_link.close
    elif peer == "mirror":
        mirror = MirrorLink(
            endpoint, context=zmq_context, cache_bytes=1 << 20, timeout=5, malformed=malformed
        )
        close = mirror.close
    else:
        placement = PlacementLink(
            endpoint, tenant="acme", volume=1, replicas=1, context=zmq_context,
            malformed=malformed,
        )  # fmt: skip
        close = placement.close
    try:
        await until(lambda: malformed.counts[(peer, "bad_frames")] > 0)
    finally:
        result = close()
        if asyncio.iscoroutine(result):
            await result
        await asyncio.to_thread(server.join, 5)
    assert sum(malformed.counts.values()) == malformed.counts[(peer, "bad_frames")] == 1


@pytest.mark.parametrize("peer", ["pageserver", "mirror", "placement"])
async def test_every_link_fails_its_requests_in_flight_when_the_connection_is_lost(
    peer: str, zmq_context: Context, tmp_path: Path
) -> None:
    """A request reaches the peer, which goes away without answering: the request fails
    with the link's own failure within seconds, not at its 30 s timeout."""
    endpoint = f"ipc://{tmp_path}/{peer}.sock"
    router = zmq_context.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(endpoint)
    close: Callable[[], Any]
    failure: type[Exception]
    if peer == "pageserver":
        page_link = PageServerLink(
            "ps0", endpoint, context=zmq_context, tenant="acme", volume=1, timeout=30
        )
        request: asyncio.Future[Any] = page_link.submit_get(page_keys(0, 1, SLAB_PAGES), 0, 0)[0]
        close, failure = page_link.close, ReplicaFailure
    elif peer == "mirror":
        mirror = MirrorLink(endpoint, context=zmq_context, cache_bytes=1 << 20, timeout=30)
        request = asyncio.ensure_future(mirror.barrier())
        close, failure = mirror.close, MirrorFailure
    else:
        placement = PlacementLink(
            endpoint, tenant="acme", volume=1, replicas=1, context=zmq_context, timeout=30
        )
        request = asyncio.ensure_future(placement.refresh_map())
        close, failure = placement.close, PlacementLinkError
    try:
        await until(lambda: bool(router.poll(0)))  # the request is there, unanswered
        router.close(linger=0)
        with pytest.raises(failure) as failed:
            await asyncio.wait_for(request, 5)
        if peer == "mirror":
            assert "connection lost" in str(failed.value) and not mirror.up
        else:
            assert getattr(failed.value, "code", None) == ErrorCode.UNAVAILABLE, failed.value
    finally:
        router.close(linger=0)
        result = close()
        if asyncio.iscoroutine(result):
            await result


async def test_an_error_reply_reaches_its_request() -> None:
    table = Table(timeout=10.0)
    msg_id, future = table.request()
    frames = encode(ErrorReply(msg_id=0, parent_id=msg_id, error_code="no_space", detail="full"))
    taken = table.pending.take(frames)
    assert taken is not None and isinstance(taken[0], ErrorReply) and taken[2] is future
