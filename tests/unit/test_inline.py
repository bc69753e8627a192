"""The client's per-callback fast path: `remem_client.inline` (work deferred to the end of
a socket callback, futures resolved inline), the page server links' GET reply header
parser and request header encoder, and the pending-request table's one timer."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
from typing import Any

import pytest
from remem_client.dealer import PendingRequests
from remem_client.inline import CallbackEnd, InlineFuture, callback_end
from remem_client.links import _Batch
from remem_client.metrics import MalformedReplies
from remem_client.nbd.drive import Driven
from remem_common.pageserver_client import REPLY_ADAPTER, AnyReply
from remem_common.protocol.client_pageserver import (
    GetPagesReply,
    PutPagesReply,
    get_pages_reply_header,
    page_request_header,
    page_request_header_encoder,
    parse_get_pages_reply,
    parse_put_pages_reply,
    put_pages_reply_header,
)

# -- CallbackEnd -------------------------------------------------------------------------------


async def test_deferred_work_runs_once_the_outermost_callback_ends_in_order() -> None:
    end = CallbackEnd(asyncio.get_running_loop())
    ran: list[str] = []
    end.enter()
    end.defer(lambda: ran.append("send"))
    end.enter()  # a callback run from inside another (a future resolved inline)
    end.defer(lambda: ran.append("reply"))
    end.exit()
    assert ran == []
    end.exit()
    assert ran == ["send", "reply"]


async def test_work_deferred_by_deferred_work_runs_in_the_same_pass() -> None:
    end = CallbackEnd(asyncio.get_running_loop())
    ran: list[str] = []
    end.enter()
    end.defer(lambda: end.defer(lambda: ran.append("second")))
    end.exit()
    assert ran == ["second"]


async def test_outside_a_callback_work_runs_on_the_next_loop_turn() -> None:
    end = CallbackEnd(asyncio.get_running_loop())
    ran: list[int] = []
    end.defer(lambda: ran.append(1))
    end.defer(lambda: ran.append(2))
    assert ran == []
    await asyncio.sleep(0)
    assert ran == [1, 2]


async def test_failing_work_is_logged_and_the_rest_still_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    end = CallbackEnd(asyncio.get_running_loop())
    ran: list[str] = []

    def fail() -> None:
        raise RuntimeError("bug")

    end.enter()
    end.defer(fail)
    end.defer(lambda: ran.append("after"))
    with caplog.at_level(logging.ERROR):
        end.exit()
    assert ran == ["after"] and "bug" in caplog.text


async def test_each_loop_has_its_own_callback_end() -> None:
    loop = asyncio.get_running_loop()
    assert callback_end(loop) is callback_end(loop)
    other = asyncio.new_event_loop()
    try:
        assert callback_end(other) is not callback_end(loop)
    finally:
        other.close()


# -- InlineFuture ------------------------------------------------------------------------------


class _Recorder(Driven):
    """A request driven without a Task, as the NBD layer drives the remote backend's."""

    __slots__ = ("outcome",)

    def __init__(self) -> None:
        self.outcome: list[Any] = []

    def finished(self, _: Any, result: Any, exc: BaseException | None, cancelled: bool) -> None:
        self.outcome.append((result, exc, cancelled))


async def _awaits(future: Any) -> Any:
    return await future


async def test_resolve_inline_resumes_a_driven_coroutine_at_once() -> None:
    future: InlineFuture[int] = InlineFuture(asyncio.get_running_loop())
    request = _Recorder()
    coro = _awaits(future)
    request.drive(coro, coro.send(None), request.finished)
    future.resolve_inline(7)
    assert request.outcome == [(7, None, False)]


async def test_set_result_and_set_exception_call_back_on_the_loop_as_asyncio_does() -> None:
    loop = asyncio.get_running_loop()
    for fail in (False, True):
        future: InlineFuture[int] = InlineFuture(loop)
        request = _Recorder()
        coro = _awaits(future)
        request.drive(coro, coro.send(None), request.finished)
        if fail:
            future.set_exception(ValueError("replica failed"))
        else:
            future.set_result(3)
        assert request.outcome == []
        await asyncio.sleep(0)
        result, exc, cancelled = request.outcome[0]
        assert not cancelled
        assert (
            (isinstance(exc, ValueError) and result is None) if fail else (result, exc) == (3, None)
        )


