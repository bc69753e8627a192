"""`make bench`: run every part, write BENCHMARKS.md and its chart, print the tables.

    python -m tests.bench [--runtime 5] [--rounds 2] [--parts fio cluster pageserver swap]
                          [--out BENCHMARKS.md] [--json FILE] [--render FILE]

A part that fails is reported as failed in BENCHMARKS.md and the run goes on with the
others; the exit status is then 1. The kernel-swap part runs only as root (it is reported
as "skipped (needs root)" otherwise). `--json FILE` also saves the results; `--render
FILE` writes BENCHMARKS.md and the chart again from saved results, without measuring.
The last line printed is the results as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from remem_client.bench_nbd import fill, running

from .cluster_figures import client_metadata, failover, pageserver_bench
from .fio_rows import K2, run_fio_rows, starters
from .phases import measure as measure_phases
from .report import REPO, machine_info, render_markdown
from .swap import run_swap

PARTS = ("fio", "cluster", "pageserver", "phases", "swap")
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size_bytes(size: str) -> int:
    """nbdkit's size syntax (1G = 2**30 bytes), as bench_nbd passes it to both servers."""
    if size[-1:] in UNITS:
        return int(size[:-1]) * UNITS[size[-1]]
    return int(size)


class Run:
    """The results being gathered, and which parts failed."""

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.failed: list[str] = []

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        """Time a part; an exception records it as failed (with the error) and moves on."""
        started = time.monotonic()
        print(f"== {name}", flush=True)
        try:
            yield
        except Exception as exc:
            traceback.print_exc()
            self.failed.append(name)
            self.results[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        finally:
            self.results.setdefault("phases_s", {})[name] = round(time.monotonic() - started, 1)

    def measure(self, name: str, figures: Callable[[], dict[str, Any]]) -> None:
        with self.part(name):
            self.results[name] = figures()


def measure_clusters(run: Run, args: argparse.Namespace) -> None:
    """The fio table, then (on its k=2 cluster) metadata, failover and re-replication."""
    wanted = starters(args.size)
    if "fio" not in args.parts:
        wanted = wanted[2:3]  # the k=2 cluster alone
    with run.part("servers"), running(wanted) as servers:
        k2 = next(s for s in servers if s.name == K2)
        if "fio" in args.parts:
            run.measure(
                "fio",
                lambda: {"rows": run_fio_rows(servers, args.region, args.runtime, args.rounds)},
            )
        else:
            fill(k2, args.region)
        if "cluster" in args.parts:
            run.measure("metadata", lambda: client_metadata(k2, size_bytes(args.size)))
            run.measure("failover", lambda: failover(k2, args.region, args.failover_runtime))
    if "servers" in run.failed:  # every part they were for failed with them
        parts = ["fio"] if "fio" in args.parts else []
        parts += ["metadata", "failover"] if "cluster" in args.parts else []
        for name in parts:
            run.results.setdefault(name, run.results["servers"])


def write_report(results: dict[str, Any], out: Path) -> str:
    """BENCHMARKS.md at `out` and the chart beside it (same name, .png); returns the text."""
    chart = out.with_suffix(".png")
    from .chart import render_chart

    render_chart(results, chart)
    text = render_markdown(results, chart.name)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    parser.add_argument("--runtime", type=float, default=5.0, help="seconds per fio run")
    parser.add_argument("--rounds", type=int, default=2, help="fio runs per server/workload")
    parser.add_argument("--size", default="1G", help="device size of every server")
    parser.add_argument("--region", default="256M", help="part of the device fio touches")
    parser.add_argument("--failover-runtime", type=float, default=10.0, help="fio seconds")
    parser.add_argument("--pageserver-pages", type=int, default=1 << 20)
    parser.add_argument("--phases-seconds", type=float, default=1.0, help="QD1 trace length")
    parser.add_argument("--swap-hog-mib", type=int, default=512)
    parser.add_argument("--swap-limit-mib", type=int, default=128)
    parser.add_argument("--swap-rounds", type=int, default=2)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, help="also save the results here")
    parser.add_argument("--render", type=Path, help="only write the report from saved results")
    args = parser.parse_args(argv)
    if args.render:
        print(write_report(json.loads(args.render.read_text()), args.out))
        return 0
    for tool in ("nbdkit", "fio"):
        if shutil.which(tool) is None:
            sys.stderr.write(f"bench: {tool} not found (make deps)\n")
            return 2

    started = time.monotonic()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run = Run(
        {
            "bench": "suite",
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine_info(),
            "settings": settings,
        }
    )
    if {"fio", "cluster"} & set(args.parts):
        measure_clusters(run, args)
    if "pageserver" in args.parts:
        run.measure("pageserver", lambda: pageserver_bench(args.pageserver_pages))
    if "phases" in args.parts:
        run.measure("phases", lambda: measure_phases(args.phases_seconds))
    if "swap" in args.parts:
        run.measure(
            "swap", lambda: run_swap(args.swap_hog_mib, args.swap_limit_mib, args.swap_rounds)
        )
    results = run.results
    results["machine"]["load_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    print(write_report(results, args.out))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}", flush=True)
    if run.failed:
        print(f"bench: failed parts: {', '.join(run.failed)}", file=sys.stderr)
    print(json.dumps(results, sort_keys=True))
    return 1 if run.failed else 0
