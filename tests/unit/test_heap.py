"""remem_common.heap: freed request buffers are reused, not faulted in afresh each time."""

from __future__ import annotations

import subprocess
import sys

# Rounds of what a burst of 1 MiB requests does: 16 buffers held at once, written, freed.
# Prints the minor page faults of every round after the first.
BURSTS = """
import resource, sys
from remem_common.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory(64 << 20)
def burst():
    buffers = [bytearray(1 << 20) for _ in range(16)]
    for buffer in buffers:
        buffer[::4096] = b"x" * 256
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    burst()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults_after_first_burst(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", BURSTS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout)


def test_kept_memory_serves_later_bursts_without_page_faults() -> None:
    # glibc's default gives the 16 MiB back after each burst: ~4,096 faults a burst.
    assert faults_after_first_burst("default") > 10 * 16 * 256 // 2
    assert faults_after_first_burst("keep") < 100
