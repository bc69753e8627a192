"""Make the host kernel swap to an NBD export and verify every byte, self-contained.

The host kernel here may lack the nbd driver, so the export reaches it as
NBD URI -> nbdfuse (a FUSE file) -> loop device with direct I/O -> swapon. A memory hog in
a memory-limited cgroup (v2 if it has the memory controller, else v1) writes a pattern that
depends on each page's index, reads it all back, and counts mismatches. Direct I/O on the
loop device matters: without it the host page cache answers page-ins.

The hog pages back in `sequential` (address) order or in a `random` permutation of its
pages, timing each page's first touch (`quantiles_us`: what a thread waits on a page-in,
including the touches the kernel's swap read-ahead already answered) and counting its
major faults (the page-ins that waited for the device).

Needs root, nbdfuse (libnbd-bin), losetup/mkswap/swapon (util-linux), numpy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

PageInOrder = Literal["sequential", "random"]

HOG = r"""
import json, mmap, resource, sys, time
import numpy as np
mib = int(sys.argv[1]); seed = int(sys.argv[2]); order = sys.argv[3]
pages = mib * 256
words = 512  # 8-byte words per 4 KiB page
chunk = 4096  # pages written or verified per numpy step (16 MiB)
quantiles = [float(q) for q in sys.argv[4].split(",")] if sys.argv[4:5] != [""] else []
# An anonymous mapping is page-aligned: row i is exactly page i, so reading one word of a
# row faults in that page alone.
area = mmap.mmap(-1, pages * 4096)
memory = np.frombuffer(area, dtype=np.uint64).reshape(pages, words)
columns = np.arange(words, dtype=np.uint64)

def expected(index):
    mix = index.astype(np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15) + np.uint64(seed)
    return mix ^ columns

start = time.monotonic()
for base in range(0, pages, chunk):
    memory[base:base + chunk] = expected(np.arange(base, min(pages, base + chunk)))
written = time.monotonic()
if order == "random":
    sequence = np.random.default_rng(seed).permutation(pages)
else:
    sequence = np.arange(pages)
# Page-in: touch each page in `order`, timing the touch (a major fault waits for the swap
# device; a page the kernel's swap read-ahead brought in is a plain memory read), then check
# the chunk just touched while it is still resident.
latency = []
clock = time.perf_counter_ns
faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
errors = 0
for base in range(0, pages, chunk):
    batch = sequence[base:base + chunk]
    for page in batch.tolist():
        began = clock()
        memory[page, 0]
        latency.append(clock() - began)
    errors += int(np.count_nonzero((memory[batch] != expected(batch)).any(axis=1)))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
done = time.monotonic()
touches = np.array(latency, dtype=np.float64) / 1000
print(json.dumps({"mib": mib, "write_s": round(written - start, 3),
                  "verify_s": round(done - written, 3), "total_s": round(done - start, 3),
                  "errors": errors, "major_faults": faults,
                  "touch_us_total": round(float(touches.sum()), 1),
                  "quantiles_us": [round(float(v), 2) for v in
                                   np.quantile(touches, quantiles)] if quantiles else []}))
"""


@dataclass
class SwapResult:
    ok: bool
    errors: int
    total_s: float
    write_s: float
    verify_s: float
    swapped_out_mib: int
    swapped_in_mib: int
    detail: str
    order: PageInOrder = "sequential"
    major_faults: int = 0
    # Each page's first touch during page-in, in microseconds, at `run_hog`'s `quantiles`.
    quantiles_us: list[float] = field(default_factory=list)


def available() -> str | None:
    """Why the kernel-swap path cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("nbdfuse", "losetup", "mkswap", "swapon", "swapoff"):
        if shutil.which(tool) is None:
            return f"missing {tool}"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    return None


def _vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return 0


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[Path]:
    """A fresh memory cgroup limited to `limit_bytes`; yields the file to write pids into."""
    root = Path("/sys/fs/cgroup")
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        group = root / f"remem-swap-test.{os.getpid()}"
        group.mkdir()
        (group / "memory.max").write_text(str(limit_bytes))
        procs = group / "cgroup.procs"
    else:
        mine = next(
            line.split(":", 2)[2]
            for line in Path("/proc/self/cgroup").read_text().splitlines()
            if line.split(":", 2)[1] == "memory"
        )
        group = root / "memory" / mine.lstrip("/") / f"remem-swap-test.{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
        procs = group / "cgroup.procs"
    try:
        yield procs
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)  # the hog's pages are still being uncharged


@contextlib.contextmanager
def swap_on_nbd(uri: str, workdir: Path) -> Iterator[str]:
    """Attach `uri` as swap through nbdfuse and a direct-I/O loop device; yields the device."""
    mount = workdir / "mnt"
    mount.mkdir()
    pidfile = workdir / "nbdfuse.pid"
    log = open(workdir / "nbdfuse.log", "w")  # noqa: SIM115
    fuse = subprocess.Popen(
        ["nbdfuse", "-P", str(pidfile), str(mount / "swap.img"), uri],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    loop = ""
    swapped = False
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if fuse.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "nbdfuse did not attach: " + (workdir / "nbdfuse.log").read_text()
                )
            time.sleep(0.05)  # nbdfuse writes its pid file once the mount is ready
        loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(mount / "swap.img")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        subprocess.run(["mkswap", loop], check=True, capture_output=True)
        subprocess.run(["swapon", loop], check=True)
        swapped = True
        yield loop
    finally:
        if swapped:
            subprocess.run(["swapoff", loop], timeout=600)
        if loop:
            subprocess.run(["losetup", "-d", loop])
        subprocess.run(["umount", str(mount)], capture_output=True)
        with contextlib.suppress(ProcessLookupError):
            fuse.send_signal(signal.SIGTERM)
        try:
            fuse.wait(timeout=10)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        log.close()


def run_hog(
    uri: str,
    workdir: Path,
    *,
    hog_mib: int = 512,
    limit_mib: int = 128,
    timeout: float = 600,
    order: PageInOrder = "sequential",
    quantiles: Sequence[float] = (),
) -> SwapResult:
    """Swap `hog_mib` MiB through `uri` with `limit_mib` of RAM and page it back in `order`;
    verify every page. `quantiles` (0..1) of the page-in touch times are returned."""
    with swap_on_nbd(uri, workdir), memory_cgroup(limit_mib << 20) as procs:
        out0, in0 = _vmstat("pswpout"), _vmstat("pswpin")
        hog = subprocess.run(
            [
                "sh",
                "-c",
                'echo $$ > "$1" && exec "$2" -c "$3" "$4" 42 "$5" "$6"',
                "sh",
                str(procs),
                sys.executable,
                HOG,
                str(hog_mib),
                order,
                ",".join(str(q) for q in quantiles),
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        out1, in1 = _vmstat("pswpout"), _vmstat("pswpin")
    swapped_out = (out1 - out0) * 4 // 1024
    swapped_in = (in1 - in0) * 4 // 1024
    try:
        line = json.loads(hog.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return SwapResult(
            False,
            -1,
            0,
            0,
            0,
            swapped_out,
            swapped_in,
            f"hog rc={hog.returncode}: {hog.stdout} {hog.stderr}",
            order,
        )
    ok = hog.returncode == 0 and line["errors"] == 0 and swapped_out > 0
    return SwapResult(
        ok,
        line["errors"],
        line["total_s"],
        line["write_s"],
        line["verify_s"],
        swapped_out,
        swapped_in,
        hog.stderr[-2000:],
        order,
        line["major_faults"],
        line["quantiles_us"],
    )
