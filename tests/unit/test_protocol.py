"""Wire protocol: every message round-trips; malformed headers map to the right error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import remem_common.protocol.envelope as envelope_module
import zmq
from pydantic import BaseModel
from remem_common.framing import MAX_HEADER_BYTES, decode, encode, split_routing
from remem_common.pageserver_client import REPLY_ADAPTER
from remem_common.protocol.client_pageserver import (
    DeletePagesReply,
    DeletePagesRequest,
    GetPagesReply,
    GetPagesRequest,
    PutPagesReply,
    PutPagesRequest,
    get_pages_reply_header,
    page_request_header,
    put_pages_reply_header,
)
from remem_common.protocol.envelope import PROTOCOL_VERSION, ErrorCode, ErrorReply, ProtocolError
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SLAB_PAGES,
    bad_checksums,
    checksum_pages,
    make_keys,
    unpack_crcs,
    unpack_keys,
    unpack_page_indices,
    unpack_pages,
)
from remem_common.protocol.pageserver_peer import (
    PEER_REPLY_ADAPTER,
    ReceiveSlabPagesReply,
    ReceiveSlabPagesRequest,
)
from remem_common.protocol.pageserver_placement import (
    CONTROL_REPLY_ADAPTER,
    CONTROL_REQUEST_ADAPTER,
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
    SlabInventory,
)
from remem_pageserver.server import SERVED_ADAPTER

SERVED = [
    PutPagesRequest(msg_id=1, tenant="t", volume=2, count=3),
    GetPagesRequest(msg_id=2, tenant="t", volume=2, count=1024),
    DeletePagesRequest(msg_id=3, tenant="a.b-c_d", volume=0, count=1),
    ListInventoryRequest(msg_id=4),
    DropSlabRequest(msg_id=5, tenant="t", volume=1, slab=7),
    PushSlabRequest(msg_id=6, tenant="t", volume=1, slab=7, target_endpoint="tcp://h:1"),
    ReceiveSlabPagesRequest(
        msg_id=7, source_server="ps-1", tenant="t", volume=1, slab=7, count=5, overwrite=True
    ),
]
REPLIES = [
    PutPagesReply(msg_id=0, parent_id=1, stored=3),
    GetPagesReply(msg_id=0, parent_id=2, count=4),
    DeletePagesReply(msg_id=0, parent_id=3, deleted=0),
    ListInventoryReply(
        msg_id=0,
        parent_id=4,
        server_id="ps-1",
        slabs=[SlabInventory(tenant="t", volume=1, slab=2, pages=3)],
    ),
    DropSlabReply(msg_id=0, parent_id=5, dropped=9),
    PushSlabReply(msg_id=0, parent_id=6, pages=1, bytes=4096, seconds=0.1),
    ErrorReply(msg_id=0, parent_id=7, error_code=ErrorCode.NO_SPACE, detail="full"),
]


@pytest.mark.parametrize("msg", SERVED, ids=lambda m: m.type)
def test_every_served_request_round_trips(msg: BaseModel) -> None:
    payload = [b"\x01" * 8]
    decoded, frames = decode(encode(msg, *payload), SERVED_ADAPTER)
    assert decoded == msg
    assert frames == payload


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: m.type)
def test_every_reply_round_trips(msg: BaseModel) -> None:
    decoded, _ = decode(encode(msg), REPLY_ADAPTER)
    assert decoded == msg


def test_control_and_peer_messages_round_trip() -> None:
    register = RegisterServerRequest(
        msg_id=1,
        server_id="ps-1",
        data_endpoint="tcp://127.0.0.1:7100",
        metrics_url="http://127.0.0.1:9101/metrics",
        capacity_bytes=1 << 30,
        used_bytes=0,
        zone="z1",
        started_at=1.0,
    )
    heartbeat = HeartbeatRequest(
        msg_id=2, server_id="ps-1", used_bytes=4096, capacity_bytes=8192, under_pressure=True
    )
    for msg in (register, heartbeat):
        assert decode(encode(msg), CONTROL_REQUEST_ADAPTER)[0] == msg
    for reply in (
        RegisterServerReply(msg_id=0, parent_id=1, heartbeat_interval=0.5),
        HeartbeatReply(msg_id=0, parent_id=2, registered=False),
    ):
        assert decode(encode(reply), CONTROL_REPLY_ADAPTER)[0] == reply
    peer = ReceiveSlabPagesReply(msg_id=0, parent_id=3, stored=2, skipped=1)
    assert decode(encode(peer), PEER_REPLY_ADAPTER)[0] == peer


def test_documented_version_matches_code() -> None:
    doc = envelope_module.__doc__ or ""
    documented = re.search(r"protocol version (\d+)", doc)
    assert documented is not None
    assert int(documented.group(1)) == PROTOCOL_VERSION
    assert re.search(rf"the protocol version, {PROTOCOL_VERSION}\b", doc)


def test_frames_cross_real_zmq_sockets(zmq_context: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = zmq_context.socket(zmq.ROUTER)
    dealer = zmq_context.socket(zmq.DEALER)
    try:
        router.bind("inproc://framing")
        dealer.connect("inproc://framing")
        pages = np.arange(2 * PAGE_SIZE, dtype=np.uint32).view(np.uint8)[: 2 * PAGE_SIZE]
        msg = PutPagesRequest(msg_id=9, tenant="t", volume=0, count=2)
        dealer.send_multipart(
            encode(
                msg, make_keys([1, 1], [2, 3]), checksum_pages(pages.reshape(2, PAGE_SIZE)), pages
            )
        )
        routing, body = split_routing(router.recv_multipart(copy=False))
        assert len(routing) == 1
        decoded, payload = decode(body, SERVED_ADAPTER)
        assert decoded == msg
        assert unpack_pages(payload[2], 2).tobytes() == pages.tobytes()
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


def _error_of(header: bytes) -> ProtocolError:
    with pytest.raises(ProtocolError) as caught:
        decode([b"", header], SERVED_ADAPTER)
    return caught.value


@pytest.mark.parametrize(
    ("header", "code", "reason"),
    [
        (b"", ErrorCode.MALFORMED, "no_header"),
        (b"not json", ErrorCode.MALFORMED, "bad_json"),
        (b"[1, 2]", ErrorCode.MALFORMED, "bad_json"),
        (
            b'{"type": "get_pages_request", "version": 2, "msg_id": 4}',
            ErrorCode.UNSUPPORTED_VERSION,
            "bad_version",
        ),
        (
            b'{"type": "steal_pages_request", "version": 1, "msg_id": 4}',
            ErrorCode.UNKNOWN_TYPE,
            "unknown_type",
        ),
        (
            b'{"type": "get_pages_request", "version": 1, "msg_id": 4, "tenant": "t", '
            b'"volume": 0, "count": 0}',
            ErrorCode.MALFORMED,
            "bad_fields",
        ),
        (
            b'{"type": "get_pages_request", "version": 1, "msg_id": 4, "tenant": "../x", '
            b'"volume": 0, "count": 1}',
            ErrorCode.MALFORMED,
            "bad_fields",
        ),
        (
            b'{"type": "get_pages_request", "version": 1, "msg_id": 4, "tenant": "t", '
            b'"volume": 0, "count": 1, "extra": 1}',
            ErrorCode.MALFORMED,
            "bad_fields",
        ),
        (b"{" + b" " * MAX_HEADER_BYTES + b"}", ErrorCode.MALFORMED, "bad_json"),
    ],
)
def test_malformed_headers_get_the_right_error(header: bytes, code: ErrorCode, reason: str) -> None:
    error = _error_of(header)
    assert (error.code, error.reason) == (code, reason)


def test_error_names_the_request_it_answers() -> None:
    error = _error_of(b'{"type": "get_pages_request", "version": 1, "msg_id": 77}')
    assert error.msg_id == 77
    reply = json.loads(encode(error.reply())[1])
    assert reply["parent_id"] == 77 and reply["status"] == "error"


def test_no_delimiter_is_malformed() -> None:
    with pytest.raises(ProtocolError) as caught:
        split_routing([b"id", b"{}"])
    assert caught.value.reason == "no_delimiter"


def test_page_codecs_check_lengths_ranges_and_duplicates() -> None:
    keys = make_keys([0, 1], [5, SLAB_PAGES - 1])
    assert unpack_keys(keys.tobytes(), 2).tolist() == keys.tolist()
    for bad_keys, count in [
        (keys.tobytes()[:-1], 2),
        (make_keys([0], [SLAB_PAGES]).tobytes(), 1),
        (make_keys([3, 3], [9, 9]).tobytes(), 2),
    ]:
        with pytest.raises(ProtocolError):
            unpack_keys(bad_keys, count)
    # Large batches: ascending keys pass at once; a repeat, adjacent or not, is refused.
    pages_in_order = np.arange(256)
    ascending = make_keys(pages_in_order // 64, pages_in_order % 64)
    assert unpack_keys(ascending.tobytes(), 256).tolist() == ascending.tolist()
    for repeated in ([*range(255), 0], [*range(100), 99, *range(101, 256)]):
        with pytest.raises(ProtocolError):
            unpack_keys(make_keys([0] * 256, repeated).tobytes(), 256)
    with pytest.raises(ProtocolError):
        unpack_page_indices(np.array([1, 1], dtype=np.uint32).tobytes(), 2)
    with pytest.raises(ProtocolError):
        unpack_crcs(b"\x00" * 7, 2)
    for size in (PAGE_SIZE - 1, PAGE_SIZE + 1, 2 * PAGE_SIZE):
        with pytest.raises(ProtocolError):
            unpack_pages(b"\x00" * size, 1)
    pages = np.zeros((3, PAGE_SIZE), dtype=np.uint8)
    crcs = checksum_pages(pages)
    pages[1, 100] = 1
    assert bad_checksums(pages, crcs).tolist() == [1]


@pytest.mark.parametrize("op", ["put", "get", "delete"])
def test_hot_request_headers_are_what_the_models_write(op: str) -> None:
    model = {"put": PutPagesRequest, "get": GetPagesRequest, "delete": DeletePagesRequest}[op]
    type_name = model.model_fields["type"].default
    header = page_request_header(type_name, 41, "tenant-a.b_c", 7, 1024)
    parsed = SERVED_ADAPTER.validate_json(header)
    expected = model(msg_id=41, tenant="tenant-a.b_c", volume=7, count=1024, sent_at=parsed.sent_at)
    assert parsed == expected
    assert json.loads(header) == json.loads(expected.model_dump_json())


def test_hot_reply_headers_are_what_the_models_write() -> None:
    get = REPLY_ADAPTER.validate_json(get_pages_reply_header(9, 3))
    assert get == GetPagesReply(msg_id=0, parent_id=9, count=3, sent_at=get.sent_at)
    put = REPLY_ADAPTER.validate_json(put_pages_reply_header(10, 4))
    assert put == PutPagesReply(msg_id=0, parent_id=10, stored=4, sent_at=put.sent_at)
    for header in (get_pages_reply_header(9, 3), put_pages_reply_header(10, 4)):
        model = REPLY_ADAPTER.validate_json(header)
        assert json.loads(header) == json.loads(model.model_dump_json())


@pytest.mark.parametrize(
    "endpoint",
    [
        "tcp://x",
        "tcp://*:5555",
        "tcp://h:0",
        "tcp://h:65536",
        "tcp://h:port",
        "tcp://h:1;x",
        "udp://h:1",
    ],
)
def test_an_endpoint_no_socket_can_connect_to_is_malformed(endpoint: str) -> None:
    header = PushSlabRequest(
        msg_id=9, tenant="t", volume=0, slab=1, target_endpoint="tcp://h:1"
    ).model_dump_json()
    with pytest.raises(ProtocolError) as caught:
        decode([header.replace("tcp://h:1", endpoint).encode()], SERVED_ADAPTER)
    assert (caught.value.code, caught.value.reason) == (ErrorCode.MALFORMED, "bad_fields")


@pytest.mark.parametrize(
    "endpoint", ["tcp://h:1", "tcp://10.0.0.7:65535", "tcp://[::1]:7000", "ipc:///tmp/ps.sock"]
)
def test_connectable_endpoints_are_accepted(
    endpoint: str, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    msg = PushSlabRequest(msg_id=9, tenant="t", volume=0, slab=1, target_endpoint=endpoint)
    sock = zmq_context.socket(zmq.DEALER)
    try:
        sock.connect(msg.target_endpoint)  # what a page server does with it
    finally:
        sock.close(linger=0)
