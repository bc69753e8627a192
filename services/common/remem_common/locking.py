"""Files one process must hold alone (an arena, a mirror, a nonce state): an exclusive lock
taken right after the open, without waiting, so a second process fails at start."""

from __future__ import annotations

import fcntl
import os


def lock_exclusive(fd: int) -> bool:
    """Take an exclusive `flock` on `fd` unless another process holds one.

    Returns:
        True once locked (the lock lasts until `fd` is closed); False if another process
        holds the file, and then `fd` is closed (the caller raises its own error).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    return True
