"""The mirror's writer and queue without sockets: order, coalescing, sync, errors, validation."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import remem_common.protocol.client_mirror as client_mirror
from prometheus_client import CollectorRegistry
from pydantic import BaseModel
from remem_common.framing import decode, encode
from remem_common.protocol.client_mirror import (
    MIRROR_REPLY_ADAPTER,
    MIRROR_REQUEST_ADAPTER,
    AttachMirrorReply,
    AttachMirrorRequest,
    DescribeMirrorReply,
    DescribeMirrorRequest,
    DetachMirrorReply,
    DetachMirrorRequest,
    ListUnreplicatedReply,
    ListUnreplicatedRequest,
    MarkReplicatedReply,
    MarkReplicatedRequest,
    ReadPagesReply,
    ReadPagesRequest,
    TrimPagesReply,
    TrimPagesRequest,
    WriteExtentsRequest,
    WritePagesReply,
    WritePagesRequest,
    pack_extents,
)
from remem_common.protocol.envelope import PROTOCOL_VERSION, ErrorCode, ErrorReply, ProtocolError
from remem_common.protocol.pages import PAGE_SIZE
from remem_mirror.metrics import MirrorMetrics
from remem_mirror.server import validate
from remem_mirror.store import MAX_RUN_PAGES, MirrorStore
from remem_mirror.writer import MirrorWriter, Op, OpQueue

PAGES = 1024
ROUTING = [b"peer"]

REQUESTS = [
    DescribeMirrorRequest(msg_id=1),
    AttachMirrorRequest(msg_id=9),
    DetachMirrorRequest(msg_id=10),
    WritePagesRequest(msg_id=2, first_page=3, count=256, replicated=False, sync=True),
    WriteExtentsRequest(msg_id=8, extents=3, count=1024),
    ReadPagesRequest(msg_id=3, first_page=0, count=1),
    TrimPagesRequest(msg_id=4, first_page=5, count=1 << 30),
    MarkReplicatedRequest(msg_id=5, first_page=5, count=7),
    ListUnreplicatedRequest(msg_id=6),
]
REPLIES = [
    DescribeMirrorReply(
        msg_id=0, parent_id=1, page_count=9, path="/x", direct_io=True, unreplicated_pages=2
    ),
    AttachMirrorReply(
        msg_id=0,
        parent_id=9,
        page_count=9,
        path="/x",
        direct_io=False,
        unreplicated_pages=0,
        complete=True,
    ),
    DetachMirrorReply(msg_id=0, parent_id=10),
    WritePagesReply(msg_id=0, parent_id=2, written=256),
    ReadPagesReply(msg_id=0, parent_id=3, count=1),
    TrimPagesReply(msg_id=0, parent_id=4),
    MarkReplicatedReply(msg_id=0, parent_id=5, unreplicated_pages=0),
    ListUnreplicatedReply(msg_id=0, parent_id=6, page_count=9, unreplicated_pages=1),
    ErrorReply(msg_id=0, parent_id=7, error_code=ErrorCode.UNAVAILABLE, detail="errno=5"),
]


def pages_of(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def writer(tmp_path: Path, registry: CollectorRegistry) -> Iterator[MirrorWriter]:
    store = MirrorStore(tmp_path / "m.img", PAGES, tmp_path / "m.meta")
    yield MirrorWriter(store, MirrorMetrics(registry))
    store.close()


def write_op(first: int, data: np.ndarray, **flags: bool) -> Op:
    count = data.shape[0]
    msg = WritePagesRequest(msg_id=first + 1, first_page=first, count=count, **flags)
    return Op(routing=ROUTING, request=msg, data=data, pages=count, runs=[(first, count)])


def extents_op(msg_id: int, runs: list[tuple[int, int]], data: np.ndarray) -> Op:
    """A write_extents op as the server queues it, validated like the server does."""
    msg = WriteExtentsRequest(msg_id=msg_id, extents=len(runs), count=data.shape[0])
    frame, checked = validate(msg, [pack_extents(runs), data.tobytes()], PAGES)
    assert checked == runs
    return Op(routing=ROUTING, request=msg, data=frame, pages=data.shape[0], runs=runs)


def op(msg: BaseModel) -> Op:
    return Op(routing=ROUTING, request=msg)  # type: ignore[arg-type]


def replies_of(
    frames: list[list[bytes]], routing: bytes = b"peer"
) -> list[tuple[BaseModel, list[bytes]]]:
    out = []
    for reply in frames:
        assert reply[:2] == [routing, b""]
        out.append(decode(reply[1:], MIRROR_REPLY_ADAPTER))
    return out


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: m.type)
def test_every_request_round_trips(msg: BaseModel) -> None:
    assert decode(encode(msg), MIRROR_REQUEST_ADAPTER)[0] == msg


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: m.type)
def test_every_reply_round_trips(msg: BaseModel) -> None:
    assert decode(encode(msg), MIRROR_REPLY_ADAPTER)[0] == msg


def test_documented_version_matches_code() -> None:
    doc = client_mirror.__doc__ or ""
    documented = re.search(r"protocol version (\d+)", doc)
    assert documented is not None and int(documented.group(1)) == PROTOCOL_VERSION
    assert set(client_mirror.PAYLOAD_FRAMES) == {m.type for m in REQUESTS}


def test_attach_reports_a_clean_end_only_after_a_detach(
    tmp_path: Path, registry: CollectorRegistry
) -> None:
    # A new mirror is not complete (its client's replicas may hold anything); a session
    # that ended with a detach is; one that did not (a crash of either side) is not.
    metrics = MirrorMetrics(registry)

    def attach(writer: MirrorWriter) -> bool:
        ((reply, _),) = replies_of(writer.execute([op(AttachMirrorRequest(msg_id=1))]))
        assert isinstance(reply, AttachMirrorReply)
        return reply.complete

    def reopen() -> MirrorWriter:
        return MirrorWriter(MirrorStore(tmp_path / "m.img", PAGES, tmp_path / "m.meta"), metrics)

    writer = reopen()
    assert not attach(writer)
    written = pages_of(4, seed=1)
    replies = replies_of(writer.execute([write_op(0, written), op(DetachMirrorRequest(msg_id=2))]))
    assert [type(reply) for reply, _ in replies] == [WritePagesReply, DetachMirrorReply]
    assert writer.store.clean
    writer.store.close()

    writer = reopen()  # the mirror restarted after a clean detach
    assert attach(writer)
    assert not writer.store.clean  # a session is open: a crash now leaves it not clean
    writer.store.close()  # the mirror stops (or is killed) with the session still open

    writer = reopen()
    assert not attach(writer)
    assert writer.store.read(0, 4) == written.tobytes()
    writer.store.close()
    assert value(registry, "mirror_requests_total", op="attach", result="ok") == 3
    assert value(registry, "mirror_requests_total", op="detach", result="ok") == 1


def test_a_session_with_a_failed_write_does_not_end_clean(
    writer: MirrorWriter, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client may not have seen the failure before it detached: the mirror itself must
    # not vouch for a copy that misses a write.
    writer.execute([op(AttachMirrorRequest(msg_id=1))])

    def broken(*args: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer.store, "write_pages", broken)
    replies = replies_of(
        writer.execute([write_op(0, pages_of(1, 2)), op(DetachMirrorRequest(msg_id=3))])
    )
    assert [type(reply) for reply, _ in replies] == [ErrorReply, ErrorReply]
    assert not writer.store.clean
    monkeypatch.undo()
    writer.execute([op(AttachMirrorRequest(msg_id=4))])  # a new session starts afresh
    ((reply, _),) = replies_of(writer.execute([op(DetachMirrorRequest(msg_id=5))]))
    assert isinstance(reply, DetachMirrorReply) and writer.store.clean


def test_a_client_s_old_connection_cannot_change_the_mirror_once_it_attached_again(
    writer: MirrorWriter,
) -> None:
    # A stalled mirror still holds what the old connection queued; the client, having timed
    # it out, attached on a new connection and rebuilds through it. The old writes, run
    # later, would put older pages over the rebuild's copy: they are refused.
    def from_(routing: bytes, item: Op) -> Op:
        item.routing = [routing]
        return item

    old, new, tool = b"old", b"new", b"tool"
    first = pages_of(2, seed=5)
    writer.execute([from_(old, op(AttachMirrorRequest(msg_id=1))), from_(old, write_op(0, first))])
    late = pages_of(2, seed=6)
    replies = writer.execute(
        [
            from_(new, op(AttachMirrorRequest(msg_id=2))),
            from_(old, write_op(0, late)),  # queued on the old connection
            from_(old, op(TrimPagesRequest(msg_id=3, first_page=0, count=1))),
            from_(old, op(AttachMirrorRequest(msg_id=4))),  # cannot take the session back
            from_(old, op(ReadPagesRequest(msg_id=5, first_page=0, count=2))),  # reads may
        ]
    )
    by_sender = {}
    for reply in replies:
        by_sender.setdefault(reply[0], []).append(decode(reply[1:], MIRROR_REPLY_ADAPTER)[0])
    refused = [r for r in by_sender[old] if isinstance(r, ErrorReply)]
    assert [r.error_code for r in refused] == [ErrorCode.UNAVAILABLE] * 3
    assert writer.store.read(0, 2) == first.tobytes()
    newer = pages_of(2, seed=7)
    ((reply, _),) = replies_of(
        [r for r in writer.execute([from_(new, write_op(0, newer))])], routing=new
    )
    assert isinstance(reply, WritePagesReply)
    # A connection that never attached (a tool) is not fenced.
    ((reply, _),) = replies_of(writer.execute([from_(tool, write_op(4, newer))]), routing=tool)
    assert isinstance(reply, WritePagesReply)
    assert writer.store.read(0, 2) == newer.tobytes()


def test_adjacent_queued_writes_share_one_syscall(
    writer: MirrorWriter, registry: CollectorRegistry
) -> None:
    data = pages_of(300, 1)
    ops = [write_op(10 + i, data[i : i + 1]) for i in range(100)]
    ops += [write_op(110, data[100:300])]
    replies = replies_of(writer.execute(ops))
    assert [r.parent_id for r, _ in replies] == [o.request.msg_id for o in ops]  # type: ignore[union-attr]
    assert all(isinstance(r, WritePagesReply) for r, _ in replies)
    assert value(registry, "mirror_write_requests_total") == 101
    assert value(registry, "mirror_coalesced_writes_total") == 1
    assert value(registry, "mirror_written_bytes_total") == 300 * PAGE_SIZE
    assert value(registry, "mirror_write_duration_seconds_count") == 1
    assert writer.store.read(10, 256) == data[:256].tobytes()


def test_a_read_between_writes_sees_the_earlier_ones_and_cuts_the_run(
    writer: MirrorWriter, registry: CollectorRegistry
) -> None:
    old, new = pages_of(4, 2), pages_of(4, 3)
    ops = [
        write_op(0, old),
        op(ReadPagesRequest(msg_id=50, first_page=0, count=4)),
        write_op(4, new[:2]),
        write_op(2, new[2:]),  # overlaps nothing written in this run, but is not adjacent
        op(ReadPagesRequest(msg_id=51, first_page=0, count=6)),
    ]
    replies = replies_of(writer.execute(ops))
    assert bytes(replies[1][1][0]) == old.tobytes()
    expect = np.concatenate([old[:2], new[2:], new[:2]])
    assert bytes(replies[4][1][0]) == expect.tobytes()
    assert value(registry, "mirror_coalesced_writes_total") == 3
    assert value(registry, "mirror_read_bytes_total") == 10 * PAGE_SIZE
    assert value(registry, "mirror_requests_total", op="read", result="ok") == 2


def test_later_write_of_a_page_wins_within_a_batch(writer: MirrorWriter) -> None:
    versions = pages_of(5, 4)
    ops = [write_op(7, versions[i : i + 1]) for i in range(5)]
    writer.execute(ops)
    assert writer.store.read(7, 1) == versions[4].tobytes()


def test_sync_writes_fsync_once_per_group_and_unreplicated_bits_are_set(
    writer: MirrorWriter, registry: CollectorRegistry
) -> None:
    data = pages_of(3, 5)
    ops = [
        write_op(0, data[:1], sync=True),
        write_op(1, data[1:2], replicated=False),
        write_op(2, data[2:], replicated=False, sync=True),
    ]
    writer.execute(ops)
    assert value(registry, "mirror_fsync_duration_seconds_count") == 1
    assert writer.store.unreplicated()[:4].tolist() == [False, True, True, False]
    replies = replies_of(
        writer.execute(
            [
                op(MarkReplicatedRequest(msg_id=9, first_page=2, count=1)),
                op(ListUnreplicatedRequest(msg_id=10)),
                op(TrimPagesRequest(msg_id=11, first_page=0, count=PAGES)),
                op(DescribeMirrorRequest(msg_id=12)),
            ]
        )
    )
    mark, listed, _, described = replies
    assert isinstance(mark[0], MarkReplicatedReply) and mark[0].unreplicated_pages == 1
    assert isinstance(listed[0], ListUnreplicatedReply) and listed[0].unreplicated_pages == 1
    assert bytes(listed[1][0])[0] == 0b10
    assert isinstance(described[0], DescribeMirrorReply)
    assert described[0].unreplicated_pages == 0 and described[0].page_count == PAGES


def test_an_io_error_answers_unavailable_with_the_errno(
    writer: MirrorWriter, registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(first: int, chunks: object) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer.store, "write_pages", broken)
    ops = [write_op(0, pages_of(1, 6)), op(ReadPagesRequest(msg_id=77, first_page=0, count=1))]
    (failed, _), (read, _) = replies_of(writer.execute(ops))
    assert isinstance(failed, ErrorReply) and failed.error_code == ErrorCode.UNAVAILABLE
    assert "errno=5 EIO" in failed.detail
    assert isinstance(read, ReadPagesReply)
    assert value(registry, "mirror_requests_total", op="write", result="error") == 1


def test_queue_groups_writes_up_to_the_run_limit_and_bounds_pages() -> None:
    queue = OpQueue(limit_pages=2 * MAX_RUN_PAGES)
    data = pages_of(1, 7)
    queued_from = time.monotonic()
    for first in range(0, MAX_RUN_PAGES + 10, 1):
        queue.put(write_op(first, data))
    queue.put(op(DescribeMirrorRequest(msg_id=1)))
    queue.put(write_op(5, data))
    assert queue.pending_pages == MAX_RUN_PAGES + 11 and not queue.full()
    # The age of the oldest write: at least as old as the loop that queued it, no older.
    lag = queue.lag()
    assert 0 < lag <= time.monotonic() - queued_from
    first = queue.take()
    assert len(first) == MAX_RUN_PAGES
    queue.done(first)
    second = queue.take()
    assert len(second) == 10
    queue.done(second)
    third = queue.take()
    assert len(third) == 1 and third[0].pages == 0
    queue.done(third)
    assert len(queue.abort()) == 1  # the write behind the describe was never started
    assert queue.pending_pages == 0 and queue.length == 0 and queue.lag() == 0.0
    queue.close()
    assert queue.take() == []
    for first in range(2 * MAX_RUN_PAGES):
        queue.put(write_op(first, data))
    assert queue.full()


EXTENTS_2 = WriteExtentsRequest(msg_id=1, extents=2, count=2)


@pytest.mark.parametrize(
    ("msg", "payload", "reason"),
    [
        (WritePagesRequest(msg_id=1, first_page=0, count=2), [], "bad_frames"),
        (WritePagesRequest(msg_id=1, first_page=0, count=2), [b"x" * 4096], "bad_payload"),
        (WritePagesRequest(msg_id=1, first_page=0, count=1), [b"x" * 4097], "bad_payload"),
        (WritePagesRequest(msg_id=1, first_page=PAGES, count=1), [b"x" * 4096], "bad_fields"),
        (ReadPagesRequest(msg_id=1, first_page=PAGES - 1, count=2), [], "bad_fields"),
        (TrimPagesRequest(msg_id=1, first_page=0, count=PAGES + 1), [], "bad_fields"),
        (MarkReplicatedRequest(msg_id=1, first_page=5, count=PAGES), [], "bad_fields"),
        (ListUnreplicatedRequest(msg_id=1), [b""], "bad_frames"),
        (EXTENTS_2, [pack_extents([(0, 1), (5, 1)])], "bad_frames"),
        (EXTENTS_2, [pack_extents([(0, 1)]), b"x" * 8192], "bad_payload"),  # one run of two
        (EXTENTS_2, [pack_extents([(0, 1), (5, 1)]) + b"x", b"x" * 8192], "bad_payload"),
        (EXTENTS_2, [pack_extents([(0, 2), (5, 0)]), b"x" * 8192], "bad_payload"),  # empty run
        (EXTENTS_2, [pack_extents([(0, 1), (5, 2)]), b"x" * 8192], "bad_payload"),  # sum 3
        (EXTENTS_2, [pack_extents([(0, 1), (PAGES - 1, 1)]), b"x" * 8191], "bad_payload"),
        (EXTENTS_2, [pack_extents([(0, 1), (PAGES, 1)]), b"x" * 8192], "bad_fields"),
        (EXTENTS_2, [pack_extents([(0, 1), (2**64 - 1, 1)]), b"x" * 8192], "bad_fields"),
    ],
)
def test_validation_refuses_what_pydantic_cannot_see(
    msg: BaseModel, payload: list[bytes], reason: str
) -> None:
    with pytest.raises(ProtocolError) as refused:
        validate(msg, payload, PAGES)  # type: ignore[arg-type]
    assert refused.value.code == ErrorCode.MALFORMED
    assert refused.value.reason == reason
    assert refused.value.msg_id == 1


def test_validation_passes_the_data_frame() -> None:
    frame = b"\0" * (2 * PAGE_SIZE)
    msg = WritePagesRequest(msg_id=1, first_page=PAGES - 2, count=2)
    assert validate(msg, [frame], PAGES) == (frame, [(PAGES - 2, 2)])
    assert validate(TrimPagesRequest(msg_id=1, first_page=0, count=PAGES), [], PAGES) == (None, [])


def test_extents_of_one_request_and_writes_around_it_apply_in_order(
    writer: MirrorWriter, registry: CollectorRegistry
) -> None:
    """A batch's runs land like separate writes would: adjacent ones share a syscall with
    the writes around them, and a later run of a page wins over an earlier one."""
    data = pages_of(8, 2)
    ops = [
        write_op(100, data[0:1]),
        # 101 joins the run before it; 400 starts a new one; 100 again overwrites page 100.
        extents_op(50, [(101, 2), (400, 1), (100, 1)], data[1:5]),
        write_op(401, data[5:8]),
    ]
    replies = replies_of(writer.execute(ops))
    assert [(r.parent_id, r.written) for r, _ in replies] == [(101, 1), (50, 4), (402, 3)]  # type: ignore[attr-defined]
    assert writer.store.read(100, 3) == data[4:5].tobytes() + data[1:3].tobytes()
    assert writer.store.read(400, 4) == data[3:4].tobytes() + data[5:8].tobytes()
    assert value(registry, "mirror_written_bytes_total") == 8 * PAGE_SIZE
    assert value(registry, "mirror_write_requests_total") == 3
