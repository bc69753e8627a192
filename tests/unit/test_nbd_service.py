"""The client service's pieces without sockets: config, metrics, memory backend, memlock."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from remem_client import memlock
from remem_client.config import ENV_PREFIX, PROG, ClientConfig, parse_host_port
from remem_client.memory_backend import PAGE_SIZE, MemoryBackend
from remem_client.metrics import CMD_NAMES, DURATION_BUCKETS, RESULTS, build_metrics
from remem_client.nbd import wire
from remem_client.server import host_port, nbd_unix_uri, transmission_flags
from remem_common.config import load_config


def load(argv: list[str], environ: dict[str, str] | None = None) -> ClientConfig:
    return load_config(ClientConfig, argv, prog=PROG, env_prefix=ENV_PREFIX, environ=environ or {})


def test_config_sizes_listeners_and_defaults() -> None:
    config = load(["--size", "64MiB", "--nbd-socket", "/run/remem.sock"])
    assert int(config.size) == 64 << 20
    assert config.nbd_socket == Path("/run/remem.sock")
    assert config.nbd_listen_address is None
    assert (config.export_name, config.backend, config.metrics_port) == ("remem", "memory", 9102)
    assert config.metrics_host == "127.0.0.1" and config.lock_memory is True
    config = load(["--size", "4GiB", "--nbd-listen", "[::1]:0", "--no-lock-memory"])
    assert int(config.size) == 4 << 30 and config.nbd_listen_address == ("::1", 0)
    assert config.lock_memory is False


def test_config_from_environment_and_flag_wins() -> None:
    env = {"REMEM_CLIENT_SIZE": "1GiB", "REMEM_CLIENT_NBD_LISTEN": "0.0.0.0:10809",
           "REMEM_CLIENT_LOCK_MEMORY": "false", "REMEM_CLIENT_LOG_LEVEL": "debug"}  # fmt: skip
    config = load(["--size", "2GiB"], env)
    assert int(config.size) == 2 << 30
    assert config.nbd_listen_address == ("0.0.0.0", 10809)
    assert config.lock_memory is False and config.log_level == "DEBUG"


@pytest.mark.parametrize(
    "argv",
    [
        ["--size", "1GiB"],  # no listener
        ["--size", "0", "--nbd-socket", "/x"],
        ["--size", "-5", "--nbd-socket", "/x"],
        ["--size", "1GiB", "--nbd-listen", "::1:80"],  # IPv6 without brackets
        ["--size", "1GiB", "--nbd-listen", "host:99999"],
        ["--size", "1GiB", "--nbd-socket", "/x", "--export-name", "a\0b"],
        ["--size", "1GiB", "--nbd-socket", "/x", "--event-loop", "trio"],
        ["--size", "1GiB", "--nbd-socket", "/x", "--unknown-flag"],
    ],
)
def test_config_rejects_bad_values_with_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load(argv)
    assert exited.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_host_port_helpers() -> None:
    assert parse_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_host_port("[fe80::1]:10809") == ("fe80::1", 10809)
    assert host_port("::1", 5) == "[::1]:5" and host_port("a", 5) == "a:5"
    assert nbd_unix_uri("swap 0", "/tmp/a b.sock") == "nbd+unix:///swap%200?socket=/tmp/a%20b.sock"


def test_transmission_flags_follow_capabilities() -> None:
    backend = MemoryBackend(1 << 20)
    flags = transmission_flags(backend)
    for flag in (wire.FLAG_HAS_FLAGS, wire.FLAG_SEND_FLUSH, wire.FLAG_SEND_FUA,
                 wire.FLAG_SEND_TRIM, wire.FLAG_SEND_WRITE_ZEROES, wire.FLAG_SEND_FAST_ZERO,
                 wire.FLAG_CAN_MULTI_CONN):  # fmt: skip
        assert flags & flag
    assert not flags & (wire.FLAG_READ_ONLY | wire.FLAG_SEND_DF | wire.FLAG_ROTATIONAL)
    backend.can_trim = backend.can_write_zeroes = backend.can_multi_conn = False
    flags = transmission_flags(backend)
    assert not flags & (wire.FLAG_SEND_TRIM | wire.FLAG_SEND_FAST_ZERO | wire.FLAG_CAN_MULTI_CONN)


def test_metrics_families_labels_and_buckets() -> None:
    registry = CollectorRegistry()
    stats = build_metrics(registry)
    sample = registry.get_sample_value
    # every label combination exists from the start
    for cmd in CMD_NAMES:
        for result in RESULTS:
            assert sample("client_nbd_requests_total", {"cmd": cmd, "result": result}) == 0
    stats.observe(wire.Cmd.READ, 0, 30e-6)
    stats.observe(wire.Cmd.READ, 0, 2.0)
    stats.observe(wire.Cmd.WRITE, 2, 1e-3)
    stats.observe(999, 1, 0.0)
    stats.bytes_read += 4096
    stats.count_malformed("bad_request_magic")
    assert sample("client_nbd_requests_total", {"cmd": "read", "result": "ok"}) == 2
    assert sample("client_nbd_requests_total", {"cmd": "write", "result": "error"}) == 1
    assert sample("client_nbd_requests_total", {"cmd": "unknown", "result": "invalid"}) == 1
    bucket = "client_nbd_request_duration_seconds_bucket"
    assert sample(bucket, {"cmd": "read", "le": "2.5e-05"}) == 0
    assert sample(bucket, {"cmd": "read", "le": "5e-05"}) == 1
    assert sample(bucket, {"cmd": "read", "le": "1.0"}) == 1
    assert sample(bucket, {"cmd": "read", "le": "+Inf"}) == 2
    assert sample("client_nbd_request_duration_seconds_sum", {"cmd": "read"}) == pytest.approx(
        2.00003
    )
    assert sample("client_nbd_bytes_read_total") == 4096
    assert sample("client_nbd_malformed_requests_total", {"reason": "bad_request_magic"}) == 1
    assert DURATION_BUCKETS[0] < 1e-3  # sub-millisecond resolution
    text = generate_latest(registry).decode()
    assert "# TYPE client_nbd_request_duration_seconds histogram" in text
    assert "# TYPE client_nbd_inflight_requests gauge" in text


async def test_memory_backend_read_write_zero_trim() -> None:
    backend = MemoryBackend(16 * PAGE_SIZE)
    assert backend.size() == 16 * PAGE_SIZE
    assert await backend.pread(0, 10) == bytes(10)
    payload = bytearray(b"x" * (3 * PAGE_SIZE))
    await backend.pwrite(100, memoryview(payload), False)
    payload[:] = b"y" * len(payload)  # the caller may reuse its buffer at once
    data = await backend.pread(100, 3 * PAGE_SIZE)
    assert data == b"x" * (3 * PAGE_SIZE)
    payload[:] = b"z" * len(payload)
    await backend.pwrite(100, memoryview(payload), True)
    assert data == b"x" * (3 * PAGE_SIZE)  # a read's result never changes afterwards
    await backend.zero(150, 2 * PAGE_SIZE, may_trim=True)
    assert await backend.pread(100, 50) == b"z" * 50
    assert await backend.pread(150, 2 * PAGE_SIZE) == bytes(2 * PAGE_SIZE)
    await backend.zero(3 * PAGE_SIZE, 10, may_trim=False)
    assert await backend.pread(3 * PAGE_SIZE - 1, 12) == b"z" + bytes(10) + b"z"
    await backend.trim(0, 16 * PAGE_SIZE)  # a hint; contents undefined afterwards
    await backend.flush()
    await backend.close()


def test_memory_backend_is_eager_and_never_suspends() -> None:
    backend = MemoryBackend(PAGE_SIZE)
    assert backend.eager and backend.can_fast_zero
    coro = backend.pread(0, 1)
    with pytest.raises(StopIteration):
        coro.send(None)
    asyncio.run(backend.close())


class FakeLibc:
    """Stands in for libc: records calls, succeeds or fails as told (never locks pytest)."""

    def __init__(self, result: int) -> None:
        self.result = result
        self.calls: list[tuple[str, tuple[int, ...]]] = []

    def mlockall(self, flags: int) -> int:
        self.calls.append(("mlockall", (flags,)))
        return self.result

    def prctl(self, *args: int) -> int:
        self.calls.append(("prctl", args))
        return self.result


def test_memlock_locks_lazily_and_sets_io_flusher(monkeypatch: pytest.MonkeyPatch) -> None:
    log = logging.getLogger("test.memlock")
    monkeypatch.setattr(memlock.resource, "getrlimit", lambda _: (-1, -1))
    libc = FakeLibc(0)
    assert memlock.lock_all_memory(libc, log) is True  # type: ignore[arg-type]
    assert memlock.set_io_flusher(libc, log) is True  # type: ignore[arg-type]
    flags = memlock.MCL_CURRENT | memlock.MCL_FUTURE | memlock.MCL_ONFAULT
    assert libc.calls == [("mlockall", (flags,)), ("prctl", (57, 1, 0, 0, 0))]


def test_memlock_logs_instead_of_failing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("test.memlock")
    # no CAP_IPC_LOCK and a finite RLIMIT_MEMLOCK: locking is skipped, not attempted
    monkeypatch.setattr(memlock.resource, "getrlimit", lambda _: (8 << 20, 8 << 20))
    monkeypatch.setattr(memlock, "_has_capability", lambda bit: False)
    libc = FakeLibc(-1)
    with caplog.at_level(logging.WARNING):
        assert memlock.lock_all_memory(libc, log) is False  # type: ignore[arg-type]
        assert memlock.set_io_flusher(libc, log) is False  # type: ignore[arg-type]
        assert memlock.protect_from_oom(log, tmp_path / "missing" / "oom_score_adj") is False
    assert [name for name, _ in libc.calls] == ["prctl"]
    assert "memory not locked" in caplog.text and "oom_score_adj" in caplog.text
    target = tmp_path / "oom_score_adj"
    assert memlock.protect_from_oom(log, target) is True
    assert target.read_text() == "-1000\n"
