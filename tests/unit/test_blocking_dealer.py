"""remem_common.dealer.RequestDealer, under every blocking client (page server, mirror,
placement): a reply that arrives after its call timed out must not pass for the answer to the
next call. The server is a real libzmq ROUTER in a thread, answering as each test scripts."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from pydantic import BaseModel
from remem_common.framing import encode
from remem_common.pageserver_client import PageServerClient, PageServerTimeout
from remem_common.placement_requests import (
    BlockingPlacementClient,
    PlacementRequestError,
    PlacementRequestTimeout,
)
from remem_common.protocol.client_placement import ReportFailureReply
from remem_common.protocol.envelope import ErrorCode
from remem_common.protocol.pageserver_placement import ListInventoryReply

# The server's script: called with each request's msg_id (in arrival order, counting from
# 0), it returns the replies to send then, each made for a given parent_id.
Script = Callable[[int, list[int]], list[BaseModel]]


class ScriptedRouter:
    """A ROUTER on its own thread that answers requests as a script says."""

    def __init__(self, endpoint: str, script: Script) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.script = script
        self.msg_ids: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            if not self.socket.poll(20):
                continue
            frames = self.socket.recv_multipart()
            header = json.loads(frames[2])  # routing id, delimiter, header
            self.msg_ids.append(header["msg_id"])
            for reply in self.script(len(self.msg_ids) - 1, self.msg_ids):
                self.socket.send_multipart([frames[0], *encode(reply)])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.socket.close(linger=0)
        self.context.term()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[[Script], str]]:
    routers: list[ScriptedRouter] = []

    def start(script: Script) -> str:
        endpoint = f"ipc://{tmp_path}/router-{len(routers)}.sock"
        routers.append(ScriptedRouter(endpoint, script))
        return endpoint

    yield start
    for router in routers:
        router.close()


def inventory(parent_id: int, server_id: str) -> ListInventoryReply:
    return ListInventoryReply(msg_id=0, parent_id=parent_id, server_id=server_id, slabs=[])


def test_a_late_reply_to_a_timed_out_call_is_not_taken_for_the_next_one(
    serve: Callable[[Script], str],
) -> None:
    def script(index: int, msg_ids: list[int]) -> list[BaseModel]:
        if index == 0:
            return []  # the first call times out
        # The first call's answer comes late, just before the second's.
        return [inventory(msg_ids[0], "late"), inventory(msg_ids[1], "current")]

    with PageServerClient(serve(script), timeout=0.3) as client:
        with pytest.raises(PageServerTimeout):
            client.inventory()
        assert client.inventory().server_id == "current"


def test_placement_calls_skip_stale_replies_and_refuse_a_reply_of_the_wrong_type(
    serve: Callable[[Script], str],
) -> None:
    def reported(parent_id: int) -> ReportFailureReply:
        return ReportFailureReply(msg_id=0, parent_id=parent_id, server_state="live", epoch=0)

    def script(index: int, msg_ids: list[int]) -> list[BaseModel]:
        if index == 0:
            return []
        if index == 1:  # the first call's late answer, then the second's
            return [reported(msg_ids[0]), reported(msg_ids[1])]
        return [reported(msg_ids[index])]  # not what a status call waits for

    with BlockingPlacementClient(serve(script), timeout=0.3) as client:
        with pytest.raises(PlacementRequestTimeout):
            client.report_failure("tenant", 1, 0, "ps-a")
        assert client.report_failure("tenant", 1, 0, "ps-a").parent_id == 2
        with pytest.raises(PlacementRequestError) as refused:
            client.status()
        assert refused.value.code == ErrorCode.MALFORMED
