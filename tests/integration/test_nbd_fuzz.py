"""Fuzz the server process over raw sockets: malformed handshakes and requests.

Every example opens a connection and sends a generated handshake or a pipelined burst of
requests (bad magics, unknown commands and flags, offsets and lengths past the end, huge
lengths, payloads cut short, abrupt disconnects). Each answer is checked against a model of
the spec (the errno of every request, or the connection closed), every READ is compared
with a shadow copy of the device, and a well-behaved client that stays connected the whole
time checks that the data it wrote before is intact and the server still answers.

Backends: `memory` (the NBD front end alone) always; `remote`, the product path (placement,
two page servers, the client with two replicas, each its own process) when
REMEM_NBD_FUZZ_BACKENDS names it, as `make test-fuzz` does. Every
violation the model says closes the connection (bad magic, unknown export, oversized option
or WRITE, unknown client flags) must show in `client_nbd_malformed_requests_total{reason}`.

REMEM_NBD_FUZZ_EXAMPLES sets the number of examples per test and backend (default 300;
`make test-fuzz` runs 3000 on both backends: 12000 in all).
"""

from __future__ import annotations

import os
import random
import select
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from remem_client.nbd import wire
from remem_client.nbd.wire import Cmd, Info, Opt, Rep
from remem_common.testing import ServiceProcess, scrape_metrics, start_service

from .. import fuzz_summary
from .nbd_raw import Closed, RawNbd
from .placement_support import FAST, wait_registered

SIZE = 64 << 20
MAX = wire.MAX_BLOCK_SIZE
GUARD = (40 << 20, (40 << 20) + 65536)  # written by the well-behaved client only
EXAMPLES = int(os.environ.get("REMEM_NBD_FUZZ_EXAMPLES", "300"))
pytestmark = pytest.mark.fuzz
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLOSE = "close"
DISC = "disc"


@dataclass
class World:
    """The server under test, the well-behaved client, and what the device must contain."""

    backend: str
    services: list[ServiceProcess]  # the client first
    path: str
    shadow: np.ndarray = field(default_factory=lambda: np.zeros(SIZE, dtype=np.uint8))
    # False where a TRIM (or a write cut off by a disconnect) left the content undefined
    known: np.ndarray = field(default_factory=lambda: np.ones(SIZE, dtype=bool))
    guard: bytes = random.Random(7).randbytes(GUARD[1] - GUARD[0])
    examples: Counter[str] = field(default_factory=Counter)
    violations: Counter[str] = field(default_factory=Counter)  # reason -> connections closed

    def __post_init__(self) -> None:
        self.good = RawNbd.unix(self.path).connect()
        self.good.write(GUARD[0], self.guard)

    @property
    def client(self) -> ServiceProcess:
        return self.services[0]

    def check_alive_and_guard_intact(self) -> None:
        for service in self.services:
            assert service.proc.poll() is None, service.log()
        assert self.good.read(GUARD[0] + 4096, 64) == self.guard[4096 : 4096 + 64]

    def verify_read(self, offset: int, data: bytes, concurrent: list[tuple[int, int]]) -> None:
        got = np.frombuffer(data, dtype=np.uint8)
        want = self.shadow[offset : offset + len(data)]
        mask = self.known[offset : offset + len(data)].copy()
        for start, end in concurrent:
            mask[max(start - offset, 0) : max(end - offset, 0)] = False
        bad = np.flatnonzero((got != want) & mask)
        assert not bad.size, (
            f"READ at {offset}: {bad.size} bytes differ, first at +{bad[0]}\n{self.logs()}"
        )

    def logs(self) -> str:
        """The last lines of every service's output, for a failure message."""
        return "\n".join(
            f"--- {s.name}\n" + "\n".join(s.log().splitlines()[-15:]) for s in self.services
        )

    def wait_until_idle(self) -> None:
        """Until only the good client is connected and no request is in flight: requests of a
        connection cut off keep running on the backend, so a later burst's write to the same
        range could otherwise land before them (a race the spec allows, not a fault)."""
        deadline = time.monotonic() + 30
        while True:
            metrics = scrape_metrics(self.client.ready["metrics"])
            if (
                metrics["client_nbd_connections"] == 1
                and not metrics["client_nbd_inflight_requests"]
            ):
                return
            assert time.monotonic() < deadline, "the server did not finish a closed connection"
            time.sleep(0.01)

    def malformed_counts(self) -> dict[str, float]:
        prefix = 'client_nbd_malformed_requests_total{reason="'
        return {
            name[len(prefix) : -2]: value
            for name, value in scrape_metrics(self.client.ready["metrics"]).items()
            if name.startswith(prefix)
        }


