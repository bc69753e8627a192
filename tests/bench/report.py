"""BENCHMARKS.md and its chart from the results of `make bench` (a JSON-able dict, see
suite.py): the machine, the versions, the date, every table, and each target of issue 14
beside the row that measures it with whether it was met.

Targets are for k=2 and are ratios to `nbdkit memory` measured in the same run, except where
they are absolute (CPU per request, stall, MB/s, bytes, percent).
"""

from __future__ import annotations

import math
import operator
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from .fio_rows import K1, K2, K2_NO_MIRROR, LABELS, NBDKIT
from .phases import render as render_phases

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Target:
    """One goal of issue 14 and what this run measured for it."""

    what: str  # what is measured, e.g. "4K randread QD32 IOPS, k=2 / nbdkit"
    goal: str  # e.g. ">= 0.5x"
    measured: float | None  # None: not measured in this run (skipped or failed)
    shown: str  # the measured value as printed
    met: bool | None
    row: tuple[str, str] | None = None  # (table, row key) where it is printed beside the row
    short: str = ""  # the goal as printed in that row


def _check(value: float | None, limit: float, at_least: bool) -> bool | None:
    if value is None or math.isnan(value):
        return None
    compare: Callable[[float, float], bool] = operator.ge if at_least else operator.le
    return compare(value, limit)


def _fio_row(results: dict[str, Any], workload: str) -> dict[str, Any] | None:
    fio = results.get("fio")
    if not isinstance(fio, dict):
        return None
    for row in fio.get("rows", []):
        if row["workload"] == workload:
            found: dict[str, Any] = row["results"]
            return found
    return None


def _ratio(row: dict[str, Any] | None, field: str, server: str = K2) -> float | None:
    if row is None or server not in row or NBDKIT not in row:
        return None
    base = row[NBDKIT][field]
    return float(row[server][field] / base) if base else None


def _part(results: dict[str, Any], name: str) -> dict[str, Any] | None:
    """A part's figures, or None where it was skipped or failed."""
    part = results.get(name)
    if not isinstance(part, dict) or "skipped" in part or "error" in part:
        return None
    return part


def evaluate_targets(results: dict[str, Any]) -> list[Target]:
    """Every target of issue 14 with this run's figure and whether it was met."""
    targets: list[Target] = []

    def add(
        what: str,
        value: float | None,
        limit: float,
        at_least: bool,
        fmt: str,
        row: tuple[str, str] | None = None,
        short: str = "",
    ) -> None:
        sign = ">=" if at_least else "<="
        goal = f"{sign} {fmt.format(limit)}"
        shown = "not measured" if value is None else fmt.format(value)
        met = _check(value, limit, at_least)
        targets.append(Target(what, goal, value, shown, met, row, f"{short} {goal}".strip()))

    fio_ratios = (
        ("4K randread QD32 IOPS", "randread 4k qd32", "iops", 0.5),
        ("4K randwrite QD32 IOPS", "randwrite 4k qd32", "iops", 0.3),
        ("1M sequential read QD8 MB/s", "read 1m qd8", "mbps", 0.6),
        ("1M sequential write QD8 MB/s", "write 1m qd8", "mbps", 0.4),
    )
    for what, workload, field, limit in fio_ratios:
        value = _ratio(_fio_row(results, workload), field)
        label = "IOPS" if field == "iops" else "MB/s"
        add(f"{what}, k=2 / nbdkit", value, limit, True, "{:.2f}x", ("fio", workload), label)
    qd1 = _ratio(_fio_row(results, "randread 4k qd1"), "p50_us")
    add(
        "4K randread QD1 p50 latency, k=2 / nbdkit",
        qd1,
        3.0,
        False,
        "{:.2f}x",
        ("fio", "randread 4k qd1"),
        "p50",
    )
    for workload in ("randread 4k qd32", "randwrite 4k qd32"):
        row = _fio_row(results, workload)
        cpu = row[K2]["cpu_us_per_op"] if row and K2 in row else None
        add(
            f"CPU per 4K request, all k=2 processes, {workload.split()[0]} QD32",
            cpu,
            40.0,
            False,
            "{:.1f} us",
            ("fio", workload),
            "CPU",
        )
    swap = _part(results, "swap")
    for order in ("sequential", "random"):
        ratio = swap["orders"][order]["ratio"] if swap else None
        add(
            f"kernel swap hog time, {order} page-in, remem / nbdkit",
            ratio,
            1.25,
            False,
            "{:.2f}x",
            ("swap", order),
            "time",
        )
    failover = _part(results, "failover")
    add(
        "failover stall (longest request, page server SIGKILLed)",
        failover["stall_ms"] if failover else None,
        200.0,
        False,
        "{:.0f} ms",
        ("failover", "stall"),
    )
    add(
        "re-replication rate, loopback",
        failover["rereplication_mbps"] if failover else None,
        300.0,
        True,
        "{:.0f} MB/s",
        ("failover", "rate"),
    )
    metadata = _part(results, "metadata")
    add(
        "client location metadata per GiB of device",
        metadata["bytes_per_gib"] / 1024 if metadata else None,
        64.0,
        False,
        "{:.1f} KiB",
        ("metadata", "per_gib"),
    )
    pageserver = _part(results, "pageserver")
    add(
        "page server RAM overhead",
        pageserver["overhead_pct"] if pageserver else None,
        3.0,
        False,
        "{:.2f}%",
        ("pageserver", "overhead"),
    )
    return targets


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[met]


