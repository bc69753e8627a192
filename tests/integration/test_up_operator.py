"""What an operator of `remem up` meets first: the RAM it holds in /dev/shm while idle, filled
and after it stops (--keep-arenas, a SIGKILLed page server), and `remem status` / `remem drain`
finding it through STATE_DIR/cluster.json over either transport, keys included.

Real `remem up` processes (ready line awaited), arenas in a private /dev/shm folder measured
by allocated blocks (st_blocks * 512), not apparent size.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from remem_common.process import ServiceProcess
from remem_common.testing import start_service

from .test_nbd_clients import need, run

MiB = 1 << 20
IDLE_LIMIT = 256 * MiB
STOPPED_LIMIT = 16 * MiB
# Variables that would point the admin tools elsewhere than the cluster under test.
ADMIN_ENV = ("REMEM_PLACEMENT_ENDPOINT", "REMEM_ADMIN_CURVE_SECRET_KEY")


def shm_bytes(folder: Path) -> int:
    """Memory held by the files under `folder`: their allocated blocks."""
    return sum(path.stat().st_blocks * 512 for path in folder.rglob("*") if path.is_file())


def arenas(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.arena"))


def ready_fields(log_file: Path) -> dict[str, str]:
    """Fields of the last ready line in one child's log under the state dir."""
    lines = [line for line in log_file.read_text().splitlines() if " ready " in line]
    assert lines, f"no ready line in {log_file}"
    return dict(part.split("=", 1) for part in lines[-1].split() if "=" in part)