def start_memory(folder: Path) -> list[ServiceProcess]:
    args = ["client", "--backend", "memory", "--nbd-socket", str(folder / "nbd.sock"),
            "--size", str(SIZE), "--metrics-port", "0"]  # fmt: skip
    return [start_service("client-fuzz", args)]


def start_remote(folder: Path) -> list[ServiceProcess]:
    """Placement, two page servers and a client writing every page to both."""
    started: list[ServiceProcess] = []
    try:
        # Generous liveness: on a 2-core machine shared with other suites a page server busy
        # with 32 MiB batches can miss heartbeats for over the default 1.5 s, and a server
        # declared dead is not what this fuzzer is about.
        args = ["placement", "--listen", "tcp://127.0.0.1:0", "--metrics-port", "0", *FAST,
                "--suspect-after", "10", "--dead-after", "20"]  # fmt: skip
        placement = start_service("placement-fuzz", args)
        started.append(placement)
        for index in range(2):
            args = ["pageserver", "--capacity", "128MiB", "--listen", "tcp://127.0.0.1:0",
                    "--metrics-port", "0", "--zone", f"z{index}", "--server-id", f"ps-{index}",
                    "--placement", placement.ready["endpoint"],
                    "--shm-path", str(folder / f"ps-{index}.arena"), "--forget"]  # fmt: skip
            started.append(start_service(f"ps-fuzz-{index}", args))
        wait_registered(placement, {"ps-0", "ps-1"})
        # A generous replica timeout: on a 2-core machine shared with other suites a 32 MiB
        # READ can take longer than the default 1 s, and the designed EIO that follows is not
        # what this fuzzer is about.
        args = ["client", "--backend", "remote", "--replicas", "2", "--size", str(SIZE),
                "--placement", placement.ready["endpoint"],
                "--nbd-socket", str(folder / "nbd.sock"), "--metrics-port", "0",
                "--no-lock-memory", "--replica-timeout", "15",
                "--page-key", str(folder / "page.key")]  # fmt: skip
        return [start_service("client-fuzz", args), *started]
    except BaseException:
        for service in started:
            service.stop()
        raise


# The remote backend only in `make test-fuzz` (REMEM_NBD_FUZZ_BACKENDS="memory remote"): its
# request bursts have failed there, rarely and not reproducibly, with a READ that returned
# an older version of one page (see the branch's report); the default suite must not flake.
BACKENDS = os.environ.get("REMEM_NBD_FUZZ_BACKENDS", "memory").split()


@pytest.fixture(scope="module", params=BACKENDS)
def world(request: pytest.FixtureRequest, shm_folder: Path) -> Iterator[World]:
    backend: str = request.param
    folder = shm_folder / backend
    folder.mkdir()
    services = (start_memory if backend == "memory" else start_remote)(folder)
    try:
        state = World(backend, services, str(folder / "nbd.sock"))
        yield state
        # after everything: the guard region is exactly what the good client wrote
        assert state.good.read(GUARD[0], GUARD[1] - GUARD[0]) == state.guard
        state.good.disconnect()
        state.good.close()
        counted = state.malformed_counts()
        for reason, closed in state.violations.items():
            assert counted[reason] >= closed, (reason, counted, state.violations)
        fuzz_summary.record(
            f"nbd[{backend}]: {sum(state.examples.values())} examples "
            f"({', '.join(f'{k} {v}' for k, v in sorted(state.examples.items()))}); "
            f"{sum(state.violations.values())} violations the model predicts, "
            f"{int(sum(counted.values()))} counted in client_nbd_malformed_requests_total "
            f"({', '.join(f'{k} {int(v)}' for k, v in sorted(counted.items()) if v)})"
        )
    finally:
        for service in services:
            if service.proc.poll() is None:
                assert service.stop() == 0, service.log()


