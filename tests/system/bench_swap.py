"""Benchmark: how long the Linux kernel takes to swap a memory hog out to and back in from
remem, against `nbdkit memory` in the same run (root; the harness of `kernel_swap`).

    python -m tests.system.bench_swap [--hog-mib 1024] [--limit-mib 128] [--rounds 2]

Each round swaps the same hog through `nbdkit memory` and through `remem up` (placement,
three page servers, two replicas, the mirror), alternating which goes first to cancel drift
on a noisy machine. Every byte is verified each time; a round with an error fails the run.
Prints the mean time of each and remem/nbdkit (lower is better: 1.25 means 25% slower);
the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path

from remem_client.bench_nbd import start_nbdkit
from remem_common.testing import start_service

from .kernel_swap import SwapResult, available, run_hog


@contextmanager
def nbdkit_memory(directory: Path, size: str) -> Iterator[str]:
    server = start_nbdkit(directory, size)
    try:
        yield server.uri
    finally:
        server.proc.terminate()
        server.proc.wait(timeout=30)


@contextmanager
def remem_up(directory: Path, size: str, extra: list[str]) -> Iterator[str]:
    cluster = start_service(
        "up",
        ["up", "--state-dir", str(directory / "state"), "--size", size, "--forget", *extra],
        timeout=300,
    )
    try:
        yield cluster.ready["nbd_uri"]
    finally:
        cluster.stop(timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.bench_swap", description=__doc__)
    parser.add_argument("--hog-mib", type=int, default=1024, help="memory the hog touches")
    parser.add_argument("--limit-mib", type=int, default=128, help="the hog's cgroup RAM")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-mirror", action="store_true", help="remem up --no-mirror")
    args = parser.parse_args(argv)
    why_not = available()
    if why_not or shutil.which("nbdkit") is None:
        sys.stderr.write(f"bench_swap: cannot run here: {why_not or 'nbdkit missing'}\n")
        return 2
    size = f"{max(2, -(-2 * args.hog_mib // 1024))}GiB"
    extra = ["--no-mirror"] if args.no_mirror else []
    runners: dict[str, Callable[[Path], AbstractContextManager[str]]] = {
        "nbdkit": lambda d: nbdkit_memory(d, size.removesuffix("iB")),
        "remem": lambda d: remem_up(d, size, extra),
    }
    samples: dict[str, list[SwapResult]] = {name: [] for name in runners}
    for round_number in range(args.rounds):
        order = list(runners) if round_number % 2 == 0 else list(reversed(runners))
        for name in order:
            with tempfile.TemporaryDirectory(prefix=f"remem-bench-swap-{name}-") as tmp:
                work = Path(tmp) / "work"
                work.mkdir()
                with runners[name](Path(tmp)) as uri:
                    result = run_hog(uri, work, hog_mib=args.hog_mib, limit_mib=args.limit_mib)
            print(
                f"round {round_number + 1} {name}: {result.total_s:.1f} s, "
                f"{result.errors} bad pages, out {result.swapped_out_mib} MiB, "
                f"in {result.swapped_in_mib} MiB",
                flush=True,
            )
            if not result.ok:
                sys.stderr.write(f"bench_swap: {name} failed: {result}\n")
                return 1
            samples[name].append(result)
    mean = {name: sum(r.total_s for r in rs) / len(rs) for name, rs in samples.items()}
    ratio = mean["remem"] / mean["nbdkit"]
    print(
        f"{args.hog_mib} MiB hog in {args.limit_mib} MiB of RAM: nbdkit memory "
        f"{mean['nbdkit']:.1f} s, remem up {mean['remem']:.1f} s, remem/nbdkit {ratio:.2f}"
    )
    summary = {
        "bench": "kernel_swap",
        "hog_mib": args.hog_mib,
        "limit_mib": args.limit_mib,
        "mirror": not args.no_mirror,
        "mean_s": mean,
        "ratio": ratio,
        "samples": {name: [asdict(r) for r in rs] for name, rs in samples.items()},
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
