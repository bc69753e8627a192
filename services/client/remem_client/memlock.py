"""Keep the swap server out of the memory pressure it relieves.

When the kernel swaps to remem, this process is on the page-out path: if its own pages
were swapped out, or it were throttled on dirty-page writeback, or the OOM killer picked
it, the host would deadlock waiting on it (nbdkit `--swap` solves the same problem).
`protect_process` asks for three things, each best effort, each logged if refused:

* mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT): never swap our pages. MCL_ONFAULT
  (Linux 4.4+) locks pages as they are touched instead of populating every mapping at
  once, so a large sparse mapping (the memory backend) costs nothing until written. Needs
  CAP_IPC_LOCK or a large enough RLIMIT_MEMLOCK; with a finite limit, MCL_FUTURE would make
  every later allocation beyond it fail with ENOMEM, so without the capability and with
  a finite limit we skip locking rather than break the process later.
* prctl(PR_SET_IO_FLUSHER, 1): the kernel treats us as part of the I/O path (no
  reclaim recursion into I/O, no writeback throttling). Needs CAP_SYS_RESOURCE, Linux 5.6+.
* oom_score_adj = -1000: the OOM killer leaves us alone. Lowering it needs
  CAP_SYS_RESOURCE.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

MCL_CURRENT = 1
MCL_FUTURE = 2
MCL_ONFAULT = 4
PR_SET_IO_FLUSHER = 57
CAP_IPC_LOCK = 14
OOM_SCORE_ADJ_MIN = -1000
OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


@dataclass(frozen=True)
class Protection:
    """Which of the three protections are in force."""

    memory_locked: bool
    io_flusher: bool
    oom_protected: bool


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _has_capability(bit: int) -> bool:
    """Whether the effective capability set holds `bit` (from /proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << bit))
    except OSError:
        pass
    return False


def lock_all_memory(libc: ctypes.CDLL, log: logging.Logger) -> bool:
    """mlockall current and future pages (lazily where the kernel can); True on success."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_capability(CAP_IPC_LOCK):
        log.warning(
            "memory not locked: no CAP_IPC_LOCK and RLIMIT_MEMLOCK is %d bytes; locking "
            "future allocations would make them fail (run as root or raise `ulimit -l`)",
            soft,
        )
        return False
    for flags in (MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT, MCL_CURRENT | MCL_FUTURE):
        if libc.mlockall(flags) == 0:
            if not flags & MCL_ONFAULT:
                log.info("mlockall without MCL_ONFAULT: every mapping is populated up front")
            return True
        err = ctypes.get_errno()
        if err != errno.EINVAL:  # EINVAL: MCL_ONFAULT unknown to this kernel, retry without
            break
    log.warning("memory not locked: mlockall failed: %s", os.strerror(err))
    return False


def set_io_flusher(libc: ctypes.CDLL, log: logging.Logger) -> bool:
    """prctl(PR_SET_IO_FLUSHER, 1); True on success."""
    if libc.prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) == 0:
        return True
    err = ctypes.get_errno()
    log.warning("PR_SET_IO_FLUSHER not set: %s", os.strerror(err))
    return False


def protect_from_oom(log: logging.Logger, path: Path = OOM_SCORE_ADJ) -> bool:
    """Write oom_score_adj = -1000; True on success."""
    try:
        path.write_text(f"{OOM_SCORE_ADJ_MIN}\n")
    except OSError as exc:
        log.warning("oom_score_adj not lowered: %s", exc.strerror or exc)
        return False
    return True


def protect_process(log: logging.Logger) -> Protection:
    """Apply all three protections, logging (never raising on) each one refused."""
    libc = _libc()
    result = Protection(
        memory_locked=lock_all_memory(libc, log),
        io_flusher=set_io_flusher(libc, log),
        oom_protected=protect_from_oom(log),
    )
    log.info(
        "process protection memory_locked=%s io_flusher=%s oom_protected=%s",
        result.memory_locked,
        result.io_flusher,
        result.oom_protected,
    )
    return result
