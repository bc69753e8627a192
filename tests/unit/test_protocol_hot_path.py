"""The page server's hot-path codecs answer exactly what the models and numpy codecs answer:
the request header parser, the small-batch payload codecs, the reply headers."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError
from remem_common.protocol.client_mirror import (
    MIRROR_REPLY_ADAPTER,
    WritePagesReply,
    parse_write_pages_reply,
)
from remem_common.protocol.client_pageserver import (
    DATA_REQUEST_ADAPTER,
    get_pages_reply_header,
    page_request_header,
    parse_pages_request,
    put_pages_reply_header,
)
from remem_common.protocol.envelope import ProtocolError
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SLAB_PAGES,
    SMALL_PAGES,
    bad_checksums,
    bad_row_checksums,
    checksum_pages,
    crc_words,
    key_words,
    make_keys,
    rows_view,
    unpack_crcs,
    unpack_keys,
    unpack_pages,
    unpack_seals,
)

OPS = ("put", "get", "delete")


def header_variants() -> list[bytes]:
    """Headers as the client writes them, and near misses of every kind."""
    good = page_request_header("get_pages_request", 41, "tenant-a.b_c", 7, 8).decode()
    fields = json.loads(good)
    variants = [good, good.replace(":", ": "), good.replace('"version":1', '"version":2')]
    variants += [good.replace('"count":8', f'"count":{count}') for count in (0, 1024, 1025)]
    variants += [good.replace('"volume":7', f'"volume":{v}') for v in (2**32 - 1, 2**32, "07")]
    variants += [good.replace('"msg_id":41', f'"msg_id":{m}') for m in (0, -1, "041", 10**18)]
    variants += [good.replace("tenant-a.b_c", t) for t in ("-x", "a" * 63, "a" * 64, "t\\u0061")]
    variants += [good.replace('"get_pages', f'"{op}_pages') for op in ("put", "delete", "drop")]
    variants += [good.replace("}", ',"extra":1}'), good + " ", good[:-1]]
    variants.append(json.dumps(dict(reversed(list(fields.items()))), separators=(",", ":")))
    return [variant.encode() for variant in variants]


@pytest.mark.parametrize("header", header_variants())
def test_request_parser_accepts_only_what_the_models_accept_alike(header: bytes) -> None:
    parsed = parse_pages_request(header)
    try:
        model = DATA_REQUEST_ADAPTER.validate_json(header)
    except ValidationError:
        assert parsed is None
        return
    if parsed is not None:
        op = model.type.removesuffix("_pages_request")
        assert parsed == (op, model.msg_id, model.tenant, model.volume, model.count)


@pytest.mark.parametrize("op", OPS)
def test_request_parser_reads_every_header_the_client_writes(op: str) -> None:
    header = page_request_header(f"{op}_pages_request", 2**40, "t", 2**32 - 1, 1024)
    assert parse_pages_request(memoryview(header)) == (op, 2**40, "t", 2**32 - 1, 1024)


def test_reply_headers_parse_to_the_models_fields() -> None:
    get = json.loads(get_pages_reply_header(9, 3))
    put = json.loads(put_pages_reply_header(10, 4))
    assert isinstance(get.pop("sent_at"), float) and isinstance(put.pop("sent_at"), float)
    common = {"version": 1, "msg_id": 0, "status": "ok"}
    assert get == {**common, "parent_id": 9, "type": "get_pages_reply", "count": 3}
    assert put == {**common, "parent_id": 10, "type": "put_pages_reply", "stored": 4}


def mirror_reply_variants() -> list[bytes]:
    """A write_pages_reply as the mirror writes it, and near misses of every kind."""
    good = WritePagesReply(msg_id=0, parent_id=41, written=8).model_dump_json()
    variants = [good, good.replace(":", ": "), good.replace('"version":1', '"version":2')]
    variants += [good.replace('"parent_id":41', f'"parent_id":{p}') for p in (0, -1, "041")]
    variants += [good.replace('"written":8', f'"written":{w}') for w in (0, -8, 10**17)]
    variants += [good.replace('"ok"', '"error"'), good.replace("write_pages", "read_pages")]
    variants += [good.replace("}", ',"extra":1}'), good + " ", good[:-1]]
    return [variant.encode() for variant in variants]


@pytest.mark.parametrize("header", mirror_reply_variants())
def test_mirror_write_reply_parser_accepts_only_what_the_models_accept_alike(
    header: bytes,
) -> None:
    parsed = parse_write_pages_reply(header)
    try:
        model = MIRROR_REPLY_ADAPTER.validate_json(header)
    except ValidationError:
        assert parsed is None
        return
    if parsed is not None:
        assert isinstance(model, WritePagesReply)
        assert parsed == (model.parent_id, model.written)


def test_mirror_write_reply_parser_reads_the_mirrors_header() -> None:
    header = WritePagesReply(msg_id=0, parent_id=2**40, written=1024).model_dump_json()
    assert parse_write_pages_reply(memoryview(header.encode())) == (2**40, 1024)


def refusal(call: object, *args: object) -> str | None:
    """The detail of the ProtocolError `call(*args)` raises, None if it raises none."""
    try:
        call(*args)  # type: ignore[operator]
    except ProtocolError as exc:
        return exc.detail
    return None


@pytest.mark.parametrize("count", [1, 2, SMALL_PAGES])
def test_small_codecs_check_and_refuse_as_the_numpy_ones(count: int) -> None:
    rng = np.random.default_rng(count)
    keys = make_keys(rng.integers(0, 2**32, count), rng.permutation(SLAB_PAGES)[:count])
    frame = keys.tobytes()
    assert key_words(frame, count) == tuple(keys.view("<u4").tolist())
    bad_frames = [frame[:-1], frame + b"\0"]
    if count > 1:
        bad_frames.append(make_keys([5] * count, [3] * count).tobytes())
    bad_frames.append(make_keys([0] * count, [SLAB_PAGES + i for i in range(count)]).tobytes())
    for bad in bad_frames:
        assert refusal(key_words, bad, count) == refusal(unpack_keys, bad, count) is not None
    crcs = rng.integers(0, 2**32, count, dtype=np.uint32)
    assert crc_words(crcs.tobytes(), count) == tuple(crcs.tolist())
    short = crcs.tobytes()[:-1]
    assert refusal(crc_words, short, count) == refusal(unpack_crcs, short, count) is not None
    for width, what, unpack in (
        (PAGE_SIZE, "data", unpack_pages),
        (SEAL_BYTES, "seals", unpack_seals),
    ):
        rows = rng.integers(0, 256, (count, width), dtype=np.uint8).tobytes()
        assert rows_view(rows, count, width, what) == rows
        for bad in (rows[:-1], rows + b"\0"):
            assert refusal(rows_view, bad, count, width, what) == refusal(unpack, bad, count)


def test_small_checksum_check_finds_the_pages_numpy_finds() -> None:
    pages = np.random.default_rng(1).integers(0, 256, (5, PAGE_SIZE), dtype=np.uint8)
    crcs = checksum_pages(pages)
    pages[1, 7] ^= 1
    pages[4, 0] ^= 1
    small = bad_row_checksums(memoryview(pages.tobytes()), tuple(crcs.tolist()))
    assert small == bad_checksums(pages, crcs).tolist() == [1, 4]