def _beside(targets: list[Target], table: str, key: str) -> tuple[str, str]:
    """The target and met? cells of one table row ('' where the row has no target)."""
    mine = [t for t in targets if t.row == (table, key)]
    return "; ".join(t.short for t in mine), "; ".join(_met(t.met) for t in mine)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _skipped(part: Any) -> str | None:
    if part is None:
        return "not run (--parts)"
    if "skipped" in part:
        return f"skipped ({part['skipped']})"
    if "error" in part:
        return f"**failed**: {part['error']}"
    return None


def _fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def render_markdown(results: dict[str, Any], chart: str | None) -> str:
    """BENCHMARKS.md: machine, versions, date, the targets, every table."""
    targets = evaluate_targets(results)
    machine = results["machine"]
    settings = results["settings"]
    out = [
        "# remem benchmarks",
        "",
        f"Written by `make bench` (`python -m tests.bench`, tests/bench/) on {results['date']}"
        f" in {results.get('elapsed_s', 0) / 60:.1f} minutes. One run: every figure below comes"
        " from the same run, and every ratio compares servers measured side by side in it,"
        " rounds rotating which server goes first. The machine is shared, so absolute figures"
        f" are noisy: load average {machine['load_start']} at the start,"
        f" {machine.get('load_end', '?')} at the end.",
        "",
        "## Machine and versions",
        "",
    ]
    out += _table(
        ["what", "value"],
        [[k, str(v)] for k, v in machine.items() if k not in ("load_start", "load_end")],
    )
    out += ["", "## Targets (issue 14, k=2)", ""]
    out += _table(
        ["target", "measured", "goal", "met?"],
        [[t.what, t.shown, t.goal, _met(t.met)] for t in targets],
    )
    met = sum(1 for t in targets if t.met)
    out += ["", f"{met} of {len(targets)} targets met.", ""]
    if chart:
        out += [f"![remem against nbdkit memory]({chart})", ""]
    out += _fio_section(results, targets, settings)
    out += _mirror_section(results)
    out += _failover_section(results, targets)
    out += _memory_section(results, targets)
    out += _phases_section(results)
    out += _swap_section(results, targets)
    out += _what_section(settings)
    return "\n".join(out) + "\n"