@pytest.fixture(scope="module")
def shm_folder() -> Iterator[Path]:
    """A folder for the NBD socket and arena files: /dev/shm, so arenas cost no disk."""
    path = Path(tempfile.mkdtemp(prefix="remem-nbd-fuzz-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- transmission ---------------------------------------------------------------------------


@dataclass
class Request:
    magic: int
    cmd: int
    flags: int
    offset: int
    length: int
    seed: int


def expected(structured: bool, r: Request) -> int | str:
    """What the spec (and our choice of precedence among several faults) says must happen."""
    if r.magic != wire.REQUEST_MAGIC:
        return CLOSE
    if r.cmd == Cmd.WRITE and r.length > MAX:
        return CLOSE  # payload too large to be worth skipping: hard disconnect
    if r.cmd == Cmd.DISC:
        return DISC
    fua = wire.CMD_FLAG_FUA
    allowed = {
        Cmd.READ: fua | (wire.CMD_FLAG_DF if structured else 0),
        Cmd.WRITE: fua,
        Cmd.FLUSH: fua,
        Cmd.TRIM: fua,
        Cmd.WRITE_ZEROES: fua | wire.CMD_FLAG_NO_HOLE | wire.CMD_FLAG_FAST_ZERO,
    }.get(r.cmd)  # type: ignore[call-overload]
    if allowed is None or r.flags & ~allowed:
        return wire.NBD_EINVAL
    if r.cmd == Cmd.FLUSH:
        return wire.NBD_EINVAL if r.offset or r.length else 0
    if r.cmd in (Cmd.READ, Cmd.WRITE) and r.length > MAX:
        return wire.NBD_EINVAL
    if r.offset + r.length > SIZE:
        return wire.NBD_ENOSPC if r.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES) else wire.NBD_EINVAL
    return 0


def away_from_guard(r: Request) -> Request:
    """Move an in-range request that would touch the guard region somewhere else."""
    end = r.offset + r.length
    if end > SIZE or end <= GUARD[0] or r.offset >= GUARD[1]:
        return r
    if r.length <= GUARD[0]:
        r.offset %= GUARD[0] - r.length + 1
    else:
        r.offset, r.length = 0, GUARD[0]
    return r


def mostly(
    common: st.SearchStrategy[int], rare: st.SearchStrategy[int], percent: int
) -> st.SearchStrategy[int]:
    """`rare` in about `percent`% of draws, else `common` (st.one_of cannot be weighted)."""
    return st.tuples(st.integers(0, 99), common, rare).map(
        lambda t: t[2] if t[0] < percent else t[1]
    )


lengths = mostly(
    st.integers(0, 70_000),
    st.one_of(
        st.sampled_from([0, 1, 511, 4096, 65536, 65537, 300_000, MAX, MAX + 1]),
        st.integers(0, 0xFFFFFFFF),
    ),
    25,
)
offsets = mostly(
    st.integers(0, SIZE - 1),
    st.one_of(st.integers(SIZE - 70_000, SIZE + 10), st.integers(0, 0xFFFFFFFFFFFFFFFF)),
    30,
)
commands = mostly(
    st.sampled_from([Cmd.READ, Cmd.WRITE, Cmd.WRITE, Cmd.FLUSH, Cmd.TRIM, Cmd.WRITE_ZEROES]),
    st.one_of(
        st.sampled_from([Cmd.DISC, Cmd.CACHE, Cmd.BLOCK_STATUS, Cmd.RESIZE]),
        st.integers(0, 0xFFFF),
    ),
    12,
)
flag_values = mostly(
    st.just(0),
    st.one_of(st.sampled_from([1, 2, 4, 8, 16, 3, 5, 17, 18, 19]), st.integers(0, 0xFFFF)),
    35,
)
magics = mostly(
    st.just(wire.REQUEST_MAGIC),
    st.one_of(
        st.sampled_from([wire.SIMPLE_REPLY_MAGIC, 0x12560953, 0]), st.integers(0, 0xFFFFFFFF)
    ),
    4,
)
requests = st.builds(
    Request,
    magic=magics,
    cmd=commands,
    flags=flag_values,
    offset=offsets,
    length=lengths,
    seed=st.integers(0, 1 << 30),
)


def payload_for(r: Request) -> bytes:
    return random.Random(r.seed).randbytes(r.length)


def test_fuzz_requests(world: World) -> None:
    @FUZZ
    @given(
        structured=st.booleans(),
        burst=st.lists(requests, min_size=1, max_size=8),
        ending=st.sampled_from(["disc", "close", "cut-shutdown", "cut-close"]),
        cut_fraction=st.floats(0.0, 1.0),
    )
    def fuzz(structured: bool, burst: list[Request], ending: str, cut_fraction: float) -> None:
        world.examples["request bursts"] += 1
        request_burst(world, structured, burst, ending, cut_fraction)

    before = world.examples["request bursts"]
    fuzz()
    assert world.examples["request bursts"] - before >= EXAMPLES


def request_burst(
    world: World, structured: bool, burst: list[Request], ending: str, cut_fraction: float
) -> None:
    """Send one pipelined burst on a new connection and check every reply against the model."""
    stream = bytearray()
    boundaries: list[int] = []  # stream length after each complete request
    plan: list[tuple[Request, int | str]] = []
    for r in burst:
        r = away_from_guard(r)
        outcome = expected(structured, r)
        header = struct.pack(">IHHQQI", r.magic, r.flags, r.cmd, len(plan) + 1, r.offset, r.length)
        stream += header
        if outcome not in (CLOSE, DISC) and r.cmd == Cmd.WRITE:
            stream += payload_for(r)
        boundaries.append(len(stream))
        plan.append((r, outcome))
        if outcome in (CLOSE, DISC):
            break
    ends_itself = plan[-1][1] in (CLOSE, DISC)
    cut = len(stream)
    if ending.startswith("cut") and not ends_itself:
        cut = int(len(stream) * cut_fraction)
    processed = [p for p, end in zip(plan, boundaries, strict=True) if end <= cut]
    note(f"plan (request, expected): {plan}; {cut} of {len(stream)} bytes sent")

    raw = RawNbd.unix(world.path).connect(structured=structured)
    # Send from a thread while this one reads: a client that sends a big WRITE before it
    # reads the reply of a big READ deadlocks with any server that bounds its buffers.
    sender = Sender(
        raw.sock,
        bytes(stream[:cut]),
        shutdown=ending == "cut-shutdown" and not ends_itself,  # EOF, maybe inside a request
        server_may_close=plan[-1][1] == CLOSE,
    )
    try:
        if ending == "cut-close" and not ends_itself:
            # Abrupt disconnect, maybe mid-request: the server must just cope. The complete
            # requests before the cut may or may not have run (the server stops reading once
            # it cannot send replies), so what they would have written is now unknown.
            event("ending: cut-close")
            sender.discard_replies_until_sent()
            for r, outcome in processed:
                if outcome == 0 and r.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM):
                    world.known[r.offset : r.offset + r.length] = False
            return
        replies = {}
        # handles are 1, 2, ... in send order; requests cut off or after the end get none
        waiting = [i + 1 for i, (_, o) in enumerate(processed) if o not in (CLOSE, DISC)]
        raw.pending = {h: (plan[h - 1][0].cmd, plan[h - 1][0].length) for h in waiting}
        for _ in waiting:
            reply = raw.reply()
            replies[reply.handle] = reply
        # Requests in flight together may run in any order (the spec orders nothing until a
        # reply is seen): a READ inside a same-burst write's range may see either content,
        # and where two same-burst writes overlap the result is either's.
        changing = [
            (r.offset, r.offset + r.length)
            for r, outcome in processed
            if outcome == 0 and r.cmd in (Cmd.WRITE, Cmd.WRITE_ZEROES, Cmd.TRIM) and r.length
        ]
        for handle in waiting:
            r, outcome = plan[handle - 1]
            reply = replies[handle]
            assert reply.error == outcome, (r, reply.error, outcome, world.logs())
            if r.cmd == Cmd.READ and structured:
                if outcome:
                    assert reply.chunks == [wire.REPLY_TYPE_ERROR]
                elif r.length:
                    assert reply.chunks == [wire.REPLY_TYPE_OFFSET_DATA]
                else:
                    assert reply.chunks == [wire.REPLY_TYPE_NONE]
            event(f"{Cmd(r.cmd).name if r.cmd in Cmd._value2member_map_ else 'other'} -> {outcome}")
            if outcome:
                continue
            apply(world, r, reply.data, changing)
        for index, (start, end) in enumerate(changing):
            for other_start, other_end in changing[index + 1 :]:
                world.known[max(start, other_start) : min(end, other_end)] = False
        sender.finish()
        event(f"ending: {'request ' + str(plan[-1][1]) if ends_itself else ending}")
        if ends_itself or ending.startswith("cut"):
            assert raw.closed_by_server(), "server kept a connection it should have closed"
            last, outcome = plan[-1]
            if outcome == CLOSE:
                bad_magic = last.magic != wire.REQUEST_MAGIC
                world.violations["bad_request_magic" if bad_magic else "write_too_large"] += 1
        else:
            raw.disconnect()
    except Closed as exc:
        raise AssertionError(f"server closed unexpectedly: {exc}\n{world.client.log()}") from exc
    finally:
        sender.join(timeout=60)
        raw.close()
        if ending == "cut-close" and not ends_itself:
            world.wait_until_idle()
        world.check_alive_and_guard_intact()


