"""Scenario 4: a network partition. Two page servers run in their own network namespace,
reachable only through a veth pair; taking the pair's link down cuts them off from the
client and from placement at once (their processes keep running, as behind a failed switch).
The client fails over, placement re-replicates onto the servers outside, and once the link
is back the cut-off servers register again and lose their stale copies. No mirror runs, so
every byte read comes from a page server.

Needs root (ip netns); skipped otherwise. Namespace and links have names unique to the run
and are removed at teardown whatever happened.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .cluster import (
    FIO_SPREAD,
    FIO_SPREAD_BYTES,
    PageServerSpec,
    assert_replicas_identical,
    fio,
    start_fio,
    verified_bytes,
    wait_until,
)
from .conftest import MakeCluster

pytestmark = [pytest.mark.faults, pytest.mark.root]


def ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


@dataclass
class Namespace:
    """A network namespace joined to the host by a veth pair on a /30 of its own."""

    name: str
    host_link: str
    host_address: str
    inner_address: str

    @property
    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_link, "up")


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("needs root: ip netns")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 is not installed")
    tag = uuid.uuid4().hex[:8]
    subnet = f"10.{random.randrange(200, 250)}.{random.randrange(256)}"
    ns = Namespace(f"remem-{tag}", f"rmh{tag}", f"{subnet}.1", f"{subnet}.2")
    inner_link = f"rmn{tag}"
    try:
        ip("netns", "add", ns.name)
        ip("link", "add", ns.host_link, "type", "veth", "peer", "name", inner_link)
        ip("link", "set", inner_link, "netns", ns.name)
        ip("addr", "add", f"{ns.host_address}/30", "dev", ns.host_link)
        ip("link", "set", ns.host_link, "up")
        inside = ["netns", "exec", ns.name, "ip"]
        ip(*inside, "addr", "add", f"{ns.inner_address}/30", "dev", inner_link)
        ip(*inside, "link", "set", inner_link, "up")
        ip(*inside, "link", "set", "lo", "up")
        yield ns
    finally:
        # Deleting the namespace deletes its end of the pair, and with it the host's end.
        subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", ns.host_link], capture_output=True, timeout=30)


def test_partitioned_page_servers_fail_over_and_recover_after_healing(
    make_cluster: MakeCluster, namespace: Namespace
) -> None:
    # Every slab gets two zones: ("cut", outside) or (outside, outside), never both replicas
    # behind the partition.
    inside = [
        PageServerSpec(name=f"ps-cut-{i}", zone="cut", host=namespace.inner_address,
                       prefix=namespace.prefix)
        for i in range(2)
    ]  # fmt: skip
    outside = [PageServerSpec(name=f"ps-out-{i}", zone=f"out{i}") for i in range(2)]
    # Placement listens on the host's end of the pair: reachable from inside the namespace,
    # and from the host itself whether the link is up or not (a local address).
    cluster = make_cluster(specs=inside + outside, placement_host=namespace.host_address)
    fio(cluster.uri, *FIO_SPREAD, "--do_verify=1")
    cluster.wait_fully_replicated(slabs=4)
    cut_off = {spec.name for spec in inside}
    assert cut_off & set(cluster.holders()), "no slab has a replica behind the partition"

    run = start_fio(cluster.uri, *FIO_SPREAD, "--randseed=3", "--do_verify=1")
    namespace.cut()
    try:
        assert verified_bytes(run.wait()) == FIO_SPREAD_BYTES

        def cut_off_dead() -> bool:
            states = {s.server_id: s.state for s in cluster.status().servers}
            return all(states[name] == "dead" for name in cut_off)

        wait_until("placement to declare the cut-off servers dead", cut_off_dead, 30)
        during = cluster.wait_fully_replicated(slabs=4)
        assert cut_off.isdisjoint(during.servers)
        report = fio(cluster.uri, *FIO_SPREAD, "--randseed=3", "--verify_only=1")
        assert verified_bytes(report) == FIO_SPREAD_BYTES
        assert cluster.client_metrics()["client_replica_failures_total"] >= 1
    finally:
        namespace.heal()

    # Healed: the cut-off servers register again (still running, their arenas stale) and
    # placement has them drop every copy the map no longer lists.
    cluster.wait_registered(cut_off, timeout=60)

    def stale_copies_dropped() -> bool:
        for name in cut_off:
            metrics = cluster.scrape_pageserver(name)
            if metrics["pageserver_pages_resident"] != 0:
                return False
        return True

    wait_until("the cut-off servers to drop their stale copies", stale_copies_dropped, 30)
    # New data may land on them again, and everything verifies.
    report = fio(cluster.uri, *FIO_SPREAD, "--randseed=3", "--verify_only=1")
    assert verified_bytes(report) == FIO_SPREAD_BYTES
    assert_replicas_identical(cluster, pages=FIO_SPREAD_BYTES // 4 // 4096)
    assert cluster.nbd_errors() == 0
