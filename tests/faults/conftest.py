"""Fixtures of the fault suite: a cluster that is always stopped, whatever the test did to it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import FaultCluster, PageServerSpec

MakeCluster = Callable[..., FaultCluster]


def pageserver_specs(count: int) -> list[PageServerSpec]:
    """`count` page servers on loopback, one zone each."""
    return [PageServerSpec(name=f"ps-{index}", zone=f"z{index}") for index in range(count)]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item, so the fixture can see a failure."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def make_cluster(
    tmp_path: Path, shm_dir: Path, request: pytest.FixtureRequest
) -> Iterator[MakeCluster]:
    """Start a cluster: `make_cluster(pageservers=4, with_mirror=False)` or with explicit
    `specs=[PageServerSpec(...)]`; stopped at teardown."""
    started: list[FaultCluster] = []

    def make(
        pageservers: int = 3,
        *,
        specs: list[PageServerSpec] | None = None,
        with_mirror: bool = False,
        placement_host: str = "127.0.0.1",
    ) -> FaultCluster:
        cluster = FaultCluster(
            state=tmp_path, shm_dir=shm_dir, with_mirror=with_mirror, placement_host=placement_host
        )
        started.append(cluster)
        cluster.start(specs if specs is not None else pageserver_specs(pageservers))
        return cluster

    yield make
    call = getattr(request.node, "report_call", None)
    for cluster in started:
        if call is not None and call.failed:
            cluster.print_logs()  # shown with the failure: what each process said
        cluster.stop()