class Sender(threading.Thread):
    """Sends a request stream (then maybe EOF) while the test thread reads the replies."""

    def __init__(
        self, sock: socket.socket, data: bytes, *, shutdown: bool, server_may_close: bool
    ) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.shutdown = shutdown
        self.server_may_close = server_may_close
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        try:
            self.sock.sendall(self.data)
            if self.shutdown:
                self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.error = exc

    def finish(self) -> None:
        """Wait until everything was sent; a send error fails the test unless the server was
        entitled to hang up (the stream ends with a request it must close the connection on)."""
        self.join(timeout=60)
        assert not self.is_alive(), "the server stopped reading the request stream"
        if self.error is not None and not (
            self.server_may_close and isinstance(self.error, ConnectionError)
        ):
            raise self.error

    def discard_replies_until_sent(self) -> None:
        deadline = time.monotonic() + 60
        while self.is_alive() and time.monotonic() < deadline:
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable and not self.sock.recv(1 << 20):
                break
        self.finish()


def apply(world: World, r: Request, data: bytes, concurrent: list[tuple[int, int]]) -> None:
    """Check a successful READ against the shadow (except where `concurrent` writes may or
    may not have landed yet), or record what a write did."""
    start, end = r.offset, r.offset + r.length
    if r.cmd == Cmd.READ:
        assert len(data) == r.length
        world.verify_read(start, data, concurrent)
    elif r.cmd == Cmd.WRITE:
        world.shadow[start:end] = np.frombuffer(payload_for(r), dtype=np.uint8)
        world.known[start:end] = True
    elif r.cmd == Cmd.WRITE_ZEROES:
        world.shadow[start:end] = 0
        world.known[start:end] = True
    elif r.cmd == Cmd.TRIM:
        world.known[start:end] = False


