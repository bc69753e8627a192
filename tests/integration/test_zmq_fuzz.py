"""Fuzz every ZeroMQ socket a service binds or reads peers' messages from.

| socket                               | what reaches it               | test                      |
|--------------------------------------|-------------------------------|---------------------------|
| page server ROUTER (`--listen`)      | clients, peers' slab pushes,  | pageserver_router         |
|                                      | placement's orders            |                           |
| page server DEALER to placement      | placement's replies           | pageserver_placement_link |
| page server DEALER of a slab push    | the target's replies          | pageserver_push_link      |
| placement ROUTER (`--listen`)        | page servers, clients, admin  | placement_router          |
| placement DEALER to each page server | page servers' replies         | placement_pageserver_link |
| client DEALER to each page server    | page servers' replies         | client_pageserver_link    |
| mirror ROUTER (`--listen`)           | the client                    | mirror_router             |

(Placement's PUB only sends; libzmq takes a subscriber's frames as subscriptions. The
client's DEALERs to placement and to the mirror count bad replies the same way as its page
server links, in `client_malformed_messages_total{peer}`, but have no fuzzer of their own.)

A ROUTER gets one message at a time from `zmq_fuzz.messages` and must answer each in time;
afterwards its `*_malformed_messages_total` must have risen by exactly the number of replies
that said `malformed`, `unknown_type` or `unsupported_version`, nothing may have been
answered `internal`, a well-behaved client checks its data every 100 messages and at the
end, and SIGTERM still exits 0. A DEALER's peer is a fake here (a test ROUTER the service
connects to) that answers with bad messages only (draws that would decode are skipped);
the service must count each one and keep working with the real peer afterwards.

Counts: REMEM_ZMQ_FUZZ_SCALE multiplies them (`make test-fuzz`); each test adds its line
(sent, counted) to the run's fuzz summary.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, Field, TypeAdapter
from remem_client.nbd import wire
from remem_common.framing import decode, encode
from remem_common.mirror_client import MirrorClient
from remem_common.pageserver_client import REPLY_ADAPTER as CLIENT_REPLY_ADAPTER
from remem_common.pageserver_client import PageServerClient, PageServerError
from remem_common.placement_requests import BlockingPlacementClient
from remem_common.protocol.admin_placement import DrainServerRequest, GetStatusRequest
from remem_common.protocol.client_mirror import (
    AttachMirrorRequest,
    DescribeMirrorRequest,
    DetachMirrorRequest,
    ListUnreplicatedRequest,
    MarkReplicatedRequest,
    ReadPagesRequest,
    TrimPagesRequest,
    WriteExtentsRequest,
    WritePagesRequest,
    pack_extents,
)
from remem_common.protocol.client_pageserver import (
    DeletePagesReply,
    DeletePagesRequest,
    GetPagesReply,
    GetPagesRequest,
    PutPagesReply,
    PutPagesRequest,
)
from remem_common.protocol.client_placement import (
    AllocateSlabRequest,
    GetMapRequest,
    ReportFailureRequest,
)
from remem_common.protocol.envelope import ErrorCode, ErrorReply, ProtocolError
from remem_common.protocol.pages import PAGE_SIZE, checksum_pages, make_keys
from remem_common.protocol.pageserver_peer import (
    PEER_REPLY_ADAPTER,
    ReceiveSlabPagesReply,
    ReceiveSlabPagesRequest,
)
from remem_common.protocol.pageserver_placement import (
    CONTROL_REPLY_ADAPTER,
    SLAB_ORDER_REPLY_ADAPTER,
    DropSlabReply,
    DropSlabRequest,
    HeartbeatReply,
    HeartbeatRequest,
    ListInventoryReply,
    ListInventoryRequest,
    PushSlabReply,
    PushSlabRequest,
    RegisterServerReply,
    RegisterServerRequest,
)
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from .. import fuzz_summary
from ..conftest import StartPageServer
from .nbd_raw import RawNbd
from .placement_support import FAST, PlacementProcesses, wait_registered, wait_until
from .zmq_fuzz import (
    Sample,
    fuzz_service_router,
    fuzz_settings,
    malformed_total,
    messages,
)

pytestmark = pytest.mark.fuzz

Context = zmq.Context[zmq.Socket[bytes]]
MIRROR_PAGES = 4096


def sample(msg: BaseModel, *payload: Any) -> Sample:
    return msg.model_dump(mode="json"), [bytes(memoryview(p)) for p in payload]


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


def batch(slab: int, count: int, seed: int) -> tuple[Any, Any, Any]:
    """Keys, checksums and data of `count` pages of one slab."""
    data = pages_of(count, seed)
    return make_keys([slab] * count, range(count)), checksum_pages(data), data


def index_batch(count: int, seed: int) -> tuple[Any, Any, Any]:
    """Page indices, checksums and data of a slab-push chunk."""
    data = pages_of(count, seed)
    return np.arange(count, dtype="<u4"), checksum_pages(data), data


def scrape(service: ServiceProcess) -> dict[str, float]:
    return scrape_metrics(service.ready["metrics"])


@pytest.fixture
def placements() -> Iterator[PlacementProcesses]:
    processes = PlacementProcesses()
    yield processes
    processes.stop_all()


# -- page server -----------------------------------------------------------------------------

PAGESERVER_SAMPLES: list[Sample] = [
    sample(PutPagesRequest(msg_id=1, tenant="t", volume=0, count=2), *batch(5, 2, 1)),
    sample(GetPagesRequest(msg_id=2, tenant="t", volume=0, count=2), batch(5, 2, 1)[0]),
    sample(DeletePagesRequest(msg_id=3, tenant="t", volume=0, count=1), batch(5, 1, 1)[0]),
    sample(ListInventoryRequest(msg_id=4)),
    sample(DropSlabRequest(msg_id=5, tenant="t", volume=0, slab=6)),
    # an empty slab: the push is done at once, nothing waits for the unreachable target
    sample(
        PushSlabRequest(
            msg_id=6, tenant="t", volume=0, slab=7, target_endpoint="tcp://127.0.0.1:9", timeout=1
        )
    ),
    sample(
        ReceiveSlabPagesRequest(
            msg_id=7, source_server="ps9", tenant="t", volume=0, slab=8, count=2
        ),
        *index_batch(2, 2),
    ),
    # oversized batches: 1025 pages where 1024 is the most
    sample(PutPagesRequest(msg_id=8, tenant="t", volume=0, count=1024), *batch(9, 1025, 3)),
    sample(GetPagesRequest(msg_id=9, tenant="t", volume=0, count=1024), batch(9, 1025, 3)[0]),
    sample(
        ReceiveSlabPagesRequest(
            msg_id=10, source_server="ps9", tenant="t", volume=0, slab=8, count=1024
        ),
        *index_batch(1025, 4),
    ),
]
# Endpoints that pass a loose pattern but no socket can connect to.
BAD_ENDPOINTS = ["tcp://x", "tcp://*:5555", "tcp://host:0", "tcp://host:65536", "tcp://a:b"]


def with_field(base: Sample, key: str, values: list[Any]) -> list[Sample]:
    """Copies of a sample with one field set to each of `values` (invalid samples on purpose)."""
    return [({**base[0], key: value}, base[1]) for value in values]


PAGESERVER_SAMPLES += with_field(PAGESERVER_SAMPLES[5], "target_endpoint", BAD_ENDPOINTS[:2])
# The sample's header says 1024 for the oversized ones (it must validate to be a sample); the
# mutations replace count by 1025 and other values, or keep 1024 against 1025-page frames.
for _header, _ in PAGESERVER_SAMPLES:
    if _header.get("count") == 1024:
        _header["count"] = 1025


def test_pageserver_router(start_pageserver: StartPageServer, zmq_context: Context) -> None:
    server = start_pageserver(capacity="64MiB")
    keeper_keys, _, keeper = batch(2, 64, 11)
    with PageServerClient(server.ready["endpoint"], timeout=10) as client:
        client.put("keeper", 0, keeper_keys, keeper)

    def keeper_intact() -> None:
        with PageServerClient(server.ready["endpoint"], timeout=10) as client:
            found, _, got = client.get("keeper", 0, keeper_keys)
            assert found.all() and np.array_equal(got, keeper)

    examples = fuzz_summary.scaled(1000)
    fuzz_service_router(
        zmq_context,
        "pageserver",
        server.ready["endpoint"],
        lambda: scrape(server),
        PAGESERVER_SAMPLES,
        examples,
        between=keeper_intact,
    )
    keeper_intact()
    with PageServerClient(server.ready["endpoint"], timeout=10) as client:
        keys, _, data = batch(3, 16, 12)
        assert client.put("after", 0, keys, data) == 16
        assert np.array_equal(client.get("after", 0, keys)[2], data)
    assert server.stop() == 0, server.log()


def undecodable(frames: list[bytes], adapter: TypeAdapter[Any]) -> bool:
    """True if `adapter` refuses these frames (as the service's DEALER will)."""
    try:
        decode(frames, adapter)
    except ProtocolError:
        return True
    return False


def bad_replies(samples: list[Sample], adapter: TypeAdapter[Any]) -> st.SearchStrategy[list[bytes]]:
    """Replies a DEALER must refuse; the envelope's empty delimiter is dropped at random."""
    return (
        st.tuples(messages(samples), st.booleans())
        .map(lambda t: t[0][1:] if t[1] and t[0][:1] == [b""] and len(t[0]) > 1 else t[0])
        .filter(lambda frames: undecodable(frames, adapter))
    )


def send_paced(
    peer: zmq.Socket[bytes],
    routing: bytes,
    strategy: st.SearchStrategy[list[bytes]],
    examples: int,
    counted: Callable[[], float],
) -> int:
    """Send bad messages to the DEALER at `routing`, waiting every 50 until they are counted
    (a ROUTER drops what is over the high-water mark; pacing keeps the count exact)."""
    start = counted()
    sent = 0

    @fuzz_settings(examples)
    @given(strategy)
    def one(frames: list[bytes]) -> None:
        nonlocal sent
        peer.send_multipart([routing, *frames])
        sent += 1
        if sent % 50 == 0:
            wait_until(f"{sent} counted", lambda: counted() - start >= sent, timeout=30)

    one()
    wait_until(f"{sent} counted", lambda: counted() - start >= sent, timeout=30)
    return sent


class FakePeer:
    """A ROUTER a service connects to, standing in for placement or a page server."""

    def __init__(self, context: Context) -> None:
        self.socket = context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind("tcp://127.0.0.1:0")
        endpoint = self.socket.getsockopt(zmq.LAST_ENDPOINT)
        assert isinstance(endpoint, bytes)
        self.endpoint = endpoint.decode()

    def receive(
        self, adapter: TypeAdapter[Any], timeout: float = 15.0
    ) -> tuple[bytes, Any, list[Any]]:
        """(routing id, message, payload) of the next message."""
        assert self.socket.poll(int(timeout * 1000)), "the service sent nothing"
        routing, *body = self.socket.recv_multipart()
        msg, payload = decode(body, adapter)
        return routing, msg, payload

    def answer(self, routing: bytes, reply: BaseModel) -> None:
        self.socket.send_multipart([routing, *encode(reply)])

    def close(self) -> None:
        self.socket.close(linger=0)


PLACEMENT_REQUESTS: TypeAdapter[Any] = TypeAdapter(RegisterServerRequest | HeartbeatRequest)
PLACEMENT_REPLY_SAMPLES: list[Sample] = [
    sample(RegisterServerReply(msg_id=0, parent_id=10**9, heartbeat_interval=0.5)),
    sample(HeartbeatReply(msg_id=0, parent_id=10**9, registered=True)),
    sample(ErrorReply(msg_id=0, parent_id=10**9, error_code=ErrorCode.MALFORMED, detail="x")),
]


def test_pageserver_placement_link(start_pageserver: StartPageServer, zmq_context: Context) -> None:
    """Placement's replies arrive on the page server's link thread: bad ones are counted."""
    placement = FakePeer(zmq_context)
    try:
        server = start_pageserver(extra=["--placement", placement.endpoint])
        routing, register, _ = placement.receive(PLACEMENT_REQUESTS)
        assert isinstance(register, RegisterServerRequest)
        examples = fuzz_summary.scaled(200)
        sent = send_paced(
            placement.socket,
            routing,
            bad_replies(PLACEMENT_REPLY_SAMPLES, CONTROL_REPLY_ADAPTER),
            examples,
            lambda: malformed_total(scrape(server), "pageserver"),
        )
        counted = malformed_total(scrape(server), "pageserver")
        fuzz_summary.record(
            f"zmq pageserver DEALER to placement: {sent} sent, {int(counted)} counted"
        )
        assert sent >= 0.9 * examples and counted == sent
        # Still a working link: it registers on the next request and heartbeats after.
        while True:
            routing, msg, _ = placement.receive(PLACEMENT_REQUESTS)
            if isinstance(msg, HeartbeatRequest):
                break
            placement.answer(
                routing, RegisterServerReply(msg_id=0, parent_id=msg.msg_id, heartbeat_interval=0.2)
            )
        assert server.stop() == 0, server.log()
    finally:
        placement.close()


PEER_REPLY_SAMPLES: list[Sample] = [
    sample(ReceiveSlabPagesReply(msg_id=0, parent_id=10**9, stored=1, skipped=0)),
    sample(ErrorReply(msg_id=0, parent_id=10**9, error_code=ErrorCode.NO_SPACE, detail="full")),
]
PEER_REQUESTS: TypeAdapter[Any] = TypeAdapter(ReceiveSlabPagesRequest)


def test_pageserver_push_link(start_pageserver: StartPageServer, zmq_context: Context) -> None:
    """A push target answering a chunk badly fails the push (counted), never the server."""
    server = start_pageserver()
    keys, _, data = batch(3, 4, 21)
    target = FakePeer(zmq_context)
    order = PageServerClient(server.ready["endpoint"], timeout=10)
    examples = fuzz_summary.scaled(200)
    sent = 0
    try:
        order.put("t", 0, keys, data)
        before = malformed_total(scrape(server), "pageserver")

        @fuzz_settings(examples)
        @given(bad_replies(PEER_REPLY_SAMPLES, PEER_REPLY_ADAPTER))
        def one(frames: list[bytes]) -> None:
            nonlocal sent
            order.send(
                PushSlabRequest(
                    msg_id=order.next_id(),
                    tenant="t",
                    volume=0,
                    slab=3,
                    target_endpoint=target.endpoint,
                    timeout=30,
                )
            )
            routing, chunk, _ = target.receive(PEER_REQUESTS)
            assert chunk.count == 4
            target.socket.send_multipart([routing, *frames])
            sent += 1
            with pytest.raises(PageServerError) as failed:
                order.receive()
            assert failed.value.code == ErrorCode.UNAVAILABLE
            assert "answered badly" in failed.value.detail

        one()
        counted = malformed_total(scrape(server), "pageserver") - before
        fuzz_summary.record(
            f"zmq pageserver DEALER of a slab push: {sent} sent, {int(counted)} counted"
        )
        assert sent >= 0.9 * examples and counted == sent
        # A well-behaved target still gets the slab.
        order.send(
            PushSlabRequest(
                msg_id=order.next_id(),
                tenant="t",
                volume=0,
                slab=3,
                target_endpoint=target.endpoint,
            )
        )
        routing, chunk, payload = target.receive(PEER_REQUESTS)
        assert np.array_equal(np.frombuffer(payload[2], np.uint8).reshape(4, PAGE_SIZE), data)
        target.answer(
            routing, ReceiveSlabPagesReply(msg_id=0, parent_id=chunk.msg_id, stored=4, skipped=0)
        )
        reply, _ = order.receive()
        assert isinstance(reply, PushSlabReply) and reply.pages == 4
    finally:
        order.close()
        target.close()
    assert server.stop() == 0, server.log()


# -- placement -------------------------------------------------------------------------------

PLACEMENT_SAMPLES: list[Sample] = [
    sample(
        RegisterServerRequest(
            msg_id=1,
            server_id="ps9",
            data_endpoint="tcp://127.0.0.1:9",
            metrics_url="http://127.0.0.1:9/metrics",
            capacity_bytes=1 << 30,
            used_bytes=0,
            zone="z9",
            started_at=1.0,
        )
    ),
    sample(HeartbeatRequest(msg_id=2, server_id="ps9", used_bytes=0, capacity_bytes=1 << 30)),
    sample(AllocateSlabRequest(msg_id=3, tenant="t", volume=0, slab=0, known_replicas=["ps9"])),
    sample(GetMapRequest(msg_id=4, tenant="t", volume=0)),
    sample(ReportFailureRequest(msg_id=5, tenant="t", volume=0, slab=0, server_id="ps9")),
    sample(GetStatusRequest(msg_id=6)),
    sample(DrainServerRequest(msg_id=7, server_id="ps9", cancel=True)),
]
PLACEMENT_SAMPLES += with_field(PLACEMENT_SAMPLES[0], "data_endpoint", BAD_ENDPOINTS[:2])


def test_placement_router(
    placements: PlacementProcesses, start_pageserver: StartPageServer, zmq_context: Context
) -> None:
    placement = placements.start([*FAST, "--restart-grace", "0"])
    start_pageserver(name="keeper-ps", extra=["--placement", placement.ready["endpoint"]])
    wait_registered(placement, {"keeper-ps"})
    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        kept = client.allocate("keeper", 0, 0, replicas=1)
        assert [r.server_id for r in kept.replicas] == ["keeper-ps"]

    def map_intact() -> None:
        with BlockingPlacementClient(placement.ready["endpoint"]) as client:
            reply = client.get_map("keeper", 0)
            assert reply.slabs == [(0, ["keeper-ps"], [])], reply

    examples = fuzz_summary.scaled(400)
    fuzz_service_router(
        zmq_context,
        "placement",
        placement.ready["endpoint"],
        lambda: scrape(placement),
        PLACEMENT_SAMPLES,
        examples,
        between=map_intact,
    )
    map_intact()
    with BlockingPlacementClient(placement.ready["endpoint"]) as client:
        assert any(
            s.server_id == "keeper-ps" and s.state == "live" for s in client.status().servers
        )
    assert placement.stop() == 0, placement.log()


LINK_REPLY_SAMPLES: list[Sample] = [
    sample(ListInventoryReply(msg_id=0, parent_id=10**9, server_id="fake", slabs=[])),
    sample(DropSlabReply(msg_id=0, parent_id=10**9, dropped=0)),
    sample(PushSlabReply(msg_id=0, parent_id=10**9, pages=1, bytes=4096, seconds=0.1)),
    sample(ErrorReply(msg_id=0, parent_id=10**9, error_code=ErrorCode.NOT_FOUND)),
]


class FakePageServer(FakePeer):
    """A page server's data ROUTER that the test drives, registered and heartbeating."""

    def __init__(self, context: Context, placement_endpoint: str, server_id: str) -> None:
        super().__init__(context)
        self.server_id = server_id
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._heartbeat, args=(context, placement_endpoint), daemon=True
        )
        self._thread.start()

    def _heartbeat(self, context: Context, placement_endpoint: str) -> None:
        # The control link: register, then heartbeat, as a real page server does.
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(placement_endpoint)
        msg_id = 0
        try:
            while not self._stop.is_set():
                msg_id += 1
                capacity = 1 << 30
                msg: BaseModel = HeartbeatRequest(
                    msg_id=msg_id, server_id=self.server_id, used_bytes=0, capacity_bytes=capacity
                )
                if msg_id == 1:
                    msg = RegisterServerRequest(
                        msg_id=msg_id,
                        server_id=self.server_id,
                        data_endpoint=self.endpoint,
                        metrics_url="http://127.0.0.1:9/metrics",
                        capacity_bytes=capacity,
                        used_bytes=0,
                        zone="z",
                        started_at=1.0,
                    )
                sock.send_multipart(encode(msg))
                if sock.poll(1000):
                    sock.recv_multipart()
                self._stop.wait(0.1)
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        super().close()


