"""Fixtures shared by every suite: real service processes on loopback, cleaned up always."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import zmq
from remem_common.testing import ServiceProcess, start_service

from . import fuzz_summary

StartPageServer = Callable[..., ServiceProcess]

# Curve is every service's default (and `remem up`'s). The suites start services on loopback
# without keys, so they opt out here, for the processes they spawn; a test that wants Curve
# passes --no-insecure and keys (tests/integration/test_security.py).
for _prefix in ("PAGESERVER", "PLACEMENT", "MIRROR", "CLIENT", "UP"):
    os.environ.setdefault(f"REMEM_{_prefix}_INSECURE", "1")


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A context whose sockets must all be closed by the test: a leak fails, not hangs."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def shm_dir() -> Iterator[Path]:
    """A private folder under /dev/shm for arena files, removed afterwards."""
    path = Path("/dev/shm") / f"remem-test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


@pytest.fixture
def start_pageserver(shm_dir: Path) -> Iterator[StartPageServer]:
    """Start page server processes; every one is stopped (and must stop) at teardown.

    Call as `start_pageserver(name="a", capacity="64MiB", extra=[...])`; the same name reuses
    the same arena file, which is how a restart is tested.
    """
    started: list[ServiceProcess] = []

    def start(
        name: str = "ps0",
        capacity: str = "64MiB",
        extra: list[str] | None = None,
        forget: bool = False,
    ) -> ServiceProcess:
        args = [
            "pageserver",
            "--capacity", capacity,
            "--listen", "tcp://127.0.0.1:0",
            "--metrics-port", "0",
            "--shm-path", str(shm_dir / f"{name}.arena"),
            "--server-id", name,
        ]  # fmt: skip
        if forget:
            args.append("--forget")
        service = start_service(name, args + (extra or []))
        started.append(service)
        return service

    yield start
    for service in started:
        if service.proc.poll() is None:
            service.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzzers' one-line-per-socket figures (examples sent, rejections counted)."""
    if fuzz_summary.LINES:
        terminalreporter.section("fuzz summary")
        for line in fuzz_summary.LINES:
            terminalreporter.write_line(line)
