"""The Linux kernel swaps to remem and gets every byte back (root; nbdfuse + loop + cgroup).

Compared in the same run against `nbdkit memory`, the reference NBD server.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from remem_client.bench_nbd import start_nbdkit
from remem_common.testing import start_service

from .kernel_swap import available, run_hog

pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]

why_not = available()
if why_not:
    pytestmark.append(pytest.mark.skip(reason=why_not))


def test_kernel_swaps_to_nbdkit_reference(tmp_path: Path) -> None:
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit not installed")
    server = start_nbdkit(tmp_path, "2G")
    try:
        (tmp_path / "work").mkdir()
        result = run_hog(server.uri, tmp_path / "work")
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=10)
    assert result.ok, result
    print(f"nbdkit memory: {result}")


def test_kernel_swaps_to_remem_client_memory_backend(tmp_path: Path) -> None:
    client = start_service(
        "client",
        [
            "client",
            "--backend",
            "memory",
            "--size",
            "2GiB",
            "--nbd-socket",
            str(tmp_path / "nbd.sock"),
            "--metrics-port",
            "0",
        ],
    )
    try:
        (tmp_path / "work").mkdir()
        result = run_hog(client.ready["nbd_uri"], tmp_path / "work")
    finally:
        client.stop()
    assert result.ok, result
    assert result.swapped_in_mib > 0
    print(f"remem client (memory backend): {result}")


def test_kernel_swaps_to_remem_up_cluster(tmp_path: Path) -> None:
    """The whole system: placement, 3 page servers, 2 replicas, the client; kernel swap."""
    cluster = start_service(
        "up",
        ["up", "--state-dir", str(tmp_path / "state"), "--size", "1GiB", "--forget"],
        timeout=300,
    )
    try:
        (tmp_path / "work").mkdir()
        result = run_hog(cluster.ready["nbd_uri"], tmp_path / "work")
    finally:
        assert cluster.stop(timeout=60) == 0
    assert result.ok, result
    assert result.swapped_in_mib > 0
    print(f"remem up (2 replicas over 3 page servers): {result}")