def test_placement_pageserver_link(placements: PlacementProcesses, zmq_context: Context) -> None:
    """A page server answering placement's orders badly is counted and stays usable."""
    placement = placements.start([*FAST, "--restart-grace", "0"])
    fake = FakePageServer(zmq_context, placement.ready["endpoint"], "fake")
    try:
        routing, inventory, _ = fake.receive(TypeAdapter(ListInventoryRequest))
        examples = fuzz_summary.scaled(200)
        before = malformed_total(scrape(placement), "placement")
        sent = send_paced(
            fake.socket,
            routing,
            bad_replies(LINK_REPLY_SAMPLES, SLAB_ORDER_REPLY_ADAPTER),
            examples,
            lambda: malformed_total(scrape(placement), "placement") - before,
        )
        counted = malformed_total(scrape(placement), "placement") - before
        fuzz_summary.record(
            f"zmq placement DEALER to a page server: {sent} sent, {int(counted)} counted"
        )
        assert sent >= 0.9 * examples and counted == sent
        # The link still works: a failure report makes placement ask for the inventory again.
        with BlockingPlacementClient(placement.ready["endpoint"]) as client:
            state = client.report_failure("t", 0, 0, "fake", "fuzz")
            assert state.server_state in ("live", "suspect")
        _, again, _ = fake.receive(TypeAdapter(ListInventoryRequest))
        assert again.msg_id > inventory.msg_id
        with BlockingPlacementClient(placement.ready["endpoint"]) as client:
            fake_state = next(s.state for s in client.status().servers if s.server_id == "fake")
            assert fake_state in ("live", "suspect"), fake_state
    finally:
        fake.close()
    assert placement.stop() == 0, placement.log()