def _fio_section(
    results: dict[str, Any], targets: list[Target], settings: dict[str, Any]
) -> list[str]:
    out = [
        "## fio through NBD",
        "",
        f"fio `--ioengine=nbd` on Unix sockets, {settings['runtime']} s per run, "
        f"{settings['rounds']} rounds per server, over the first {settings['region']} of a "
        f"{settings['size']} device filled once beforehand. `remem up`: placement, 3 page "
        "servers, the mirror, the client, pages encrypted (AES-256-GCM), ZeroMQ over Unix "
        "sockets. CPU is user + system time of every process of the server (all of "
        "`remem up`'s children; nbdkit's one process) per request. Ratios are remem / nbdkit "
        "(IOPS: higher is better; p50: lower is better).",
        "",
    ]
    skipped = _skipped(results.get("fio"))
    if skipped:
        return [*out, skipped, ""]
    rows: list[list[str]] = []
    for row in results["fio"]["rows"]:
        workload = row["workload"]
        for name in (NBDKIT, K1, K2):
            r = row["results"].get(name)
            if r is None:
                continue
            iops_ratio = _ratio(row["results"], "iops", name) if name != NBDKIT else None
            p50_ratio = _ratio(row["results"], "p50_us", name) if name != NBDKIT else None
            target, met = _beside(targets, "fio", workload) if name == K2 else ("", "")
            rows.append(
                [
                    workload if name == NBDKIT else "",
                    LABELS[name],
                    _fmt(r["iops"]),
                    _fmt(r["mbps"], 1),
                    _fmt(r["p50_us"], 1),
                    _fmt(r["p99_us"], 1),
                    _fmt(r["cpu_us_per_op"], 1),
                    f"{iops_ratio:.2f}x" if iops_ratio is not None else "",
                    f"{p50_ratio:.2f}x" if p50_ratio is not None else "",
                    target,
                    met,
                ]
            )
    header = [
        "workload",
        "server",
        "IOPS",
        "MB/s",
        "p50 us",
        "p99 us",
        "CPU us/req",
        "IOPS vs nbdkit",
        "p50 vs nbdkit",
        "target",
        "met?",
    ]
    return [*out, *_table(header, rows), ""]


def _mirror_section(results: dict[str, Any]) -> list[str]:
    out = [
        "## Mirror cost",
        "",
        "The write workloads against `remem up` (k=2) with its mirror and with `--no-mirror`,"
        " same rounds as the table above.",
        "",
    ]
    skipped = _skipped(results.get("fio"))
    if skipped:
        return [*out, skipped, ""]
    rows = []
    for row in results["fio"]["rows"]:
        with_mirror, without = row["results"].get(K2), row["results"].get(K2_NO_MIRROR)
        if with_mirror is None or without is None:
            continue
        rows.append(
            [
                row["workload"],
                _fmt(without["iops"]),
                _fmt(with_mirror["iops"]),
                f"{with_mirror['iops'] / without['iops']:.2f}x" if without["iops"] else "",
                _fmt(without["cpu_us_per_op"], 1),
                _fmt(with_mirror["cpu_us_per_op"], 1),
                _fmt(with_mirror["cpu_us_per_op"] - without["cpu_us_per_op"], 1),
            ]
        )
    header = [
        "workload",
        "IOPS no mirror",
        "IOPS with mirror",
        "with / without",
        "CPU us/req no mirror",
        "with mirror",
        "mirror's CPU us/req",
    ]
    return [*out, *_table(header, rows), ""]


def _failover_section(results: dict[str, Any], targets: list[Target]) -> list[str]:
    out = [
        "## Failover and re-replication",
        "",
        "On the k=2 `remem up` of the table, after its fio runs: fio runs the 4K 70/30 mix at"
        " QD8 while the page server holding the most slabs is SIGKILLed; placement declares"
        " it dead and has the survivors push copies of its slabs to each other. The stall is"
        " the longest single fio request of that run; the copy window runs from the last"
        " status poll (every 20 ms) before any copy to the first that saw all done.",
        "",
    ]
    failover = results.get("failover")
    skipped = _skipped(failover)
    if skipped:
        return [*out, skipped, ""]
    assert failover is not None
    mix = _fio_row(results, "randrw70 4k qd8")
    calm = f"{mix[K2]['max_us'] / 1000:.1f} ms" if mix and K2 in mix else "n/a"
    stall_target, stall_met = _beside(targets, "failover", "stall")
    rate_target, rate_met = _beside(targets, "failover", "rate")
    rows = [
        ["page server killed", f"{failover['victim']} ({failover['victim_slabs']} slabs)", "", ""],
        [
            "longest request (failover stall)",
            f"{failover['stall_ms']:.1f} ms",
            stall_target,
            stall_met,
        ],
        ["longest request of the same workload without a kill (table above)", calm, "", ""],
        ["p99 during the run with the kill", f"{failover['p99_ms']:.2f} ms", "", ""],
        ["IOPS of that run", _fmt(failover["fio_iops"]), "", ""],
        ["kill to declared dead", f"{failover['detect_s']:.2f} s", "", ""],
        ["bytes re-replicated", f"{failover['rereplicated_bytes'] / 2**20:.0f} MiB", "", ""],
        ["copy window", f"{failover['copy_s']:.2f} s", "", ""],
        [
            "re-replication rate",
            f"{failover['rereplication_mbps']:.0f} MB/s",
            rate_target,
            rate_met,
        ],
        ["kill to every slab at k=2 again", f"{failover['whole_again_s']:.2f} s", "", ""],
    ]
    return [*out, *_table(["figure", "value", "target", "met?"], rows), ""]


