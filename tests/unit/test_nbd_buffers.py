"""NBD receive buffers and payload pool: size classes, reuse, and the idle limits."""

from __future__ import annotations

import pytest
from remem_client.nbd.buffers import (
    DIRECT_PAYLOAD,
    RX_SIZE,
    PartialWrite,
    PayloadPool,
    RxBuffer,
    RxPool,
)


@pytest.mark.parametrize(
    ("length", "size"),
    [
        (1, DIRECT_PAYLOAD),  # nothing below the smallest class
        (DIRECT_PAYLOAD, DIRECT_PAYLOAD),
        (DIRECT_PAYLOAD + 1, 2 * DIRECT_PAYLOAD),
        (300_000, 512 * 1024),
        (1 << 20, 1 << 20),
        (32 << 20, 32 << 20),
    ],
)
def test_payload_buffers_come_in_power_of_two_classes(length: int, size: int) -> None:
    assert len(PayloadPool().get(length)) == size


def test_payload_buffers_are_reused_per_class() -> None:
    pool = PayloadPool()
    first = pool.get(1 << 20)
    pool.put(first)
    assert pool.get(DIRECT_PAYLOAD) is not first  # another class: a new buffer
    assert pool.get(1000 * 1000) is first  # same class: the same buffer again
    assert pool.get(1 << 20) is not first  # taken: a new one


def test_payload_pool_keeps_no_more_than_its_idle_limit() -> None:
    pool = PayloadPool(max_idle_bytes=3 << 20)
    buffers = [pool.get(1 << 20) for _ in range(5)]
    for buf in buffers:
        pool.put(buf)
    # the first three were kept, the other two dropped
    again = [pool.get(1 << 20) for _ in range(4)]
    assert [id(buf) for buf in again[:3]] == [id(buf) for buf in buffers[2::-1]]
    assert all(again[3] is not buf for buf in buffers)


def test_receive_buffers_are_kept_up_to_the_free_list_limit() -> None:
    pool = RxPool(max_free=2)
    taken = [pool.take() for _ in range(3)]
    assert all(len(rx.data) == RX_SIZE and rx.pins == 0 for rx in taken)
    assert len({id(rx) for rx in taken}) == 3
    for rx in taken:
        pool.give(rx)
    # the first two were kept, the third dropped
    assert pool.take() is taken[1]
    assert pool.take() is taken[0]
    assert pool.take() not in taken  # none left: a new one


def test_receive_buffer_view_is_its_data() -> None:
    rx = RxBuffer()
    rx.view[:4] = b"abcd"
    assert rx.data[:4] == b"abcd"


def test_partial_write_views_exactly_its_payload() -> None:
    buf = PayloadPool().get(100_000)
    partial = PartialWrite(0, 7, 4096, 100_000, buf, 1000)
    assert len(partial.view) == 100_000 and len(buf) == 128 * 1024
    assert partial.view.obj is buf
    assert (partial.handle, partial.offset, partial.got) == (7, 4096, 1000)