# -- client ----------------------------------------------------------------------------------

CLIENT_REPLY_SAMPLES: list[Sample] = [
    sample(PutPagesReply(msg_id=0, parent_id=10**9, stored=1)),
    sample(
        GetPagesReply(msg_id=0, parent_id=10**9, count=1),
        b"\x01",
        checksum_pages(pages_of(1, 41)),
        pages_of(1, 41),
    ),
    sample(DeletePagesReply(msg_id=0, parent_id=10**9, deleted=1)),
    sample(ErrorReply(msg_id=0, parent_id=10**9, error_code=ErrorCode.NO_SPACE)),
]
SERVED_BY_FAKE: TypeAdapter[Any] = TypeAdapter(
    Annotated[
        PutPagesRequest | GetPagesRequest | DeletePagesRequest | ListInventoryRequest,
        Field(discriminator="type"),
    ]
)


def test_client_pageserver_link(
    placements: PlacementProcesses, zmq_context: Context, tmp_path: Path
) -> None:
    """A page server answering the client badly is counted; the NBD write still completes."""
    placement = placements.start([*FAST, "--restart-grace", "0"])
    fake = FakePageServer(zmq_context, placement.ready["endpoint"], "fake")
    nbd_socket = tmp_path / "nbd.sock"
    args = ["client", "--backend", "remote", "--replicas", "1", "--size", "64MiB",
            "--placement", placement.ready["endpoint"], "--nbd-socket", str(nbd_socket),
            "--metrics-port", "0", "--no-lock-memory", "--replica-timeout", "600",
            "--page-key", str(tmp_path / "page.key")]  # fmt: skip
    client: ServiceProcess | None = None
    try:
        client = start_service("client-fuzz", args)
        service = client

        def next_data_request() -> tuple[bytes, Any, list[Any]]:
            # Placement's inventory requests reach the same ROUTER: answer them on the way.
            while True:
                routing, msg, payload = fake.receive(SERVED_BY_FAKE)
                if not isinstance(msg, ListInventoryRequest):
                    return routing, msg, payload
                fake.answer(
                    routing,
                    ListInventoryReply(msg_id=0, parent_id=msg.msg_id, server_id="fake", slabs=[]),
                )

        def counted() -> float:
            prefix = 'client_malformed_messages_total{peer="pageserver",'
            return sum(v for k, v in scrape(service).items() if k.startswith(prefix))

        data = pages_of(1, 42).tobytes()
        with RawNbd.unix(str(nbd_socket)).connect() as nbd:
            nbd.request(wire.Cmd.WRITE, 1, 8192, len(data), payload=data)
            routing, put, payload = next_data_request()
            # Pages leave the client sealed: the fake stores and serves back the ciphertext.
            assert isinstance(put, PutPagesRequest) and len(payload) == 4
            assert len(bytes(payload[2])) == len(data) and bytes(payload[2]) != data
            examples = fuzz_summary.scaled(200)
            sent = send_paced(
                fake.socket,
                routing,
                bad_replies(CLIENT_REPLY_SAMPLES, CLIENT_REPLY_ADAPTER),
                examples,
                counted,
            )
            total = counted()
            fuzz_summary.record(
                f"zmq client DEALER to a page server: {sent} sent, {int(total)} counted"
            )
            assert sent >= 0.9 * examples and total == sent
            # The link still works: the write waiting all along completes, and reads back.
            fake.answer(routing, PutPagesReply(msg_id=0, parent_id=put.msg_id, stored=1))
            assert nbd.reply().error == 0
            nbd.request(wire.Cmd.READ, 2, 8192, len(data))
            routing, get, _ = next_data_request()
            assert isinstance(get, GetPagesRequest)
            fake.socket.send_multipart(
                [
                    routing,
                    *encode(
                        GetPagesReply(msg_id=0, parent_id=get.msg_id, count=1),
                        b"\x01",
                        payload[1],
                        payload[2],
                        payload[3],
                    ),
                ]
            )
            assert nbd.reply().data == data
            nbd.disconnect()
        assert client.stop() == 0, client.log()
    finally:
        if client is not None and client.proc.poll() is None:
            client.stop()
        fake.close()


