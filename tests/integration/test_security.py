"""CurveZMQ and tenants with real processes on loopback.

A plaintext peer, a key nobody authorized and a key of another tenant are all refused (no
reply at all for the first two, `forbidden` for the third), while the right key works; a
client of tenant a cannot read, write or trim tenant b's pages, nor allocate or map b's
slabs. Page servers register their keys with placement, clients learn them from placement,
and a re-replication push between page servers runs under Curve too. `remem up` runs Curve
everywhere with keys it makes in STATE_DIR/keys.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from remem_cli.up import UpConfig
from remem_common.config import load_config
from remem_common.mirror_client import MirrorClient, MirrorTimeout
from remem_common.pageserver_client import PageServerClient, PageServerError, PageServerTimeout
from remem_common.placement_requests import (
    BlockingPlacementClient,
    PlacementRequestError,
    PlacementRequestTimeout,
)
from remem_common.protocol.admin_placement import GetStatusReply
from remem_common.protocol.envelope import ErrorCode
from remem_common.protocol.pages import make_keys
from remem_common.protocol.pageserver_placement import (
    RegisterServerReply,
    RegisterServerRequest,
)
from remem_common.security import Security, load_public_key, write_keypair
from remem_common.testing import ServiceProcess, start_service

from ..conftest import StartPageServer
from .nbd_raw import RawNbd
from .placement_support import FAST, PlacementProcesses, pages_of, scrape, wait_until

# An unauthenticated request must get no answer at all: a second is plenty on loopback for
# a request that would be answered (the right key's requests below take milliseconds).
SILENCE = 1.0
PAGES = 300


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Authorized certificates in KEYS/; an outsider's pair in KEYS/../outside/."""
    root = tmp_path_factory.mktemp("curve")
    authorized = root / "keys"
    write_keypair(authorized, "placement", "placement", None)
    for name in ("ps-a", "ps-b", "ps-c"):
        write_keypair(authorized, name, "pageserver", None)
    write_keypair(authorized, "alice", "client", "a")
    write_keypair(authorized, "bob", "client", "b")
    write_keypair(authorized, "admin", "admin", None)
    write_keypair(root / "outside", "mallory", "client", "a")
    return authorized


def secure(keys: Path, name: str) -> list[str]:
    """Flags of a service running Curve as `name` and admitting KEYS/*.key (the suites' env
    says --insecure: the flag wins)."""
    return [
        "--no-insecure",
        "--curve-secret-key", str(keys / f"{name}.key_secret"),
        "--curve-authorized", str(keys),
    ]  # fmt: skip


def secret_of(keys: Path, name: str) -> Path:
    path = keys / f"{name}.key_secret"
    return path if path.exists() else keys.parent / "outside" / f"{name}.key_secret"


def page_client(
    keys: Path, name: str | None, server: ServiceProcess, server_name: str
) -> PageServerClient:
    """A client of `server` with the key `name` (None: plaintext)."""
    endpoint = server.ready["endpoint"]
    if name is None:
        return PageServerClient(endpoint, timeout=SILENCE)
    return PageServerClient(
        endpoint,
        timeout=5.0,
        security=Security.curve(secret_of(keys, name)),
        server_key=load_public_key(keys / f"{server_name}.key"),
    )


def placement_client(
    keys: Path, name: str | None, placement: ServiceProcess
) -> BlockingPlacementClient:
    endpoint = placement.ready["endpoint"]
    if name is None:
        return BlockingPlacementClient(endpoint, timeout=SILENCE)
    return BlockingPlacementClient(
        endpoint,
        timeout=5.0,
        security=Security.curve(secret_of(keys, name)),
        server_key=load_public_key(keys / "placement.key"),
    )


def slab_keys(slab: int, count: int) -> np.ndarray:
    return make_keys([slab] * count, range(count))


