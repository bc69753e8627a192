"""tests/bench/phases.py: a `perf script` of sched events cut into requests at fio's wake-ups,
each request split into time on a CPU per role and time none of them ran. The text is shaped
as perf prints it."""

from __future__ import annotations

import re

from tests.bench.phases import (
    HOPS,
    PHASES,
    WORKLOADS,
    breakdown,
    busy_union,
    chains,
    parse_perf_script,
    render,
)

FIO, CLIENT, IO_THREAD, SERVER = 100, 200, 301, 300
ROLES = {"fio": {FIO}, "client": {CLIENT}, "page server": {SERVER, IO_THREAD}}


def wakeup(at_us: int, waker: int, woken: int) -> str:
    return (
        f"  python {waker} [001] {1000 + at_us / 1e6:.6f}: sched:sched_wakeup: "
        f"comm=x pid={woken} prio=120 target_cpu=001"
    )


def switch(at_us: int, prev: int, nxt: int) -> str:
    return (
        f"  python {prev} [001] {1000 + at_us / 1e6:.6f}: sched:sched_switch: "
        f"prev_comm=x prev_pid={prev} prev_prio=120 prev_state=S ==> "
        f"next_comm=ZMQbg/IO/0 next_pid={nxt} next_prio=120"
    )


def request(t: int) -> list[str]:
    """One QD1 request from t us on, every thread on one CPU, each running 5 us after its
    wake-up: the client runs 30 us, the I/O thread 10, the serving thread 50, the client 20,
    fio 65 (then it wakes the client for the next request at t + 200)."""
    return [
        wakeup(t, FIO, CLIENT),
        switch(t + 5, FIO, CLIENT),
        wakeup(t + 35, CLIENT, IO_THREAD),
        switch(t + 40, CLIENT, IO_THREAD),
        wakeup(t + 50, IO_THREAD, SERVER),
        switch(t + 55, IO_THREAD, SERVER),
        wakeup(t + 105, SERVER, CLIENT),
        switch(t + 110, SERVER, CLIENT),
        wakeup(t + 130, CLIENT, FIO),
        switch(t + 135, CLIENT, FIO),
    ]


def test_each_request_runs_from_one_fio_wakeup_to_the_next_split_by_who_ran() -> None:
    text = "\n".join(["header line perf prints", *request(0), *request(200), *request(400)])
    trace = parse_perf_script(text)
    assert len(chains(trace, ROLES, HOPS)) == 2  # fio woken at 130, 330, 530
    figures = breakdown(trace, ROLES, HOPS, PHASES)
    assert figures["request median us"] == 200.0
    request_figures = figures["phases"]["request"]
    # From fio's wake-up at 130 to the next at 330: fio 135-205, the client 130-135,
    # 205-240 and 310-330, the page server 240-310.
    assert request_figures["fio on cpu us"] == 70.0
    assert request_figures["client on cpu us"] == 60.0
    assert request_figures["page server on cpu us"] == 70.0
    assert request_figures["none on cpu us"] == 0.0  # one CPU, always someone on it


def test_wakeups_carried_out_by_an_idle_cpu_still_cut_requests() -> None:
    # A wake-up aimed at an idle CPU is done by that CPU's idle task (pid 0): the trace
    # names swapper as the waker, so only who is woken may count.
    def by_idle_task(line: str) -> str:
        return re.sub(r"^  python \d+ ", "  swapper 0 ", line) if "sched_wakeup" in line else line

    lines = [by_idle_task(line) for line in [*request(0), *request(200), *request(400)]]
    trace = parse_perf_script("\n".join(lines))
    assert {w.waker for w in trace.wakeups} == {0}
    assert len(chains(trace, ROLES, HOPS)) == 2


def test_time_on_a_cpu_of_threads_overlapping_on_two_cpus_is_counted_once() -> None:
    on_two_cpus = [
        switch(0, 0, CLIENT),
        switch(10, 0, SERVER).replace("[001]", "[000]"),
        switch(30, CLIENT, 0),
        switch(50, SERVER, 0).replace("[001]", "[000]"),
    ]
    trace = parse_perf_script("\n".join(on_two_cpus))
    assert round(busy_union(trace, {CLIENT, SERVER}, 1000.0, 1000.0001) * 1e6) == 50


def test_each_role_is_counted_once_per_wakeup_within_a_request() -> None:
    # As `request`, but the page server's reply wakes the client twice (two replicas).
    def twice(t: int) -> list[str]:
        lines = request(t)
        return [*lines[:7], wakeup(t + 107, SERVER, CLIENT), *lines[7:]]

    trace = parse_perf_script("\n".join([*twice(0), *twice(200), *twice(400)]))
    request_figures = breakdown(trace, ROLES, HOPS, PHASES)["phases"]["request"]
    assert request_figures["fio woken"] == 1
    assert request_figures["client woken"] == 3  # by fio, then by each reply
    assert request_figures["page server woken"] == 2  # its I/O thread, then its server thread


def test_the_table_has_a_row_per_workload_and_server() -> None:
    trace = parse_perf_script("\n".join([*request(0), *request(200), *request(400)]))
    remem = breakdown(trace, ROLES, HOPS, PHASES)
    nbdkit_roles = {"fio": {FIO}, "nbdkit": {CLIENT, SERVER, IO_THREAD}}
    nbdkit = breakdown(trace, nbdkit_roles, HOPS, PHASES)
    table = render({w: {"nbdkit": nbdkit, "remem k=2": remem} for w in WORKLOADS})
    rows = [line for line in table.splitlines() if line.startswith("| rand")]
    assert [row.split(" | ")[:2] for row in rows] == [
        ["| randread 4k qd1", "remem k=2"],
        ["| randread 4k qd1", "nbdkit memory"],
        ["| randwrite 4k qd1", "remem k=2"],
        ["| randwrite 4k qd1", "nbdkit memory"],
    ]
    # remem's wake-ups: client 2 (fio's request, the reply), page server 2, no mirror
    # role in this trace, nbdkit none, fio 1.
    assert rows[0].endswith("| 2 / 2 / - / - / 1 |")