# -- mirror ----------------------------------------------------------------------------------

MIRROR_SAMPLES: list[Sample] = [
    sample(WritePagesRequest(msg_id=1, first_page=10, count=2), pages_of(2, 31)),
    sample(ReadPagesRequest(msg_id=2, first_page=10, count=2)),
    sample(TrimPagesRequest(msg_id=3, first_page=10, count=2)),
    sample(MarkReplicatedRequest(msg_id=4, first_page=10, count=2)),
    sample(ListUnreplicatedRequest(msg_id=5)),
    sample(DescribeMirrorRequest(msg_id=6)),
    sample(AttachMirrorRequest(msg_id=11)),
    sample(DetachMirrorRequest(msg_id=12)),
    # oversized: 257 pages where 256 is the most
    sample(WritePagesRequest(msg_id=7, first_page=0, count=256), pages_of(257, 32)),
    # past the end of the mirror
    sample(WritePagesRequest(msg_id=8, first_page=MIRROR_PAGES - 1, count=1), pages_of(1, 33)),
    # a write-behind batch of three runs, the last overwriting the first's first page
    sample(
        WriteExtentsRequest(msg_id=9, extents=3, count=5),
        pack_extents([(10, 2), (40, 2), (10, 1)]),
        pages_of(5, 34),
    ),
    # a batch whose second run ends past the mirror
    sample(
        WriteExtentsRequest(msg_id=10, extents=2, count=3),
        pack_extents([(0, 1), (MIRROR_PAGES - 1, 2)]),
        pages_of(3, 35),
    ),
]
_WRITE = MIRROR_SAMPLES[0]
MIRROR_SAMPLES += [
    *with_field(_WRITE, "first_page", [-1, MIRROR_PAGES, MIRROR_PAGES - 1, 2**41]),
    *with_field(_WRITE, "count", [0, -1, 3]),
    *with_field(_WRITE, "replicated", ["maybe"]),
    *with_field(MIRROR_SAMPLES[1], "first_page", [MIRROR_PAGES - 1]),
    *with_field(MIRROR_SAMPLES[2], "count", [MIRROR_PAGES + 1]),
    *with_field(MIRROR_SAMPLES[3], "first_page", [MIRROR_PAGES]),
    *with_field(MIRROR_SAMPLES[8], "extents", [0, 2, 4, 1025]),
    *with_field(MIRROR_SAMPLES[8], "count", [0, 4, 6, 1025]),
]
for _header, _ in MIRROR_SAMPLES:
    if _header.get("count") == 256:
        _header["count"] = 257