def _memory_section(results: dict[str, Any], targets: list[Target]) -> list[str]:
    out = ["## Memory: client metadata, page server overhead", ""]
    rows: list[list[str]] = []
    metadata = results.get("metadata")
    skipped = _skipped(metadata)
    if skipped or metadata is None:
        rows.append(["client location metadata per GiB", skipped or "n/a", "", ""])
    else:
        target, met = _beside(targets, "metadata", "per_gib")
        rows.append(
            [
                "client location metadata (written-page bitmap + slab map), per GiB of device",
                f"{metadata['bytes_per_gib'] / 1024:.1f} KiB ({_fmt(metadata['bytes'])} bytes"
                f" for {metadata['device_bytes'] / 2**30:.0f} GiB)",
                target,
                met,
            ]
        )
    pageserver = results.get("pageserver")
    skipped = _skipped(pageserver)
    if skipped or pageserver is None:
        rows.append(["page server RAM overhead", skipped or "n/a", "", ""])
    else:
        target, met = _beside(targets, "pageserver", "overhead")
        pages = pageserver["pages"]
        rows += [
            [
                f"page server RAM overhead, {_fmt(pages)} pages "
                f"({pages * 4096 / 2**30:g} GiB): (RSS - page bytes) / page bytes",
                f"{pageserver['overhead_pct']:.2f}% "
                f"(RSS {pageserver['rss_full_bytes'] / 2**20:,.0f} MiB)",
                target,
                met,
            ],
            [
                "of which beyond the idle process (per stored page, seals included)",
                f"{pageserver['marginal_overhead_pct']:.2f}%",
                "",
                "",
            ],
            [
                "page server batched PUT / GET (64 pages a batch, plaintext, loopback)",
                f"{_fmt(pageserver['put_pages_per_s'])} / {_fmt(pageserver['get_pages_per_s'])}"
                " pages/s",
                "",
                "",
            ],
            [
                "page server CPU per page PUT / GET",
                f"{pageserver['server_cpu_us_per_put_page']} / "
                f"{pageserver['server_cpu_us_per_get_page']} us",
                "",
                "",
            ],
        ]
    return [*out, *_table(["figure", "value", "target", "met?"], rows), ""]


def _phases_section(results: dict[str, Any]) -> list[str]:
    out = ["## Where a QD1 read's and write's time goes (root)", ""]
    phases = results.get("phases")
    skipped = _skipped(phases)
    if skipped or phases is None:
        return [*out, skipped or "n/a", ""]
    out += [
        "fio reads, then writes, 4 KiB at random at QD1 while `perf record` takes the kernel's"
        " sched_wakeup and sched_switch events (tests/bench/phases.py): from one of fio's"
        " wake-ups to the next is one request, split into each process's time on a CPU, the"
        " time none of them runs (the hops between processes) and each process's wake-ups.",
        "",
        render_phases(phases),
        "",
    ]
    return out