def kill_children(state: Path) -> None:
    """SIGKILL whatever children a `remem up` that did not stop cleanly left running."""
    for pid_file in (state / "pids").glob("*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


class Ups:
    """`remem up` processes of one test: each is stopped (and its children killed if it
    did not stop them) at teardown."""

    def __init__(self, shm: Path) -> None:
        self.shm = shm
        self.started: list[tuple[ServiceProcess, Path]] = []

    def start(self, state: Path, *extra: str) -> ServiceProcess:
        up = start_service(
            "remem-up",
            ["up", "--state-dir", str(state), "--shm-dir", str(self.shm), *extra],
            timeout=240,
        )
        self.started.append((up, state))
        return up

    def close(self) -> None:
        for up, state in self.started:
            if up.proc.poll() is None:
                try:
                    up.stop(timeout=60)
                finally:
                    kill_children(state)
            else:
                kill_children(state)


@pytest.fixture
def ups() -> Iterator[Ups]:
    shm = Path("/dev/shm") / f"remem-test-up-{uuid.uuid4().hex[:12]}"
    shm.mkdir()
    started = Ups(shm)
    try:
        yield started
    finally:
        try:
            started.close()
        finally:
            shutil.rmtree(shm, ignore_errors=True)


def stop(up: ServiceProcess, sig: int = signal.SIGINT) -> int:
    up.proc.send_signal(sig)
    return up.stop(timeout=60)


def remem(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if name not in ADMIN_ENV}
    return subprocess.run(
        [sys.executable, "-m", "remem_cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=cwd,
        env=env,
    )


def test_an_idle_up_holds_little_and_a_clean_stop_gives_it_all_back(
    ups: Ups, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    up = ups.start(state, "--size", "2GiB")
    files = arenas(ups.shm)
    assert len(files) == 3
    assert all(f.stat().st_size > 2 << 30 for f in files)  # each could hold 2 GiB of pages
    idle = shm_bytes(ups.shm)
    assert idle <= IDLE_LIMIT, f"idle remem up holds {idle / MiB:.1f} MiB of /dev/shm"
    assert stop(up, signal.SIGINT) == 0, up.log()
    assert arenas(ups.shm) == []
    assert shm_bytes(ups.shm) <= STOPPED_LIMIT
    assert not (state / "cluster.json").exists()


@pytest.mark.timeout(300)
def test_pages_commit_memory_trims_give_it_back_and_kept_arenas_reopen(
    ups: Ups, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    up = ups.start(state, "--size", "256MiB", "--keep-arenas", "--no-mirror")
    uri = up.ready["nbd_uri"]
    source = tmp_path / "source.img"
    source.write_bytes(os.urandom(64 * MiB))
    run([need("nbdcopy"), "--flush", str(source), uri], timeout=180)
    filled = shm_bytes(ups.shm)
    # Two replicas of 64 MiB, plus slot records and each slab's last, partly used region.
    assert 128 * MiB <= filled <= 128 * MiB + 16 * MiB, filled / MiB
    run([need("qemu-io"), "-f", "raw", uri, "-c", f"discard 0 {32 * MiB}"])
    trimmed = shm_bytes(ups.shm)
    assert 64 * MiB <= trimmed <= 64 * MiB + 16 * MiB, trimmed / MiB

    # A page server killed outright leaves its arena; restarted on it, it has its pages.
    victim = ready_fields(state / "logs" / "pageserver-0.log")
    os.kill(int((state / "pids" / "pageserver-0.pid").read_text()), signal.SIGKILL)
    arena = next(f for f in arenas(ups.shm) if f.name == "pageserver-0.arena")
    held = arena.stat().st_blocks * 512
    assert held > 8 * MiB
    restarted = start_service(
        "pageserver-0-again",
        ["pageserver", "--capacity", str(int(victim["capacity_pages"]) * 4096),
         "--shm-path", str(arena), "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0",
         "--insecure"],
    )  # fmt: skip
    try:
        assert int(restarted.ready["pages"]) > 0
        assert arena.stat().st_blocks * 512 == held
    finally:
        assert restarted.stop() == 0

    # --keep-arenas: a clean stop leaves every arena with its pages for the next run ...
    assert stop(up, signal.SIGTERM) == 0, up.log()
    assert len(arenas(ups.shm)) == 3
    kept = shm_bytes(ups.shm)
    assert kept >= trimmed - 16 * MiB
    # ... which reopens them, and (without --keep-arenas) removes them when it stops.
    again = ups.start(state, "--size", "256MiB", "--no-mirror")
    reopened = [ready_fields(state / "logs" / f"pageserver-{i}.log") for i in range(3)]
    # At least the 32 MiB left after the trim, twice (re-replication may have added copies).
    assert sum(int(fields["pages"]) for fields in reopened) >= 2 * 32 * MiB // 4096
    assert stop(again, signal.SIGINT) == 0, again.log()
    assert arenas(ups.shm) == []
    assert shm_bytes(ups.shm) <= STOPPED_LIMIT


def run_status(*args: str, cwd: Path | None = None) -> dict[str, object]:
    result = remem("status", "--json", *args, cwd=cwd)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def live_servers(status: dict[str, object]) -> list[str]:
    servers = status["servers"]
    assert isinstance(servers, list)
    return sorted(s["server_id"] for s in servers if s["state"] == "live")


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_status_and_drain_find_the_cluster_up_started(
    ups: Ups, tmp_path: Path, transport: str
) -> None:
    state = tmp_path / "state"
    extra = ["--transport", transport, "--no-mirror", "--size", "64MiB"]
    if transport == "tcp":
        extra.append("--no-insecure")  # the suites' environment turns Curve off by default
    up = ups.start(state, *extra)
    cluster = json.loads((state / "cluster.json").read_text())
    assert cluster["transport"] == transport
    assert cluster["curve"] is (transport == "tcp")
    assert cluster["placement"].startswith(f"{transport}://")
    everyone = ["pageserver-0", "pageserver-1", "pageserver-2"]

    # --state-dir from anywhere, and ./state (where `make up` puts it) with no flag at all.
    assert live_servers(run_status("--state-dir", str(state), cwd=Path("/"))) == everyone
    assert live_servers(run_status(cwd=tmp_path)) == everyone
    if transport == "tcp":
        # The keys came from cluster.json: without them placement does not answer.
        assert cluster["admin_secret_key"] == str(state.resolve() / "keys/admin.key_secret")
        plain = remem(
            "status", "--placement", cluster["placement"], "--timeout", "1", cwd=Path("/")
        )
        assert plain.returncode == 1, plain.stderr

    drained = remem("drain", "pageserver-2", "--state-dir", str(state), "--deadline", "60")
    assert drained.returncode == 0, drained.stderr
    assert "pageserver-2 drained: safe to stop" in drained.stderr
    assert stop(up) == 0, up.log()
    gone = remem("status", "--state-dir", str(state))
    assert gone.returncode == 2
    assert "cluster.json: no `remem up --state-dir" in gone.stderr
