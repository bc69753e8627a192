"""Benchmark the NBD front end against `nbdkit memory` with fio's nbd engine.

    python -m remem_client.bench_nbd [--runtime 3] [--rounds 3] [--event-loop auto]
                                     [--target memory|cluster|mirror|encryption]

Starts `nbdkit memory` and, with `--target memory`, `remem client --backend memory` (the NBD
front end alone) or, with `--target cluster`, `remem up` (the whole system: placement, three
page servers, two replicas of every page) side by side on Unix sockets,
fills the tested region of both once (so reads copy real data and first-touch page faults
are out of the way), then runs each fio workload against both, alternating which server
goes first in each round to cancel drift on a noisy machine, and reports the mean of the
rounds: IOPS, MB/s, mean completion latency, server CPU per request, and remem/nbdkit.
The last line is one JSON object with every figure. The pieces (`start_nbdkit`,
`start_remem`, `running`, `fill`, `compare`) are also the plumbing of `make bench`
(tests/bench), which runs more servers side by side.

Workloads: 4 KiB random read and write at queue depth 1 and 32, 1 MiB sequential read and
write at queue depth 8 (time-based, `--runtime` seconds each).

`--target mirror` measures what the local mirror costs: the baseline is then `remem up
--no-mirror` instead of nbdkit, against `remem up` with its mirror, on the write workloads
(a read never touches the mirror while the replicas answer).

`--target encryption` measures what page encryption costs: the baseline is `remem up
--no-encrypt-pages` against `remem up` (AES-256-GCM of every page), on every workload. It
first times the client's sealing alone, in this process: CPU microseconds per page to seal
(write path) and to open (read path) in batches of 1, 32 and 256 pages, best of several
runs, a figure a busy machine disturbs far less than the fio ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

Workload = tuple[str, str, int]  # fio rw, block size, queue depth

WRITE_WORKLOADS: tuple[Workload, ...] = (
    ("randwrite", "4k", 1),
    ("randwrite", "4k", 32),
    ("write", "1m", 8),
)
WORKLOADS: tuple[Workload, ...] = (
    ("randread", "4k", 1),
    ("randwrite", "4k", 1),
    ("randread", "4k", 32),
    ("randwrite", "4k", 32),
    ("read", "1m", 8),
    ("write", "1m", 8),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Reads in a mixed workload (fio's randrw/rw), percent: a swap device's page-ins dominate.
MIX_READ_PERCENT = 70


@dataclass
class Result:
    """Mean figures of one workload against one server (p50/p99 are means of the rounds'
    percentiles, max the worst single request of any round)."""

    iops: float
    mbps: float
    clat_us: float
    cpu_us_per_op: float
    p50_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0


def workload_name(workload: Workload) -> str:
    """`randread 4k qd32`; a mixed workload also names its read share (`randrw70 4k qd8`)."""
    rw, bs, depth = workload
    if rw in ("randrw", "rw"):
        rw += str(MIX_READ_PERCENT)
    return f"{rw} {bs} qd{depth}"


@dataclass
class Server:
    name: str
    uri: str
    proc: subprocess.Popen[str]
    # Where `remem up` lists its children's pids: their CPU time is the cluster's.
    pid_dir: Path | None = None

    def cpu_seconds(self) -> float:
        if self.pid_dir is None:
            return cpu_seconds(self.proc.pid)
        return sum(cpu_seconds(int(p.read_text())) for p in self.pid_dir.glob("*.pid"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def wait_for_socket(path: Path, proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Poll until a Unix socket accepts connections (nbdkit prints no ready line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                time.sleep(0.05)
    raise RuntimeError(f"{path} not ready after {timeout}s")


def start_nbdkit(directory: Path, size: str) -> Server:
    path = directory / "nbdkit.sock"
    proc = subprocess.Popen(
        ["nbdkit", "--foreground", "--unix", str(path), "memory", size],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_for_socket(path, proc)
    return Server("nbdkit", f"nbd+unix:///?socket={path}", proc)


def start_remem(
    directory: Path,
    size: str,
    extra: list[str],
    target: str,
    name: str = "remem",
    up_args: Sequence[str] = (),
) -> Server:
    """`remem client --backend memory` (target memory, with `extra`) or `remem up` (the
    cluster targets, with `up_args`, e.g. `--replicas 1`) on DIRECTORY/NAME.sock."""
    path = directory / f"{name}.sock"
    if size[-1:] in ("K", "M", "G", "T"):
        size += "iB"  # nbdkit's 1G is 2**30 bytes; remem reads 1G as 10**9
    pid_dir = None
    if target in ("cluster", "cluster-no-mirror", "cluster-plaintext"):
        state = directory / name
        pid_dir = state / "pids"
        args = [
            sys.executable, "-m", "remem_cli", "up", "--state-dir", str(state), "--size", size,
            "--nbd-socket", str(path), "--forget",
        ]  # fmt: skip
        if target == "cluster-no-mirror":
            args.append("--no-mirror")
        if target == "cluster-plaintext":
            args.append("--no-encrypt-pages")
        args += up_args
        stream = "stdout"
    else:
        args = [
            sys.executable, "-m", "remem_client", "--backend", "memory", "--nbd-socket",
            str(path), "--size", size, "--metrics-port", "0", *extra,
        ]  # fmt: skip
        stream = "stderr"
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL,
        text=True,
    )
    output = proc.stdout if stream == "stdout" else proc.stderr
    assert output is not None
    uri = ""
    for line in output:
        if " ready " in f" {line.split(': ', 1)[-1]}":
            uri = line.split("nbd_uri=", 1)[1].split()[0]
            break
    if not uri:
        raise RuntimeError(f"remem exited with {proc.wait()}")
    # keep draining its log so it never blocks on a full pipe
    threading.Thread(target=_drain, args=(output,), daemon=True).start()
    return Server(name, uri, proc, pid_dir)


def _drain(stream: IO[str]) -> None:
    for _line in stream:
        pass


@contextmanager
def running(starters: Sequence[Callable[[Path], Server]]) -> Iterator[list[Server]]:
    """Start each server in one temporary folder; SIGTERM them all on the way out (SIGKILL
    after 60 s), also when a later one fails to start."""
    with tempfile.TemporaryDirectory(prefix="remem-bench-") as tmp:
        started: list[Server] = []
        try:
            for start in starters:
                started.append(start(Path(tmp)))
            yield started
        finally:
            for server in started:
                if server.proc.poll() is None:
                    server.proc.send_signal(signal.SIGTERM)
            for server in started:
                try:
                    server.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()


@contextmanager
def servers(size: str, extra: list[str], target: str) -> Iterator[tuple[Server, Server]]:
    starters: list[Callable[[Path], Server]]
    if target == "mirror":
        starters = [
            lambda d: start_remem(d, size, extra, "cluster-no-mirror", "no-mirror"),
            lambda d: start_remem(d, size, extra, "cluster"),
        ]
    elif target == "encryption":
        starters = [
            lambda d: start_remem(d, size, extra, "cluster-plaintext", "plaintext"),
            lambda d: start_remem(d, size, extra, "cluster"),
        ]
    else:
        starters = [
            lambda d: start_nbdkit(d, size),
            lambda d: start_remem(d, size, extra, target),
        ]
    with running(starters) as started:
        yield started[0], started[1]


def fio(uri: str, rw: str, bs: str, depth: int, region: str, runtime: float) -> dict[str, float]:
    """Run one fio job; returns iops, bytes/s, ops, and completion latency in us: mean,
    p50, p99, max (reads and writes together: a mixed job reads MIX_READ_PERCENT%)."""
    args = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={depth}", f"--size={region}", "--time_based", f"--runtime={runtime}",
        "--output-format=json", "--verify_state_save=0", "--unified_rw_reporting=mixed",
        f"--rwmixread={MIX_READ_PERCENT}",
    ]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    if job["error"]:
        raise RuntimeError(f"fio reported error {job['error']} against {uri}")
    side = job["mixed"]
    clat = side["clat_ns"]
    percentile = clat.get("percentile", {})
    return {
        "iops": side["iops"],
        "bw": side["bw_bytes"],
        "clat_us": clat["mean"] / 1000,
        "p50_us": percentile.get("50.000000", 0) / 1000,
        "p99_us": percentile.get("99.000000", 0) / 1000,
        "max_us": clat["max"] / 1000,
        "ops": side["total_ios"],
    }


def fill(server: Server, region: str) -> None:
    """Write the region once: reads then copy real data, first-touch faults are done."""
    fio(server.uri, "write", "1m", 8, region, 0)


def compare(
    started: Sequence[Server], workload: Workload, region: str, runtime: float, rounds: int
) -> dict[str, Result]:
    """Run `workload` `rounds` times against every server, rotating which goes first each
    round (drift on a busy machine hits each alike); the mean Result per server name."""
    samples: dict[str, list[dict[str, float]]] = {server.name: [] for server in started}
    for round_number in range(rounds):
        shift = round_number % len(started)
        for server in [*started[shift:], *started[:shift]]:
            samples[server.name].append(measure(server, workload, region, runtime))
    return {name: mean_result(figures) for name, figures in samples.items()}


def measure(server: Server, workload: Workload, region: str, runtime: float) -> dict[str, float]:
    before = server.cpu_seconds()
    figures = fio(server.uri, *workload, region, runtime)
    figures["cpu"] = server.cpu_seconds() - before
    return figures


def mean_result(samples: list[dict[str, float]]) -> Result:
    n = len(samples)
    ops = sum(s["ops"] for s in samples)
    return Result(
        iops=sum(s["iops"] for s in samples) / n,
        mbps=sum(s["bw"] for s in samples) / n / 1e6,
        clat_us=sum(s["clat_us"] for s in samples) / n,
        cpu_us_per_op=sum(s["cpu"] for s in samples) / ops * 1e6 if ops else 0.0,
        p50_us=sum(s["p50_us"] for s in samples) / n,
        p99_us=sum(s["p99_us"] for s in samples) / n,
        max_us=max(s["max_us"] for s in samples),
    )


def sealing_cost(repeats: int = 7) -> list[dict[str, float]]:
    """Microseconds per page to seal and to open batches of pages (best of `repeats`)."""
    import numpy as np
    from remem_common.protocol.pages import PAGE_SIZE, checksum_pages

    from remem_client.sealing import open_page_sealer

    rows = []
    with tempfile.TemporaryDirectory(prefix="remem-bench-key-") as tmp:
        sealer = open_page_sealer(Path(tmp) / "page.key", tenant="bench", volume=0)
        try:
            for batch in (1, 32, 256):
                plain = np.random.default_rng(batch).integers(
                    0, 256, (batch, PAGE_SIZE), dtype=np.uint8
                )
                pages = list(range(batch))
                out = np.empty_like(plain)
                loops = max(1, 1024 // batch)
                best = {"seal": float("inf"), "open": float("inf"), "crc32c": float("inf")}
                for _ in range(repeats):
                    started = time.perf_counter()
                    for _ in range(loops):
                        cipher, seals = sealer.seal(0, plain)
                    best["seal"] = min(best["seal"], time.perf_counter() - started)
                    started = time.perf_counter()
                    for _ in range(loops):
                        if sealer.open_into(0, pages, cipher, seals, out):
                            raise RuntimeError("a freshly sealed page failed to open")
                    best["open"] = min(best["open"], time.perf_counter() - started)
                    started = time.perf_counter()
                    for _ in range(loops):
                        checksum_pages(cipher)
                    best["crc32c"] = min(best["crc32c"], time.perf_counter() - started)
                scale = 1e6 / (loops * batch)
                rows.append({"batch": batch, **{k: v * scale for k, v in best.items()}})
        finally:
            sealer.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m remem_client.bench_nbd", description=__doc__)
    parser.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per server and workload")
    parser.add_argument("--size", default="1G", help="device size of both servers")
    parser.add_argument("--region", default="256M", help="part of the device fio touches")
    parser.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    parser.add_argument(
        "--target",
        default="memory",
        choices=["memory", "cluster", "mirror", "encryption"],
        help="memory: the NBD front end alone; cluster: remem up, 2 replicas on 3 servers; "
        "mirror: remem up with its mirror against remem up --no-mirror (writes only); "
        "encryption: remem up against remem up --no-encrypt-pages",
    )
    args = parser.parse_args(argv)
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            sys.stderr.write(f"bench_nbd: {tool} not found (make deps)\n")
            return 2

    extra = ["--event-loop", args.event_loop, "--no-lock-memory"]
    results: list[dict[str, object]] = []
    workloads = WRITE_WORKLOADS if args.target == "mirror" else WORKLOADS
    sealing: list[dict[str, float]] = []
    if args.target == "encryption":
        sealing = sealing_cost()
        print(f"{'client sealing, us/page':<26}{'seal':>8}{'open':>8}{'crc32c':>8}")
        for cost in sealing:
            print(
                f"{'batch of ' + str(int(cost['batch'])):<26}{cost['seal']:>8.2f}"
                f"{cost['open']:>8.2f}{cost['crc32c']:>8.2f}"
            )
    with servers(args.size, extra, args.target) as (baseline, remem):
        for server in (baseline, remem):
            fill(server, args.region)
        for workload in workloads:
            means = compare((baseline, remem), workload, args.region, args.runtime, args.rounds)
            base, ours = means[baseline.name], means[remem.name]
            results.append(
                {
                    "workload": workload_name(workload),
                    "baseline": asdict(base),
                    "remem": asdict(ours),
                    "ratio": ours.iops / base.iops if base.iops else 0.0,
                }
            )

    name = baseline.name
    header = (
        f"{'workload':<18}{name + ' IOPS':>16}{'MB/s':>8}{'lat us':>8}{'cpu us/op':>10}"
        f"{'remem IOPS':>12}{'MB/s':>8}{'lat us':>8}{'cpu us/op':>10}{'remem/' + name:>18}"
    )
    print(header)
    for row in results:
        base_row, our_row = row["baseline"], row["remem"]
        assert isinstance(base_row, dict) and isinstance(our_row, dict)
        cells = "".join(
            f"{r['iops']:>{width}.0f}{r['mbps']:>8.0f}{r['clat_us']:>8.1f}"
            f"{r['cpu_us_per_op']:>10.1f}"
            for r, width in ((base_row, 16), (our_row, 12))
        )
        print(f"{row['workload']:<18}{cells}{row['ratio']:>18.2f}")
    summary = {
        "bench": "nbd",
        "baseline": name,
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "region": args.region,
        "event_loop": args.event_loop,
        "target": args.target,
        "results": results,
    }
    if sealing:
        summary["sealing_us_per_page"] = sealing
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
