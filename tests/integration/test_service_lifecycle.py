"""The lifecycle every server shares (remem_common.lifecycle), as real processes.

Page server, placement and mirror: a bad or missing key file exits 2 with one line, an
endpoint or metrics port already taken exits 1 with one line, SIGTERM and SIGINT each stop
them cleanly (exit 0). The same signal twice ends a drain at once: a page server whose drain
is held by a slab push to a peer that never answers dies by the second signal instead of
waiting out its drain timeout, while a different signal only asks again. The asyncio variant
(the one the client will use) is checked the same way on a stand-in service.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
from remem_common.pageserver_client import PageServerClient
from remem_common.protocol.pages import PAGE_SIZE, make_keys
from remem_common.protocol.pageserver_placement import PushSlabRequest
from remem_common.security import write_keypair
from remem_common.testing import ServiceProcess, start_service

from ..conftest import StartPageServer

SERVICES = ("pageserver", "placement", "mirror")
# Far longer than the test may take: only the second signal can end these drains in time.
LONG = "300"


def service_args(service: str, tmp_path: Path, shm_dir: Path) -> list[str]:
    """The subcommand and the flags it needs besides --listen and --metrics-port."""
    if service == "pageserver":
        return ["pageserver", "--capacity", "1MiB", "--shm-path", str(shm_dir / "ps.arena")]
    if service == "mirror":
        return ["mirror", "--size", "1MiB", "--path", str(tmp_path / "m.img")]
    return ["placement"]


def run(*args: str, secure: bool = False) -> subprocess.CompletedProcess[str]:
    """`remem ARGS...` to its end (the suites' environment turns Curve off unless `secure`)."""
    env = dict(os.environ)
    if secure:
        for prefix in ("PAGESERVER", "PLACEMENT", "MIRROR"):
            env.pop(f"REMEM_{prefix}_INSECURE", None)
    return subprocess.run(
        [sys.executable, "-m", "remem_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize("service", SERVICES)
def test_a_missing_or_wrong_key_file_exits_2_with_one_line(
    service: str, tmp_path: Path, shm_dir: Path
) -> None:
    keys = tmp_path / "keys"
    write_keypair(keys, "someone", "client", "acme")
    base = [*service_args(service, tmp_path, shm_dir), "--listen", "tcp://127.0.0.1:0"]
    base += ["--metrics-port", "0", "--curve-authorized", str(keys)]
    missing = run(*base, "--curve-secret-key", str(keys / "nobody.key_secret"), secure=True)
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.startswith(f"remem {service}: cannot read certificate ")
    assert missing.stderr.count("\n") == 1 and "nobody.key_secret" in missing.stderr
    wrong = run(*base, "--curve-secret-key", str(keys / "someone.key_secret"), secure=True)
    assert wrong.returncode == 2, wrong.stderr
    assert wrong.stderr == (
        f"remem {service}: --curve-secret-key {keys / 'someone.key_secret'} is a client key, "
        f"not a {service} key\n"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_a_taken_endpoint_or_metrics_port_exits_1_with_one_line(
    service: str, tmp_path: Path, shm_dir: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        args = service_args(service, tmp_path, shm_dir)
        endpoint = run(*args, "--listen", f"tcp://127.0.0.1:{port}", "--metrics-port", "0")
        metrics = run(*args, "--listen", "tcp://127.0.0.1:0", "--metrics-port", str(port))
    assert endpoint.returncode == 1, endpoint.stderr
    assert endpoint.stderr.startswith(f"remem {service}: cannot bind")
    assert endpoint.stderr.count("\n") == 1 and "Address already in use" in endpoint.stderr
    assert metrics.returncode == 1, metrics.stderr
    assert metrics.stderr == (
        f"remem {service}: cannot serve metrics on port {port}: [Errno 98] Address already in use\n"
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("service", SERVICES)
def test_either_stop_signal_stops_cleanly(
    service: str, sig: signal.Signals, tmp_path: Path, shm_dir: Path
) -> None:
    args = service_args(service, tmp_path, shm_dir)
    running = start_service(
        service, [*args, "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0"]
    )
    try:
        assert running.ready["endpoint"].startswith("tcp://127.0.0.1:")
        assert running.ready["metrics"].startswith("http://127.0.0.1:")
        assert running.ready["curve"] == "off"
        running.proc.send_signal(sig)
        assert running.proc.wait(timeout=30) == 0, running.log()
    finally:
        running.stop()
    assert f"stopped on {sig.name} after " in running.log()


# -- the second signal -------------------------------------------------------------------------


def caught_signals(pid: int) -> set[int]:
    """The signals process `pid` has a handler for (SigCgt of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            mask = int(line.split()[1], 16)
            return {bit + 1 for bit in range(64) if mask >> bit & 1}
    raise AssertionError(f"no SigCgt for pid {pid}")


def wait_until(what: str, check: Callable[[], bool], timeout: float = 15.0) -> None:
    """Poll a running process's state (its output, its signal handlers) until `check`."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.02)


def hold_a_drain(server: ServiceProcess, target: zmq.Socket[bytes]) -> PageServerClient:
    """Order a slab push to `target`, which never answers, and wait for its first chunk:
    from then on the page server's drain waits for the push (up to its 300 s timeout)."""
    order = PageServerClient(server.ready["endpoint"], timeout=10)
    data = np.random.default_rng(3).integers(0, 256, (4, PAGE_SIZE), dtype=np.uint8)
    order.put("t", 0, make_keys([3] * 4, range(4)), data)
    endpoint = target.getsockopt(zmq.LAST_ENDPOINT)
    assert isinstance(endpoint, bytes)
    order.send(
        PushSlabRequest(
            msg_id=order.next_id(),
            tenant="t",
            volume=0,
            slab=3,
            target_endpoint=endpoint.decode(),
            timeout=float(LONG),
        )
    )
    assert target.poll(10_000), "the push never reached its target"
    target.recv_multipart()
    return order


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_the_same_signal_twice_ends_a_drain_at_once(
    sig: signal.Signals,
    start_pageserver: StartPageServer,
    zmq_context: zmq.Context[zmq.Socket[bytes]],
) -> None:
    server = start_pageserver(extra=["--drain-timeout", LONG])
    target = zmq_context.socket(zmq.ROUTER)
    target.bind("tcp://127.0.0.1:*")
    order = hold_a_drain(server, target)
    try:
        assert {signal.SIGTERM, signal.SIGINT} <= caught_signals(server.pid)
        server.proc.send_signal(sig)
        wait_until("the drain to begin", lambda: "stopping: finishing" in server.log())
        assert sig not in caught_signals(server.pid)  # the default action again
        assert server.proc.poll() is None  # held by the push
        asked = time.monotonic()
        server.proc.send_signal(sig)
        assert server.proc.wait(timeout=10) == -sig
        assert time.monotonic() - asked < 5
    finally:
        order.close()
        target.close(linger=0)
    assert "stopped" not in server.log().split("stopping: finishing")[-1]


def test_a_different_second_signal_only_asks_again(
    start_pageserver: StartPageServer, zmq_context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """`remem up`'s children get the terminal's SIGINT, then up's SIGTERM: still a drain."""
    server = start_pageserver(extra=["--drain-timeout", LONG])
    target = zmq_context.socket(zmq.ROUTER)
    target.bind("tcp://127.0.0.1:*")
    order = hold_a_drain(server, target)
    try:
        server.proc.send_signal(signal.SIGINT)
        wait_until("the drain to begin", lambda: "stopping: finishing" in server.log())
        server.proc.send_signal(signal.SIGTERM)
        # Its handler ran (it let go of SIGTERM), and the process lives on, draining.
        wait_until("the SIGTERM handler", lambda: signal.SIGTERM not in caught_signals(server.pid))
        assert server.proc.poll() is None
        server.proc.send_signal(signal.SIGTERM)  # the same one again: now it ends
        assert server.proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        order.close()
        target.close(linger=0)


STUCK_ASYNC_SERVICE = textwrap.dedent(
    """
    import asyncio, sys
    from remem_common.lifecycle import Started, run_service_async
    from remem_common.logs import setup_logging

    log = setup_logging("stuck")

    class Stuck:
        def __init__(self):
            self.stop = asyncio.Event()

        def request_stop(self):
            self.stop.set()

        async def serve(self):
            await self.stop.wait()
            log.info("draining")
            await asyncio.Event().wait()  # a drain that never ends

    async def start(lifecycle):
        return Started(Stuck(), {"service": "stuck"})

    sys.exit(asyncio.run(run_service_async("stuck", log, start)))
    """
)


def test_the_async_variant_also_ends_on_the_same_signal_twice() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", STUCK_ASYNC_SERVICE],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:

        def line_with(text: str) -> str:
            assert proc.stderr is not None
            for line in proc.stderr:
                if text in line:
                    return line
            raise AssertionError(f"exited (rc={proc.wait()}) before printing {text!r}")

        assert line_with("ready").endswith("ready service=stuck\n")
        proc.send_signal(signal.SIGTERM)
        line_with("draining")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()


def test_a_forced_exit_status_replaces_the_kill_with_one_line() -> None:
    """The client's variant (forced_exit=130): the same signal twice logs why and exits 130."""
    source = STUCK_ASYNC_SERVICE.replace(
        'run_service_async("stuck", log, start)',
        'run_service_async("stuck", log, start, forced_exit=130)',
    )
    assert "forced_exit=130" in source
    proc = subprocess.Popen(
        [sys.executable, "-c", source],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    try:
        lines: list[str] = []
        for line in proc.stderr:
            lines.append(line)
            if "draining" in line:
                break
            if "ready" in line:
                proc.send_signal(signal.SIGINT)
        else:
            raise AssertionError(f"exited (rc={proc.wait()}) before draining: {lines}")
        assert signal.SIGINT in caught_signals(proc.pid)  # handled, not the default again
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 130
        assert proc.stderr.read() == (
            "WARNING stuck: second signal (SIGINT): exiting without finishing the shutdown\n"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        proc.stderr.close()
