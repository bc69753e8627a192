"""Fixtures shared by every suite: real service processes on loopback, cleaned up always."""

from __future__ import annotations

import os
import re
import threading
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


# How long a context whose sockets are all closed may take to terminate (pyzmq's suite: 10 s).
TERM_TIMEOUT = 5.0


def term_context(context: zmq.Context[zmq.Socket[bytes]], timeout: float = TERM_TIMEOUT) -> None:
    """Terminate `context`, failing if that takes longer than `timeout`: a socket left open
    blocks term() forever. As pyzmq's own tests/conftest.py `term_context`: term() runs in a
    thread, joined with a timeout. The leaked sockets are then closed so nothing hangs."""
    terminator = threading.Thread(target=context.term, name="zmq-term", daemon=True)
    terminator.start()
    terminator.join(timeout)
    if not terminator.is_alive():
        return
    leaked = [sock for sock in list(context._sockets) if not sock.closed]
    described = ", ".join(sorted(sock.type.name for sock in leaked)) or "none found"
    for sock in leaked:
        sock.close(linger=0)
    terminator.join(timeout)
    pytest.fail(
        f"the ZeroMQ context did not terminate within {timeout}s: the test left "
        f"{len(leaked)} socket(s) open ({described})"
    )


@pytest.fixture
def zmq_context() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    """A context whose sockets the test must all close: a socket left open fails the test at
    teardown (instead of hanging it, or being closed for it)."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    # A closed socket's unsent messages never hold term() up: only an open socket does.
    context.linger = 0
    yield context
    term_context(context)


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


def histogram_buckets(
    samples: dict[str, float], name: str, **labels: str
) -> list[tuple[float, float]]:
    """The (upper bound, cumulative count) buckets of histogram `name` with `labels`, in
    order of bound, from scraped samples (`remem_common.testing.scrape_metrics`)."""
    buckets = []
    for key, value in samples.items():
        metric, _, label_text = key.partition("{")
        if metric != f"{name}_bucket":
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        le = found.pop("le")
        if found == labels:
            buckets.append((float(le), value))
    return sorted(buckets)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fuzzers' one-line-per-socket figures (examples sent, rejections counted)."""
    if fuzz_summary.LINES:
        terminalreporter.section("fuzz summary")
        for line in fuzz_summary.LINES:
            terminalreporter.write_line(line)