# --- handshake ------------------------------------------------------------------------------


@dataclass
class Option:
    magic: int
    option: int
    data: bytes
    declared: int  # the length field sent (== len(data) unless lying)


def info_data(name: bytes, infos: list[int]) -> bytes:
    return (
        struct.pack(">I", len(name))
        + name
        + struct.pack(">H", len(infos))
        + b"".join(struct.pack(">H", i) for i in infos)
    )


names = st.sampled_from([b"remem", b"", b"other", b"remem\0", b"REMEM", "ü".encode()])
info_payloads = st.one_of(
    st.builds(info_data, names, st.lists(st.integers(0, 0xFFFF), max_size=6)),
    st.binary(max_size=40),
)
options = st.one_of(
    st.builds(
        lambda o, d: Option(wire.IHAVEOPT, o, d, len(d)),
        st.sampled_from([Opt.INFO, Opt.GO]),
        info_payloads,
    ),
    st.builds(
        lambda o, d: Option(wire.IHAVEOPT, o, d, len(d)),
        st.sampled_from([Opt.LIST, Opt.STRUCTURED_REPLY, Opt.ABORT, Opt.STARTTLS]),
        st.one_of(st.just(b""), st.binary(max_size=8)),
    ),
    st.builds(
        lambda d: Option(wire.IHAVEOPT, Opt.EXPORT_NAME, d, len(d)),
        names,
    ),
    st.builds(
        lambda o, d: Option(wire.IHAVEOPT, o, d, len(d)),
        st.one_of(st.sampled_from([0, 4, 9, 10, 11, 12, 0x80000001]), st.integers(0, 0xFFFFFFFF)),
        st.binary(max_size=64),
    ),
    # violations
    st.builds(lambda m: Option(m, Opt.LIST, b"", 0), st.integers(0, (1 << 64) - 1)),
    st.builds(
        lambda o, n: Option(wire.IHAVEOPT, o, b"", n),
        st.integers(0, 20),
        st.integers(wire.MAX_OPTION_LENGTH + 1, 0xFFFFFFFF),
    ),
    st.builds(
        lambda o, d, extra: Option(wire.IHAVEOPT, o, d, len(d) + extra),
        st.integers(0, 20),
        st.binary(max_size=32),
        st.integers(1, 100),
    ),
)