def test_page_server_admits_known_keys_and_binds_each_client_to_its_tenant(
    keys: Path, start_pageserver: StartPageServer
) -> None:
    server = start_pageserver(name="ps-a", extra=secure(keys, "ps-a"))
    assert server.ready["curve"] == "on"
    a_pages, b_pages = pages_of(8, seed=1), pages_of(8, seed=2)

    # The right keys work: each client writes and reads its own tenant's pages.
    with page_client(keys, "bob", server, "ps-a") as bob:
        assert bob.put("b", 1, slab_keys(0, 8), b_pages) == 8
    with page_client(keys, "alice", server, "ps-a") as alice:
        assert alice.put("a", 1, slab_keys(0, 8), a_pages) == 8
        found, _, data = alice.get("a", 1, slab_keys(0, 8))
        assert found.all() and np.array_equal(data, a_pages)

        # Another tenant's pages: every operation is refused and changes nothing.
        refused = []
        for attempt in (
            lambda: alice.get("b", 1, slab_keys(0, 8)),
            lambda: alice.put("b", 1, slab_keys(0, 8), a_pages),
            lambda: alice.delete("b", 1, slab_keys(0, 8)),
            lambda: alice.inventory(),  # placement's order, not a client's
            lambda: alice.drop_slab("b", 1, 0),
        ):
            with pytest.raises(PageServerError) as error:
                attempt()
            refused.append(error.value.code)
        assert refused == [ErrorCode.FORBIDDEN] * 5
        # Still served after the refusals.
        assert alice.get("a", 1, slab_keys(0, 1))[0].all()
    with page_client(keys, "bob", server, "ps-a") as bob:
        found, _, data = bob.get("b", 1, slab_keys(0, 8))
        assert found.all() and np.array_equal(data, b_pages)
    # A key of another role may not use the client data path either.
    with (
        page_client(keys, "placement", server, "ps-a") as placement,
        pytest.raises(PageServerError) as error,
    ):
        placement.get("a", 1, slab_keys(0, 1))
    assert error.value.code == ErrorCode.FORBIDDEN

    # No key, or a key nobody authorized: no answer at all.
    with page_client(keys, None, server, "ps-a") as plain, pytest.raises(PageServerTimeout):
        plain.get("a", 1, slab_keys(0, 1))
    with page_client(keys, "mallory", server, "ps-a") as mallory, pytest.raises(PageServerTimeout):
        mallory.get("a", 1, slab_keys(0, 1))

    # The right client key, but not this server's key: the server cannot even decrypt it.
    with (
        PageServerClient(
            server.ready["endpoint"],
            timeout=SILENCE,
            security=Security.curve(keys / "alice.key_secret"),
            server_key=load_public_key(keys / "ps-b.key"),
        ) as lost,
        pytest.raises(PageServerTimeout),
    ):
        lost.get("a", 1, slab_keys(0, 1))

    metrics = scrape(server)
    assert metrics["pageserver_forbidden_requests_total"] == 6
    assert metrics['pageserver_auth_refused_total{reason="unknown_key"}'] >= 1
    # The plaintext peer and the one with the wrong server key never reached the ZAP
    # handler: their handshakes failed before.
    assert metrics['pageserver_auth_refused_total{reason="handshake"}'] >= 1
    assert metrics['pageserver_auth_refused_total{reason="role"}'] == 0


def admin_status(keys: Path, placement: ServiceProcess) -> GetStatusReply:
    with placement_client(keys, "admin", placement) as admin:
        return admin.status()


@pytest.fixture
def placements() -> Iterator[PlacementProcesses]:
    processes = PlacementProcesses()
    yield processes
    processes.stop_all()


def test_cluster_under_curve_keeps_tenants_apart_and_repairs_by_peer_push(
    keys: Path, placements: PlacementProcesses, start_pageserver: StartPageServer
) -> None:
    placement = placements.start([*FAST, *secure(keys, "placement")])
    assert placement.ready["curve"] == "on"
    servers = {
        name: start_pageserver(
            name=name,
            extra=[
                *secure(keys, name),
                "--placement", placement.ready["endpoint"],
                "--placement-public-key", str(keys / "placement.key"),
                "--zone", name,
            ],
        )
        for name in ("ps-a", "ps-b", "ps-c")
    }  # fmt: skip

    def registered() -> bool:
        status = admin_status(keys, placement)
        live = {s.server_id for s in status.servers if s.state == "live"}
        return live == set(servers) and not status.in_grace

    wait_until("page servers registered over Curve", registered)

    with placement_client(keys, "alice", placement) as alice:
        reply = alice.allocate("a", 1, 0, replicas=2)
        # Placement hands out each replica's key: the one the page server registered.
        assert {r.public_key for r in reply.replicas} == {
            load_public_key(keys / f"{r.server_id}.key") for r in reply.replicas
        }
        for attempt in (
            lambda: alice.allocate("b", 1, 0),
            lambda: alice.get_map("b", 1),
            lambda: alice.status(),
        ):
            with pytest.raises(PlacementRequestError) as error:
                attempt()
            assert error.value.code == ErrorCode.FORBIDDEN
    with placement_client(keys, None, placement) as plain, pytest.raises(PlacementRequestTimeout):
        plain.status()
    # A page server cannot make clients trust a key that is not its own.
    with (
        placement_client(keys, "ps-c", placement) as impostor,
        pytest.raises(PlacementRequestError) as error,
    ):
        impostor.ask(
            RegisterServerRequest(
                msg_id=impostor.next_id(),
                server_id="ps-c",
                data_endpoint=servers["ps-c"].ready["endpoint"],
                metrics_url="http://127.0.0.1:1/metrics",
                capacity_bytes=1 << 26,
                used_bytes=0,
                zone="ps-c",
                started_at=0.0,
                public_key=load_public_key(keys / "alice.key"),
            ),
            RegisterServerReply,
        )
    assert error.value.code == ErrorCode.FORBIDDEN
    assert scrape(placement)["placement_forbidden_requests_total"] == 4

    data = pages_of(PAGES, seed=3)
    for replica in reply.replicas:
        with page_client(keys, "alice", servers[replica.server_id], replica.server_id) as alice:
            assert alice.put("a", 1, slab_keys(0, PAGES), data) == PAGES

    # A replica dies: placement orders the survivor to push the slab to the third server,
    # page server to page server, every link authenticated.
    victim = reply.replicas[0].server_id
    servers[victim].kill(signal.SIGKILL)
    epoch = 0

    def repaired() -> list[str] | None:
        nonlocal epoch
        with placement_client(keys, "alice", placement) as alice:
            slab_map = alice.get_map("a", 1, since_epoch=epoch)
        epoch = slab_map.epoch
        for slab, replicas, filling in slab_map.slabs:
            if slab == 0 and len(replicas) == 2 and victim not in replicas and not filling:
                assert set(slab_map.server_keys) == set(slab_map.servers)
                return replicas
        return None

    replicas = wait_until("slab 0 back at 2 replicas", repaired, timeout=30)
    (target,) = set(replicas) - {r.server_id for r in reply.replicas}
    with page_client(keys, "alice", servers[target], target) as alice:
        found, _, copied = alice.get("a", 1, slab_keys(0, PAGES))
    assert found.all() and np.array_equal(copied, data)
    assert scrape(servers[target])["pageserver_push_received_bytes_total"] > 0


