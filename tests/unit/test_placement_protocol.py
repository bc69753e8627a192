"""Placement's boundaries, config, utilization parsing and status table, without processes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import remem_common.protocol.admin_placement as admin_module
import remem_common.protocol.client_placement as client_module
from pydantic import BaseModel, ValidationError
from remem_common.config import load_config
from remem_common.framing import decode, encode
from remem_common.placement_requests import PLACEMENT_REPLY_ADAPTER
from remem_common.protocol.admin_placement import (
    DrainServerReply,
    DrainServerRequest,
    GetStatusReply,
    GetStatusRequest,
    PushStatus,
    ServerStatus,
    SlabStatus,
)
from remem_common.protocol.client_placement import (
    AllocateSlabReply,
    AllocateSlabRequest,
    GetMapReply,
    GetMapRequest,
    MapChangedNotice,
    ReplicaRef,
    ReportFailureReply,
    ReportFailureRequest,
    map_topic,
)
from remem_common.protocol.envelope import PROTOCOL_VERSION, ErrorCode, ErrorReply, ProtocolError
from remem_placement.config import ENV_PREFIX, PlacementConfig
from remem_placement.server import SERVED_ADAPTER
from remem_placement.status import render
from remem_placement.utilization import instance_of, parse_metrics

REQUESTS = [
    AllocateSlabRequest(msg_id=1, tenant="t", volume=2, slab=3, replicas=3),
    AllocateSlabRequest(msg_id=2, tenant="t", volume=2, slab=3, known_replicas=["a", "b"]),
    GetMapRequest(msg_id=3, tenant="t", volume=2, since_epoch=99),
    ReportFailureRequest(msg_id=4, tenant="t", volume=2, slab=3, server_id="a", detail="x"),
    GetStatusRequest(msg_id=5),
    DrainServerRequest(msg_id=6, server_id="a", cancel=True),
]
REF = ReplicaRef(server_id="a", endpoint="tcp://127.0.0.1:7100")
REPLIES = [
    AllocateSlabReply(
        msg_id=0,
        parent_id=1,
        tenant="t",
        volume=2,
        slab=3,
        replicas=[REF],
        filling=[REF],
        degraded=True,
        epoch=7,
    ),
    GetMapReply(
        msg_id=0,
        parent_id=3,
        tenant="t",
        volume=2,
        epoch=8,
        changed=True,
        servers={"a": "tcp://127.0.0.1:7100"},
        slabs=[(3, ["a"], []), (4, ["a"], ["a"])],
        degraded=[3],
    ),
    ReportFailureReply(msg_id=0, parent_id=4, server_state="suspect", epoch=9),
    GetStatusReply(
        msg_id=0,
        parent_id=5,
        epoch=1,
        in_grace=False,
        slabs_total=2,
        servers=[
            ServerStatus(
                server_id="a",
                zone="z",
                state="draining",
                endpoint="tcp://h:1",
                used_bytes=3 << 20,
                capacity_bytes=64 << 20,
                slabs=2,
                under_pressure=False,
                draining=True,
                utilization_from="metrics",
            )
        ],
        degraded=[SlabStatus(tenant="t", volume=2, slab=3, target=2, replicas=["a"], filling=[])],
        pushes=[
            PushStatus(
                tenant="t",
                volume=2,
                slab=3,
                source="a",
                target="b",
                reason="drain",
                seconds=1.5,
                copying=True,
            )
        ],
        pushes_done=4,
        pushes_failed=1,
        rereplicated_bytes=5 << 20,
    ),
    DrainServerReply(msg_id=0, parent_id=6, server_id="a", draining=True, slabs_left=2),
    ErrorReply(msg_id=0, parent_id=1, error_code=ErrorCode.NO_SPACE, detail="full"),
]


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: m.type)
def test_every_request_round_trips(msg: BaseModel) -> None:
    decoded, frames = decode(encode(msg), SERVED_ADAPTER)
    assert decoded == msg and frames == []


@pytest.mark.parametrize("msg", REPLIES, ids=lambda m: m.type)
def test_every_reply_round_trips(msg: BaseModel) -> None:
    assert decode(encode(msg), PLACEMENT_REPLY_ADAPTER)[0] == msg


def test_specs_name_the_protocol_version_and_every_message() -> None:
    for module in (client_module, admin_module):
        doc = module.__doc__ or ""
        documented = re.search(r"protocol version (\d+)", doc)
        assert documented is not None and int(documented.group(1)) == PROTOCOL_VERSION
        for name in re.findall(
            r'Literal\["(\w+_(?:request|reply))"\]', Path(module.__file__ or "").read_text()
        ):
            assert name in doc, f"{name} is not in {module.__name__}'s spec"


def test_bad_requests_are_refused_by_the_model() -> None:
    for header in [
        b'{"type":"allocate_slab_request","version":1,"msg_id":1,"tenant":"t","volume":0,'
        b'"slab":0,"replicas":0}',
        b'{"type":"allocate_slab_request","version":1,"msg_id":1,"tenant":"t","volume":0,'
        b'"slab":0,"known_replicas":["a","b","c","d","e","f","g","h","i"]}',
        b'{"type":"get_map_request","version":1,"msg_id":1,"tenant":"t","volume":0,'
        b'"since_epoch":-1}',
        b'{"type":"drain_server_request","version":1,"msg_id":1,"server_id":"bad id"}',
    ]:
        with pytest.raises(ProtocolError) as caught:
            decode([b"", header], SERVED_ADAPTER)
        assert caught.value.code == ErrorCode.MALFORMED


def test_map_notice_topics_do_not_prefix_each_other() -> None:
    assert not map_topic("t", 10).startswith(map_topic("t", 1))
    notice = MapChangedNotice(tenant="t", volume=1, epoch=5)
    assert MapChangedNotice.model_validate_json(notice.model_dump_json()) == notice


def test_config_defaults_detect_a_death_within_two_seconds() -> None:
    config = load_config(PlacementConfig, [], prog="remem placement", env_prefix=ENV_PREFIX)
    assert config.listen == "tcp://127.0.0.1:7000"
    assert config.dead_after + config.heartbeat_interval < 2.0
    assert config.utilization_source == "scrape"
    env = {"REMEM_PLACEMENT_UTILIZATION_SOURCE": "prometheus", "REMEM_PLACEMENT_INSECURE": "1"}
    config = load_config(
        PlacementConfig,
        ["--prometheus-url", "http://127.0.0.1:9090", "--min-free", "1GiB"],
        prog="remem placement",
        env_prefix=ENV_PREFIX,
        environ=env,
    )
    assert config.utilization_source == "prometheus" and config.policy().min_free == 1 << 30
    with pytest.raises(ValidationError):
        PlacementConfig(suspect_after=2.0, dead_after=1.0, insecure=True)


def test_parse_page_server_metrics() -> None:
    text = (
        "# HELP pageserver_used_bytes x\n# TYPE pageserver_used_bytes gauge\n"
        "pageserver_used_bytes 4096.0\n"
        "# HELP pageserver_capacity_bytes x\n# TYPE pageserver_capacity_bytes gauge\n"
        "pageserver_capacity_bytes 8192.0\n"
        "# HELP other_total x\n# TYPE other_total counter\nother_total 3.0\n"
    )
    assert parse_metrics(text) == (4096, 8192)
    assert parse_metrics("# nothing here\n") is None
    assert instance_of("http://127.0.0.1:9101/metrics") == "127.0.0.1:9101"


def test_status_table() -> None:
    status = REPLIES[3]
    assert isinstance(status, GetStatusReply)
    text = render(status)
    lines = text.splitlines()
    assert lines[0].split() == ["SERVER", "ZONE", "STATE", "USED/CAPACITY", "SLABS", "ENDPOINT"]
    assert lines[1].split() == ["a", "z", "draining", "3.0MiB/64.0MiB", "(5%)", "2", "tcp://h:1"]
    assert "degraded t/2/3: 1/2 replicas [a]" in text
    assert "1 in flight, 4 done, 1 failed, 5.0MiB copied" in text
    assert "drain t/2/3: a -> b (copying, 1.5s)" in text
