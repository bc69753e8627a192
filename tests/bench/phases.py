"""Where a 4 KiB read's and write's time goes at queue depth 1: a scheduler trace of fio, the
client, the page servers and the mirror, without a line of tracing code in the data path.

fio reads, then writes, 4 KiB at random at QD1 to `remem up` (k=2) and to `nbdkit memory`
while `perf record` takes the kernel's sched_wakeup and sched_switch events on every CPU
(root; about a microsecond an event). At QD1 fio sleeps until each reply: from one of its
wake-ups to the next is one request. Within it, the switch events give the time each process
of the chain (fio, the client, the page servers, the mirror; or nbdkit) spent on a CPU, and
the time none of them ran: wake-up latency, the cost of each hop between processes; the
wake-up events, how many hops each process took. The medians over every request of the
trace are the breakdown. (Cutting finer, at the client's and page servers' own
wake-ups, fails: one of them is often still running when its next input arrives, and is
then not woken.)

    python -m tests.bench.phases [--seconds 1.0] [--json FILE]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remem_client.bench_nbd import Server, fill, running, start_nbdkit, start_remem

# A line of `perf script` for the two sched events (its default fields).
_LINE = re.compile(
    r"^\s*(?P<comm>.+?)\s+(?P<tid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<ts>\d+\.\d+):\s+"
    r"sched:(?P<event>sched_wakeup|sched_switch):\s+(?P<rest>.*)$"
)
_WOKEN = re.compile(r"\bpid=(\d+)\b")
_SWITCH = re.compile(r"prev_pid=(\d+)\b.*==>\s+next_comm=.*?\bnext_pid=(\d+)\b")

# At QD1 fio is woken once per request, by its reply: from one wake-up to the next is one
# request, whoever it woke on the way (cutting finer at the client's and page server's
# wake-ups fails whenever one of them is still running when its next input arrives).
HOPS = ["fio"]
PHASES = ("request",)
# fio's 4 KiB random jobs traced, each against both servers.
WORKLOADS = ("randread", "randwrite")


@dataclass
class Wakeup:
    ts: float
    waker: int  # thread ids
    woken: int


@dataclass
class Trace:
    """The events of one recording: wake-ups in time order, and each thread's intervals on
    a CPU."""

    wakeups: list[Wakeup] = field(default_factory=list)
    running: dict[int, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    start: float = 0.0
    end: float = 0.0


def parse_perf_script(text: str) -> Trace:
    """The wake-ups and on-CPU intervals of a `perf script` of sched_wakeup/sched_switch."""
    trace = Trace()
    since: dict[int, float] = {}  # thread -> when it was last switched in
    first = last = None
    for line in text.splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        ts = float(match["ts"])
        first = ts if first is None else first
        last = ts
        rest = match["rest"]
        if match["event"] == "sched_wakeup":
            woken = _WOKEN.search(rest)
            if woken is not None:
                trace.wakeups.append(Wakeup(ts, int(match["tid"]), int(woken[1])))
            continue
        switch = _SWITCH.search(rest)
        if switch is None:
            continue
        prev, nxt = int(switch[1]), int(switch[2])
        began = since.pop(prev, None)
        if began is not None:
            trace.running[prev].append((began, ts))
        since[nxt] = ts
    trace.start, trace.end = first or 0.0, last or 0.0
    for tid, began in since.items():  # still running when the recording stopped
        trace.running[tid].append((began, trace.end))
    return trace


def running_within(
    trace: Trace, threads: set[int], start: float, end: float
) -> Iterator[tuple[float, float]]:
    """Each interval one of `threads` spent on a CPU, clipped to [start, end)."""
    for tid in threads:
        intervals = trace.running.get(tid)
        if not intervals:
            continue
        # A thread's intervals are in time order and do not overlap: start from the last
        # one that began before `start` (thousands of requests x thousands of intervals).
        index = max(bisect.bisect_right(intervals, (start, math.inf)) - 1, 0)
        for at in range(index, len(intervals)):
            began, ended = intervals[at]
            if began >= end:
                break
            if ended > start:
                yield max(began, start), min(ended, end)


def on_cpu(trace: Trace, threads: set[int], start: float, end: float) -> float:
    """Seconds the `threads` together spent on a CPU within [start, end) (summed)."""
    return sum(ended - began for began, ended in running_within(trace, threads, start, end))


def busy_union(trace: Trace, threads: set[int], start: float, end: float) -> float:
    """Seconds within [start, end) when at least one of `threads` was on a CPU."""
    clipped = sorted(running_within(trace, threads, start, end))
    total, reach = 0.0, start
    for began, ended in clipped:
        if ended > reach:
            total += ended - max(began, reach)
            reach = ended
    return total


def chains(trace: Trace, roles: dict[str, set[int]], hops: list[str]) -> list[list[float]]:
    """Each complete request chain: the times the roles `hops` were woken, in order, then the
    time the next chain starts (its first role woken again).

    Only who is woken counts, not who wakes: a wake-up aimed at an idle CPU is carried out
    by that CPU's idle task, which the trace then names as the waker. A role woken out of
    turn that comes earlier in `hops` (the client woken by the page server's reply) is
    passed over; one that comes later means a link was missed (the thread was still
    running), and that chain is dropped."""
    role_of = {tid: role for role, tids in roles.items() for tid in tids}
    done: list[list[float]] = []
    times: list[float] = []
    for wakeup in trace.wakeups:
        role = role_of.get(wakeup.woken)
        if role is None:
            continue
        if len(times) in (0, len(hops)):
            if role == hops[0]:
                if times:
                    done.append([*times, wakeup.ts])
                times = [wakeup.ts]
            continue
        if role == hops[len(times)]:
            times.append(wakeup.ts)
        elif role in hops[len(times) + 1 :]:
            times = []
    return done


def breakdown(
    trace: Trace, roles: dict[str, set[int]], hops: list[str], names: tuple[str, ...]
) -> dict[str, Any]:
    """Median microseconds of each phase, of each role's time on a CPU in it and of the
    rest (waiting), over the chains; medians, as a loaded machine stalls a few chains for
    milliseconds (so the parts add up only roughly); and the whole request's mean too."""
    found = chains(trace, roles, hops)
    phases: dict[str, Any] = {}
    for index, name in enumerate(names):
        spans = [(chain[index], chain[index + 1]) for chain in found]
        phase: dict[str, float] = {"us": _median_us([end - start for start, end in spans])}
        waiting = [end - start for start, end in spans]
        for role, tids in roles.items():
            busy = [on_cpu(trace, tids, start, end) for start, end in spans]
            phase[f"{role} on cpu us"] = _median_us(busy)
            waiting = [left - used for left, used in zip(waiting, busy, strict=True)]
        phase["waiting us"] = _median_us(waiting)
        everyone = set().union(*roles.values())
        phase["none on cpu us"] = _median_us(
            [(end - start) - busy_union(trace, everyone, start, end) for start, end in spans]
        )
        times = [w.ts for w in trace.wakeups]
        for role, tids in roles.items():
            woken = [
                sum(1 for w in trace.wakeups[at:until] if w.woken in tids)
                for at, until in (
                    (bisect.bisect_left(times, start), bisect.bisect_left(times, end))
                    for start, end in spans
                )
            ]
            phase[f"{role} woken"] = statistics.median(woken) if woken else float("nan")
        phases[name] = phase
    cycles = [chain[-1] - chain[0] for chain in found]
    total_wakeups = sum(1 for w in trace.wakeups if w.woken in roles["fio"])
    return {
        "chains": len(found),
        "fio woken": total_wakeups,
        "request us": _mean_us(cycles),
        "request median us": _median_us(cycles),
        "phases": phases,
    }


def _mean_us(values: list[float]) -> float:
    return round(statistics.fmean(values) * 1e6, 1) if values else float("nan")


def _median_us(values: list[float]) -> float:
    return round(statistics.median(values) * 1e6, 1) if values else float("nan")


def threads_of(pid: int) -> set[int]:
    try:
        return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return set()


def record(seconds: float, out: Path) -> str:
    """`perf record` of both sched events on every CPU for `seconds`; its `perf script`."""
    data = out / "sched.data"
    subprocess.run(
        [
            "perf", "record", "-q", "-e", "sched:sched_switch", "-e", "sched:sched_wakeup",
            "-a", "-o", str(data), "--", "sleep", str(seconds),
        ],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return subprocess.run(
        ["perf", "script", "-i", str(data)], check=True, capture_output=True, text=True
    ).stdout


def trace_server(
    server: Server,
    server_roles: Callable[[], dict[str, set[int]]],
    seconds: float,
    tmp: Path,
    workload: str = "randread",
) -> tuple[Trace, dict[str, set[int]]]:
    """Run fio 4 KiB `workload` (randread or randwrite) at QD1 against `server` and record the
    scheduler meanwhile; the trace, and the threads of each role (`server_roles`, asked once
    fio is connected: nbdkit starts a thread per connection, and fio)."""
    fio = subprocess.Popen(
        [
            "fio", "--name=phases", "--ioengine=nbd", f"--uri={server.uri}", f"--rw={workload}",
            "--bs=4k", "--iodepth=1", "--size=64M", "--time_based",
            f"--runtime={seconds + 3}", "--output-format=json",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)  # fio connected and running steadily before the recording starts
        roles = server_roles()
        roles["fio"] = set()
        for line in subprocess.run(
            ["pgrep", "-x", "fio"], capture_output=True, text=True, check=False
        ).stdout.split():
            roles["fio"] |= threads_of(int(line))
        return parse_perf_script(record(seconds, tmp)), roles
    finally:
        fio.wait(timeout=seconds + 30)


def remem_roles(server: Server) -> dict[str, set[int]]:
    assert server.pid_dir is not None
    roles: dict[str, set[int]] = {"client": set(), "page server": set(), "mirror": set()}
    for path in server.pid_dir.glob("*.pid"):
        role = "page server" if path.stem.startswith("pageserver") else path.stem
        if role in roles:
            roles[role] |= threads_of(int(path.read_text()))
    return roles


def available() -> str | None:
    """Why the trace cannot be taken here, or None."""
    if os.geteuid() != 0:
        return "needs root: perf records the scheduler of every CPU"
    for tool in ("perf", "fio", "nbdkit"):
        if shutil.which(tool) is None:
            return f"{tool} not found (make deps)"
    return None


def measure(seconds: float) -> dict[str, Any]:
    """{"skipped": why} where it cannot run; else both servers' breakdowns, by workload."""
    why_not = available()
    if why_not:
        return {"skipped": why_not}
    with tempfile.TemporaryDirectory(prefix="remem-phases-") as tmp_name:
        tmp = Path(tmp_name)
        starters = [
            lambda d: start_nbdkit(d, "1G"),
            lambda d: start_remem(d, "1G", [], "cluster", name="remem-k2"),
        ]
        figures: dict[str, Any] = {}
        with running(starters) as (nbdkit, remem):
            for server in (nbdkit, remem):
                fill(server, "64M")
            for workload in WORKLOADS:
                nbdkit_trace, roles = trace_server(
                    nbdkit, lambda: {"nbdkit": threads_of(nbdkit.proc.pid)}, seconds, tmp, workload
                )
                nbdkit_figures = breakdown(nbdkit_trace, roles, HOPS, PHASES)
                remem_trace, roles = trace_server(
                    remem, lambda: remem_roles(remem), seconds, tmp, workload
                )
                remem_figures = breakdown(remem_trace, roles, HOPS, PHASES)
                figures[workload] = {"nbdkit": nbdkit_figures, "remem k=2": remem_figures}
    return figures


def render(figures: dict[str, Any]) -> str:
    """The breakdown as a markdown table: one row per workload and server."""
    columns = ["client", "page server", "mirror", "nbdkit", "fio"]
    lines = [
        "Median per request over every request of the trace; microseconds. On a CPU: the"
        " process's threads, summed (two CPUs: they may overlap); none on a CPU: no thread of"
        " the chain runs (wake-up latency); woken: how many times the kernel woke a thread of"
        " the process (each wake-up of an idle process is a hop, and on these VMs costs both"
        " sides CPU time).",
        "",
        "| workload | server | requests | wall us | "
        + " | ".join(f"{c} on CPU" for c in columns)
        + " | none on a CPU | woken: "
        + " / ".join(columns)
        + " |",
        "|---|---|---|---|" + "---|" * (len(columns) + 2),
    ]
    for workload in WORKLOADS:
        if workload not in figures:
            continue
        for server, key in (("remem k=2", "remem k=2"), ("nbdkit memory", "nbdkit")):
            measured = figures[workload][key]
            request = measured["phases"]["request"]
            cells = [
                f"{request[f'{c} on cpu us']:.1f}" if f"{c} on cpu us" in request else ""
                for c in columns
            ]
            woken = " / ".join(
                f"{request[f'{c} woken']:g}" if f"{c} woken" in request else "-" for c in columns
            )
            lines.append(
                f"| {workload} 4k qd1 | {server} | {measured['chains']:,} | "
                f"{measured['request median us']:.1f} | "
                + " | ".join(cells)
                + f" | {request['none on cpu us']:.1f} | {woken} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.phases", description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds recorded per server")
    parser.add_argument("--json", type=Path, help="also save the figures here")
    args = parser.parse_args(argv)
    why_not = available()
    if why_not:
        sys.stderr.write(f"phases: {why_not}\n")
        return 2
    figures = measure(args.seconds)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    print(render(figures))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
