"""One line per fuzzed socket (examples sent, rejections counted by the service), printed at
the end of the run by `tests/conftest.py` so `make test-fuzz` shows the figures together.
"""

from __future__ import annotations

import os

LINES: list[str] = []


def scaled(default: int) -> int:
    """A ZeroMQ fuzzer's example count: `default` times REMEM_ZMQ_FUZZ_SCALE (make test-fuzz)."""
    return max(1, round(default * float(os.environ.get("REMEM_ZMQ_FUZZ_SCALE", "1"))))


def record(line: str) -> None:
    """Keep `line` for the terminal summary."""
    LINES.append(line)