def test_mirror_router(tmp_path: Path, zmq_context: Context) -> None:
    mirror = start_service(
        "mirror-fuzz",
        ["mirror", "--path", str(tmp_path / "m.img"), "--size", str(MIRROR_PAGES * PAGE_SIZE),
         "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0"],
    )  # fmt: skip
    try:
        keeper = pages_of(16, 34)
        with MirrorClient(mirror.ready["endpoint"], timeout=10) as client:
            client.write(1000, keeper, sync=True)

        def keeper_intact() -> None:
            with MirrorClient(mirror.ready["endpoint"], timeout=10) as client:
                assert np.array_equal(client.read(1000, 16), keeper)

        examples = fuzz_summary.scaled(1000)
        fuzz_service_router(
            zmq_context,
            "mirror",
            mirror.ready["endpoint"],
            lambda: scrape(mirror),
            MIRROR_SAMPLES,
            examples,
            between=keeper_intact,
        )
        keeper_intact()
        with MirrorClient(mirror.ready["endpoint"], timeout=10) as client:
            client.write(2000, pages_of(4, 35), sync=True)
            assert np.array_equal(client.read(2000, 4), pages_of(4, 35))
        assert mirror.stop() == 0, mirror.log()
    finally:
        if mirror.proc.poll() is None:
            mirror.stop()