async def test_a_task_awaiting_it_is_woken_on_the_loop_with_its_result() -> None:
    loop = asyncio.get_running_loop()
    future: InlineFuture[str] = InlineFuture(loop)
    task = asyncio.ensure_future(_awaits(future))
    await asyncio.sleep(0)  # the task waits on the future now
    future.resolve_inline("pages")  # inside no Task step: a Task's wake-up is scheduled
    assert not task.done()
    assert await task == "pages"


async def test_wait_for_times_out_and_cancels_it_like_an_asyncio_future() -> None:
    future: InlineFuture[None] = InlineFuture(asyncio.get_running_loop())
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(future, 0.01)
    assert future.cancelled()
    with pytest.raises(asyncio.CancelledError):
        future.result()


async def test_asyncio_wait_and_removing_a_callback() -> None:
    loop = asyncio.get_running_loop()
    future: InlineFuture[int] = InlineFuture(loop)
    assert asyncio.isfuture(future) and future.get_loop() is loop
    called: list[Any] = []
    future.add_done_callback(called.append)
    assert future.remove_done_callback(called.append) == 1
    loop.call_soon(future.set_result, 5)
    done, _ = await asyncio.wait([future])
    assert done == {future} and future.result() == 5 and called == []
    with pytest.raises(asyncio.InvalidStateError):
        future.set_result(6)


# -- the GET and PUT reply header parsers ------------------------------------------------------

# (the page server's header writer, the client's reader, the model, the model's count field)
REPLY_FORMS = [
    (get_pages_reply_header, parse_get_pages_reply, GetPagesReply, "count"),
    (put_pages_reply_header, parse_put_pages_reply, PutPagesReply, "stored"),
]


@pytest.mark.parametrize(("write", "parse", "model_type", "field"), REPLY_FORMS)
def test_the_page_servers_reply_headers_parse_as_the_models_do(
    write: Any, parse: Any, model_type: Any, field: str
) -> None:
    for parent_id, count in [(0, 0), (1, 1), (123456, 1024), (2**59, 7)]:
        header = write(parent_id, count)
        model = REPLY_ADAPTER.validate_json(header)
        assert isinstance(model, model_type)
        assert parse(header) == (model.parent_id, getattr(model, field))
        assert parse(memoryview(header)) == (parent_id, count)
    # Each parser reads its own reply only: a GET's answer is not a PUT's, nor the reverse.
    assert parse_put_pages_reply(get_pages_reply_header(1, 1)) is None
    assert parse_get_pages_reply(put_pages_reply_header(1, 1)) is None


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h.replace(b'"status":"ok"', b'"status":"error"'),
        lambda h: h.replace(b"get_pages_reply", b"put_pages_reply"),
        lambda h: h.replace(b'"version":1', b'"version":2'),
        lambda h: h.replace(b'"parent_id":42', b'"parent_id":-42'),
        lambda h: h.replace(b'"parent_id":42', b'"parent_id":042'),
        lambda h: h.replace(b'"count":3', b'"count":3.0'),
        lambda h: h.replace(b'"count":3', b'"count":"3"'),
        lambda h: h.replace(b"}", b',"extra":1}'),
        lambda h: h.replace(b",", b", "),
        lambda h: h + b"\n",
        lambda h: h[:-1],
        lambda h: re.sub(rb'"sent_at":[^,]*', b'"sent_at":1e9', h),
        lambda h: b'{"parent_id":42,' + h[1:],
    ],
)
def test_any_other_header_is_left_to_the_models(change: Any) -> None:
    header = change(get_pages_reply_header(42, 3))
    assert parse_get_pages_reply(header) is None


def test_the_request_header_encoder_writes_what_page_request_header_does() -> None:
    def without_time(header: bytes) -> dict[str, Any]:
        fields: dict[str, Any] = json.loads(header)
        assert isinstance(fields.pop("sent_at"), float)
        return fields

    for type_name in ("get_pages_request", "put_pages_request", "delete_pages_request"):
        encode = page_request_header_encoder(type_name, "acme.prod", 9)
        expected = page_request_header(type_name, 17, "acme.prod", 9, 1024)
        assert without_time(encode(17, 1024)) == without_time(expected)
        assert re.sub(rb'"sent_at":[^,]*', b"", encode(17, 1024)) == re.sub(
            rb'"sent_at":[^,]*', b"", expected
        )