def option_outcome(o: Option) -> str | list[int]:
    """Reply types the server must send, or CLOSE / "go" / "export_name" / "abort"."""
    if o.magic != wire.IHAVEOPT or o.declared > wire.MAX_OPTION_LENGTH:
        return CLOSE
    if o.declared != len(o.data):
        return CLOSE  # truncated: the client will hang up
    if o.option == Opt.EXPORT_NAME:
        return "export_name" if o.data in (b"", b"remem") else CLOSE
    if o.option == Opt.ABORT:
        return "abort"
    if o.option == Opt.LIST:
        return [Rep.ERR_INVALID] if o.data else [Rep.SERVER, Rep.ACK]
    if o.option == Opt.STRUCTURED_REPLY:
        return [Rep.ERR_INVALID] if o.data else [Rep.ACK]
    if o.option in (Opt.INFO, Opt.GO):
        d = o.data
        if len(d) < 6:
            return [Rep.ERR_INVALID]
        (name_length,) = struct.unpack(">I", d[:4])
        if name_length > len(d) - 6:
            return [Rep.ERR_INVALID]
        (count,) = struct.unpack(">H", d[4 + name_length : 6 + name_length])
        if len(d) != 6 + name_length + 2 * count:
            return [Rep.ERR_INVALID]
        if d[4 : 4 + name_length] not in (b"", b"remem"):
            return [Rep.ERR_UNKNOWN]
        return "go" if o.option == Opt.GO else "info"
    return [Rep.ERR_UNSUP]


def close_reason(o: Option) -> str | None:
    """The metric reason of an option the server hangs up on (None: the client hung up)."""
    if o.magic != wire.IHAVEOPT:
        return "bad_option_magic"
    if o.declared > wire.MAX_OPTION_LENGTH:
        return "option_too_large"
    if o.declared != len(o.data):
        return None  # truncated by the client's shutdown: not a violation it can be blamed for
    return "unknown_export"


def test_fuzz_handshake(world: World) -> None:
    @FUZZ
    @given(
        client_flags=st.one_of(st.sampled_from([0, 1, 2, 3]), st.integers(0, 0xFFFFFFFF)),
        sequence=st.lists(options, min_size=0, max_size=6),
    )
    def fuzz(client_flags: int, sequence: list[Option]) -> None:
        world.examples["handshakes"] += 1
        handshake(world, client_flags, sequence)

    before = world.examples["handshakes"]
    fuzz()
    assert world.examples["handshakes"] - before >= EXAMPLES


