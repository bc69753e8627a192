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
The last line is one JSON object with every figure.

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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

WRITE_WORKLOADS: tuple[tuple[str, str, int], ...] = (
    ("randwrite", "4k", 1),
    ("randwrite", "4k", 32),
    ("write", "1m", 8),
)
WORKLOADS: tuple[tuple[str, str, int], ...] = (
    ("randread", "4k", 1),
    ("randwrite", "4k", 1),
    ("randread", "4k", 32),
    ("randwrite", "4k", 32),
    ("read", "1m", 8),
    ("write", "1m", 8),
)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    """Mean figures of one workload against one server."""

    iops: float
    mbps: float
    clat_us: float
    cpu_us_per_op: float


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
    directory: Path, size: str, extra: list[str], target: str, name: str = "remem"
) -> Server:
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
def servers(size: str, extra: list[str], target: str) -> Iterator[tuple[Server, Server]]:
    with tempfile.TemporaryDirectory(prefix="remem-bench-") as tmp:
        started: list[Server] = []
        try:
            if target == "mirror":
                started.append(
                    start_remem(Path(tmp), size, extra, "cluster-no-mirror", "no-mirror")
                )
                started.append(start_remem(Path(tmp), size, extra, "cluster"))
            elif target == "encryption":
                started.append(
                    start_remem(Path(tmp), size, extra, "cluster-plaintext", "plaintext")
                )
                started.append(start_remem(Path(tmp), size, extra, "cluster"))
            else:
                started.append(start_nbdkit(Path(tmp), size))
                started.append(start_remem(Path(tmp), size, extra, target))
            yield started[0], started[1]
        finally:
            for server in started:
                server.proc.send_signal(signal.SIGTERM)
            for server in started:
                try:
                    server.proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    server.proc.kill()
                    server.proc.wait()


def fio(uri: str, rw: str, bs: str, depth: int, region: str, runtime: float) -> dict[str, float]:
    """Run one fio job; returns iops, bytes/s and mean completion latency (us)."""
    args = [
        "fio", "--name=bench", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", f"--bs={bs}",
        f"--iodepth={depth}", f"--size={region}", "--time_based", f"--runtime={runtime}",
        "--output-format=json", "--verify_state_save=0",
    ]  # fmt: skip
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    if job["error"]:
        raise RuntimeError(f"fio reported error {job['error']} against {uri}")
    return {
        "iops": side["iops"],
        "bw": side["bw_bytes"],
        "clat_us": side["clat_ns"]["mean"] / 1000,
        "ops": side["total_ios"],
    }


def measure(
    server: Server, workload: tuple[str, str, int], region: str, runtime: float
) -> dict[str, float]:
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
        for server in (baseline, remem):  # fill the region: real data, pages already present
            fio(server.uri, "write", "1m", 8, args.region, 0)
        for rw, bs, depth in workloads:
            samples: dict[str, list[dict[str, float]]] = {baseline.name: [], "remem": []}
            for round_number in range(args.rounds):
                order = (baseline, remem) if round_number % 2 == 0 else (remem, baseline)
                for server in order:
                    figures = measure(server, (rw, bs, depth), args.region, args.runtime)
                    samples[server.name].append(figures)
            base, ours = mean_result(samples[baseline.name]), mean_result(samples["remem"])
            results.append(
                {
                    "workload": f"{rw} {bs} qd{depth}",
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