def test_remem_up_over_tcp_runs_curve_everywhere(keys: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = start_service(
        "remem-up",
        ["up", "--state-dir", str(state), "--size", "64MiB", "--pageservers", "2",
         "--forget", "--transport", "tcp", "--no-insecure"],
        timeout=240,
    )  # fmt: skip
    try:
        assert up.ready["curve"] == "on"
        data = np.random.default_rng(4).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
        with RawNbd.unix(str(state / "nbd.sock")).connect() as nbd:
            nbd.write(0, data)
            assert nbd.read(0, len(data)) == data
        logs = {p.stem: p.read_text() for p in (state / "logs").glob("*.log")}
        for name in ("placement", "pageserver-0", "pageserver-1", "mirror"):
            assert "curve=on" in logs[name], name
        key_dir = state / "keys"
        placement_endpoint = _ready_field(logs["placement"], "endpoint")
        status = subprocess.run(
            [sys.executable, "-m", "remem_cli", "status", "--json",
             "--placement", placement_endpoint,
             "--curve-secret-key", str(key_dir / "admin.key_secret"),
             "--placement-public-key", str(key_dir / "placement.key")],
            check=True, timeout=60, capture_output=True, text=True,
        )  # fmt: skip
        assert GetStatusReply.model_validate_json(status.stdout).slabs_total == 1
        # The mirror admits the client's key alone: a plaintext peer gets nothing.
        mirror = _ready_field(logs["mirror"], "endpoint")
        with MirrorClient(mirror, timeout=SILENCE) as plain, pytest.raises(MirrorTimeout):
            plain.describe()
        # Keys from another deployment are nobody here.
        with (
            BlockingPlacementClient(
                placement_endpoint,
                timeout=SILENCE,
                security=Security.curve(keys / "admin.key_secret"),
                server_key=load_public_key(key_dir / "placement.key"),
            ) as stranger,
            pytest.raises(PlacementRequestTimeout),
        ):
            stranger.status()
    finally:
        assert up.stop(timeout=60) == 0, up.log()


def test_remem_up_runs_curve_by_default_where_other_users_could_connect() -> None:
    """Loopback TCP is open to every local user: Curve. The local mode's Unix sockets are
    in a folder only the user can open: plaintext, unless asked."""

    def config(*args: str) -> UpConfig:
        return load_config(UpConfig, ["--state-dir", "/tmp/s", *args], prog="remem up",
                           env_prefix="REMEM_UP_", environ={})  # fmt: skip

    assert config().transport == "ipc" and not config().curve
    assert config("--transport", "tcp").curve
    assert not config("--transport", "tcp", "--insecure").curve
    assert config("--no-insecure").curve


def _ready_field(log: str, field: str) -> str:
    for line in log.splitlines():
        if " ready " in line:
            for part in line.split():
                if part.startswith(field + "="):
                    return part.split("=", 1)[1]
    raise AssertionError(f"no {field} in the ready line of:\n{log}")