# -- a batch's overlap check -------------------------------------------------------------------


def test_a_batch_finds_overlapping_spans_as_a_scan_of_every_span_would() -> None:
    rng = random.Random(14)
    for _ in range(2000):
        batch = _Batch(op="get")
        spans: list[tuple[int, int]] = []
        for _ in range(rng.randint(0, 12)):
            first = rng.randint(0, 200)
            last = first + rng.choice([0, 0, 0, 1, 3, 7, 8, 20, 70])
            scan = any(
                first <= other_last and other_first <= last for other_first, other_last in spans
            )
            assert batch.overlaps(first, last) == scan
            if not scan:
                batch.touch(first, last)
                spans.append((first, last))


# -- the pending-request table's timer ---------------------------------------------------------


async def test_each_request_expires_at_its_own_deadline_on_one_timer() -> None:
    loop = asyncio.get_running_loop()
    expired: list[tuple[str, float]] = []
    futures: dict[asyncio.Future[Any], str] = {}
    table: PendingRequests[AnyReply] = PendingRequests(
        REPLY_ADAPTER,
        peer="pageserver",
        timeout=0.2,
        on_expire=lambda future: expired.append((futures[future], loop.time())),
        malformed=MalformedReplies(),
    )
    first: asyncio.Future[Any] = loop.create_future()
    futures[first] = "first"
    started = loop.time()
    table.add(table.next_id(), first)
    await asyncio.sleep(0.1)
    second: asyncio.Future[Any] = loop.create_future()
    futures[second] = "second"
    table.add(table.next_id(), second)
    while len(expired) < 2:
        await asyncio.sleep(0.01)
    (name_1, at_1), (name_2, at_2) = expired
    assert (name_1, name_2) == ("first", "second")
    assert at_1 - started >= 0.19 and at_2 - at_1 >= 0.08  # the second got its full timeout
    assert len(table) == 0


# -- Driven.wait_then: a request waiting on a future with no coroutine ------------------------


async def test_wait_then_finishes_with_what_finish_gives() -> None:
    future: InlineFuture[int] = InlineFuture(asyncio.get_running_loop())
    request = _Recorder()
    request.wait_then(future, lambda done: done.result() * 2, request.finished)
    future.resolve_inline(21)
    assert request.outcome == [(42, None, False)]


async def test_wait_then_carries_on_with_the_coroutine_finish_gives() -> None:
    loop = asyncio.get_running_loop()
    batch: InlineFuture[int] = InlineFuture(loop)
    general: asyncio.Future[str] = loop.create_future()
    request = _Recorder()
    request.wait_then(batch, lambda _: _awaits(general), request.finished)
    batch.set_exception(ValueError("replica failed"))  # on the loop, as asyncio would
    await asyncio.sleep(0)
    assert request.outcome == []  # the coroutine waits on the general path now
    general.set_result("pages")
    await asyncio.sleep(0)
    assert request.outcome == [("pages", None, False)]


async def test_wait_then_ends_with_what_finish_raises() -> None:
    future: InlineFuture[int] = InlineFuture(asyncio.get_running_loop())
    request = _Recorder()

    def finish(done: InlineFuture[int]) -> int:
        return done.result()

    request.wait_then(future, finish, request.finished)
    future.cancel()
    await asyncio.sleep(0)
    assert request.outcome == [(None, None, True)]
    failing: InlineFuture[int] = InlineFuture(asyncio.get_running_loop())
    other = _Recorder()
    other.wait_then(failing, finish, other.finished)
    failing.set_exception(KeyError("bug"))
    await asyncio.sleep(0)
    assert isinstance(other.outcome[0][1], KeyError)


async def test_cancelling_a_wait_then_leaves_the_shared_future_alone() -> None:
    future: InlineFuture[int] = InlineFuture(asyncio.get_running_loop())
    cancelled, other = _Recorder(), _Recorder()
    cancelled.wait_then(future, lambda done: done.result(), cancelled.finished)
    other.wait_then(future, lambda done: done.result(), other.finished)
    assert cancelled.cancel()
    assert cancelled.outcome == [(None, None, True)] and not future.done()
    assert not cancelled.cancel()  # not waiting any more
    future.resolve_inline(5)
    assert other.outcome == [(5, None, False)] and len(cancelled.outcome) == 1