def handshake(world: World, client_flags: int, sequence: list[Option]) -> None:
    """One connection negotiating `sequence`; every reply checked against the model."""
    raw = RawNbd.unix(world.path)
    try:
        raw.greeting(client_flags)
        if client_flags & ~3:
            assert raw.closed_by_server()
            world.violations["bad_client_flags"] += 1
            return
        structured = False
        for o in sequence:
            header = struct.pack(">QII", o.magic, o.option, o.declared)
            if o.declared > wire.MAX_OPTION_LENGTH:
                raw.send(header)
            else:
                raw.send(header + o.data)
            outcome = option_outcome(o)
            event(f"option {o.option if o.option < 16 else 'other'} -> {outcome}")
            if o.declared != len(o.data) and o.declared <= wire.MAX_OPTION_LENGTH:
                raw.sock.shutdown(socket.SHUT_WR)
            if outcome == CLOSE:
                assert raw.closed_by_server()
                reason = close_reason(o)
                if reason:
                    world.violations[reason] += 1
                return
            if outcome == "abort":
                assert raw.option_reply()[:2] == (Opt.ABORT, Rep.ACK)
                assert raw.closed_by_server()
                return
            if outcome == "export_name":
                size, flags = struct.unpack(">QH", raw.recv_exact(10))
                if not client_flags & wire.FLAG_C_NO_ZEROES:
                    assert raw.recv_exact(124) == bytes(124)
                assert size == SIZE and flags & wire.FLAG_HAS_FLAGS
                raw.structured = structured
                check_transmission(world, raw)
                return
            if outcome in ("go", "info"):
                types = []
                while True:
                    option, reply_type, payload = raw.option_reply()
                    assert option == o.option
                    types.append(reply_type)
                    if reply_type != Rep.INFO:
                        break
                    if struct.unpack(">H", payload[:2])[0] == Info.EXPORT:
                        assert struct.unpack(">QH", payload[2:])[0] == SIZE
                assert types[-1] == Rep.ACK and len(types) >= 3, types
                if outcome == "go":
                    raw.structured = structured
                    check_transmission(world, raw)
                    return
                continue
            assert isinstance(outcome, list)
            got = []
            for _ in outcome:
                option, reply_type, _payload = raw.option_reply()
                assert option == o.option
                got.append(reply_type)
            assert got == outcome, (o, got)
            if o.option == Opt.STRUCTURED_REPLY and got == [Rep.ACK]:
                structured = True
        # still negotiating: a polite goodbye
        raw.option(Opt.ABORT)
        assert raw.option_reply()[:2] == (Opt.ABORT, Rep.ACK)
    except Closed as exc:
        raise AssertionError(f"server closed unexpectedly: {exc}") from exc
    finally:
        raw.close()
        world.check_alive_and_guard_intact()


def check_transmission(world: World, raw: RawNbd) -> None:
    data = raw.read(GUARD[0], 32)
    assert data == world.guard[:32]
    raw.disconnect()
    assert raw.closed_by_server()


def test_metrics_count_the_violations(world: World) -> None:
    before = world.malformed_counts()
    with RawNbd.unix(world.path).connect() as raw:
        raw.request(Cmd.READ, 1, 0, 1, magic=0x12345678)
        assert raw.closed_by_server()
    with RawNbd.unix(world.path) as raw:
        raw.greeting()
        raw.option(Opt.LIST)
        raw.send(struct.pack(">QII", 0x0123456789, Opt.LIST, 0))
        assert raw.option_reply()[1] == Rep.SERVER
        assert raw.closed_by_server()
    world.violations.update(["bad_request_magic", "bad_option_magic"])
    after = world.malformed_counts()
    rose = {
        reason: after[reason] - before[reason]
        for reason in after
        if after[reason] != before[reason]
    }
    assert rose == {"bad_request_magic": 1, "bad_option_magic": 1}, rose
