"""The page server answers a data-plane request alike whichever way its header is written:
as clients write it (read by the hot-path parser) or as the models write it (validated by
pydantic), for good batches and for every payload it must refuse."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import zmq
from remem_common.framing import DELIMITER
from remem_common.protocol.client_pageserver import (
    DATA_REQUEST_ADAPTER,
    page_request_header,
    parse_pages_request,
)
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES, SLAB_PAGES, checksum_pages, make_keys

from ..conftest import StartPageServer


def headers(op: str, msg_id: int, count: int) -> tuple[bytes, bytes]:
    """(the client's form, the models' form) of one request header."""
    hot = page_request_header(f"{op}_pages_request", msg_id, "t", 3, count)
    modelled = DATA_REQUEST_ADAPTER.validate_json(hot).model_dump_json().encode()
    assert parse_pages_request(hot) is not None and parse_pages_request(modelled) is None
    return hot, modelled


def answer(sock: zmq.Socket[bytes], header: bytes, payload: list[Any]) -> tuple[Any, ...]:
    """The reply to one request, without its send time."""
    sock.send_multipart([DELIMITER, header, *payload])
    assert sock.poll(10_000)
    reply = sock.recv_multipart()
    fields = json.loads(reply[1])
    del fields["sent_at"]
    return (fields, *reply[2:])


def test_both_header_forms_get_the_same_answers(
    start_pageserver: StartPageServer, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    server = start_pageserver()
    sock = zmq_context.socket(zmq.DEALER)
    sock.connect(server.ready["endpoint"])
    rng = np.random.default_rng(5)
    # (op, count, payload, what to put back after the models' request changed the store)
    cases: list[tuple[str, int, list[Any], list[Any] | None]] = []
    for count in (1, 3, 16, 17, 40):
        keys = make_keys(rng.integers(0, 3, count), rng.permutation(SLAB_PAGES)[:count])
        data = rng.integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)
        crcs, seals = checksum_pages(data), bytes(count * SEAL_BYTES)
        bad_crcs = crcs.copy()
        bad_crcs[-1] ^= 1
        twice = make_keys([7] * count, [count] * count)
        past = make_keys([0] * count, [SLAB_PAGES] * count)
        stored = [keys, crcs, data, seals]
        cases += [
            ("put", count, stored, None),  # new pages, then held ones (put answers the same)
            ("get", count, [keys], None),
            ("get", count, [make_keys([9] * count, range(count))], None),  # none held
            ("put", count, [keys, bad_crcs, data, seals], None),
            ("put", count, [keys, crcs, data[:, :-1].copy(), seals], None),
            ("put", count, [keys, crcs, data, seals + b"\0"], None),
            ("put", count, [keys, crcs.tobytes()[:-1], data, seals], None),
            ("put", count, [keys, crcs, data], None),
            ("get", count, [keys.tobytes()[:-1]], None),
            ("get", count, [past], None),
            ("get", count, [keys, keys], None),
            ("delete", count, [keys], stored),
            ("get", count, [keys], None),
        ]
        if count > 1:
            cases.append(("get", count, [twice], None))
    for msg_id, (op, count, payload, restore) in enumerate(cases, start=1):
        hot, modelled = headers(op, msg_id, count)
        by_models = answer(sock, modelled, payload)
        if restore is not None:
            answer(sock, headers("put", msg_id, count)[1], restore)
        assert answer(sock, hot, payload) == by_models, (op, count, len(payload))
    sock.close(linger=0)