def _swap_section(results: dict[str, Any], targets: list[Target]) -> list[str]:
    out = ["## Kernel swap (root)", ""]
    swap = results.get("swap")
    skipped = _skipped(swap)
    if skipped or swap is None:
        return [*out, skipped or "n/a", ""]
    out += [
        f"A {swap['hog_mib']} MiB hog in a {swap['limit_mib']} MiB memory cgroup swaps through"
        " nbdfuse and a direct-I/O loop device, then pages everything back in sequential or"
        " in random order and verifies every byte; remem is `remem up` at k=2 (mirror on)."
        f" Mean of {swap['rounds']} rounds, servers alternating. Page-in latency: how long"
        " each page's first touch took in the page-in phase (a major fault waits for the"
        " device; a page the kernel's swap read-ahead already brought in takes well under"
        " 1 us), in microseconds.",
        "",
    ]
    quantiles: list[float] = swap["quantiles"]
    shown = (0.5, 0.9, 0.99, 0.999, 1.0)
    index = [quantiles.index(q) for q in shown]
    rows = []
    for order, figures in swap["orders"].items():
        target, met = _beside(targets, "swap", order)
        for name in ("nbdkit", "remem"):
            s = figures["servers"][name]
            cells = [f"{s['quantiles_us'][i]:,.1f}" for i in index]
            rows.append(
                [
                    order if name == "nbdkit" else "",
                    "nbdkit memory" if name == "nbdkit" else "remem k=2",
                    f"{s['total_s']:.2f}",
                    f"{s['write_s']:.2f}",
                    f"{s['pagein_s']:.2f}",
                    _fmt(s["major_faults"]),
                    *cells,
                    f"{figures['ratio']:.2f}x" if name == "remem" else "",
                    target if name == "remem" else "",
                    met if name == "remem" else "",
                ]
            )
    header = [
        "page-in order",
        "server",
        "hog s",
        "swap-out phase s",
        "page-in phase s",
        "major faults",
        "p50 us",
        "p90 us",
        "p99 us",
        "p99.9 us",
        "max us",
        "time vs nbdkit",
        "target",
        "met?",
    ]
    return [*out, *_table(header, rows), ""]


def _what_section(settings: dict[str, Any]) -> list[str]:
    return [
        "## What each row measures",
        "",
        "- **fio rows**: one fio job (`--ioengine=nbd`, one connection) per run:"
        " `randread`/`randwrite` 4 KiB at QD1 and QD32, `read`/`write` 1 MiB sequential at"
        " QD8, `randrw70` 4 KiB 70% reads at QD8; IOPS and MB/s are fio's, p50/p99 its"
        " completion latency percentiles (mean over rounds), CPU the server's user + system"
        " time over the run divided by the requests fio completed.",
        "- **Mirror cost**: the same write jobs against k=2 with and without the local mirror.",
        "- **Failover stall**: the longest request fio saw while a page server was SIGKILLed"
        " under it (the client retries the other replica).",
        "- **Re-replication**: page bytes placement had page servers copy to each other to"
        " restore k=2 after the kill (`rereplicated_bytes` of its status), over the copy"
        " window.",
        "- **Client metadata**: `client_location_metadata_bytes` of the k=2 client (its"
        " written-page bitmap and slab map) divided by the device size.",
        "- **Page server overhead**: `remem_pageserver.bench` (`make bench-pageserver`),"
        f" {settings.get('pageserver_pages', 0):,} pages put into one page server; its RSS"
        " minus the page bytes, over the page bytes (the Python process itself included).",
        "- **QD1 read and write breakdown**: tests/bench/phases.py; per request (fio wake-up"
        " to fio wake-up) the median time each process spent on a CPU, from the kernel's"
        " scheduler events, the time none ran, and how often each process was woken.",
        "- **Kernel swap**: tests/system/kernel_swap.py's hog under a memory cgroup; the hog's"
        " own wall time from its first write to its last check (`hog s`).",
        "",
    ]


def machine_info() -> dict[str, str]:
    """What machine and which versions this run measured (load average for the noise)."""
    model = "unknown"
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    system = platform.system()
    try:
        release = Path("/etc/os-release").read_text()
        system = next(
            line.split("=", 1)[1].strip('"')
            for line in release.splitlines()
            if line.startswith("PRETTY_NAME=")
        )
    except (OSError, StopIteration):
        pass
    return {
        "CPU": f"{model}, {os.cpu_count()} cores",
        "RAM": f"{memory / 2**30:.1f} GiB",
        "OS": f"{system}, Linux {platform.release()}",
        "remem": _remem_version(),
        "Python": sys.version.split()[0],
        "nbdkit": _tool_version(["nbdkit", "--version"]),
        "fio": _tool_version(["fio", "--version"]),
        "libnbd": _tool_version(["nbdinfo", "--version"]),
        "pyzmq / libzmq": f"{zmq.pyzmq_version()} / {zmq.zmq_version()}",
        "load_start": _load(),
    }


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _tool_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    out = subprocess.run(command, capture_output=True, text=True).stdout.strip()
    return out.splitlines()[0] if out else "unknown"


def _remem_version() -> str:
    git = ["git", "-C", str(REPO)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(
        [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return f"{head.stdout.strip()}" + (" + uncommitted changes" if dirty else "")
