"""Linux native AIO for the mirror's O_DIRECT writes: a batch of runs in one io_submit.

Why: on these VMs every O_DIRECT pwrite ends in a virtio doorbell (a VM exit) and a sleep
until the device answers. Random page-outs are seldom adjacent, so a batch of 16 page-outs
was 16 pwrites: profiled under fio 4K random writes at QD32, the mirror spent 63% of its CPU
in pwritev, 28% in the doorbell alone and 17% switching back from the sleeps. io_submit
queues a whole batch under one block plug (one doorbell), and the writer sleeps once, in
io_getevents, for all of it.

Python has no binding to it: the syscalls go through libc's syscall() with ctypes (which
releases the GIL while the writer waits), the iocbs live in one numpy array filled a column
at a time (no Python object per write). Where the kernel refuses (ENOSYS, a seccomp filter,
fs.aio-max-nr reached) or the architecture or byte order is not known, `AioWriter.open`
returns None and the store writes one run per pwrite as before.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import sys
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

log = logging.getLogger("mirror")

# (io_setup, io_destroy, io_getevents, io_submit) per machine.
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
IOCB_CMD_PWRITE = 1
# struct iocb as the kernel lays it out on a little-endian machine (aio_abi.h): 64 bytes.
IOCB = np.dtype(
    [
        ("data", "<u8"),
        ("key", "<u4"),
        ("rw_flags", "<i4"),
        ("opcode", "<u2"),
        ("reqprio", "<i2"),
        ("fildes", "<u4"),
        ("buf", "<u8"),
        ("nbytes", "<u8"),
        ("offset", "<i8"),
        ("reserved2", "<u8"),
        ("flags", "<u4"),
        ("resfd", "<u4"),
    ]
)
# struct io_event: the iocb's data, the iocb, its result (bytes or -errno), res2.
IO_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
# A result meaning "never submitted" (io_submit refused it): the caller writes it itself.
NOT_SUBMITTED = -(1 << 62)


def _syscall() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.syscall
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_long
    return func


class AioWriter:
    """An AIO context for pwrites to one fd, with room for `capacity` writes per batch.

    Used by one thread at a time (the mirror's writer); nothing is left in flight between
    calls, so closing never waits.
    """

    def __init__(self, fd: int, capacity: int, ctx: int, syscall: ctypes._CFuncPtr) -> None:  # type: ignore[name-defined]
        self._ctx = ctx
        self._syscall = syscall
        self._setup, self._destroy, self._getevents, self._submit = _SYSCALLS[platform.machine()]
        self._iocbs = np.zeros(capacity, dtype=IOCB)
        self._iocbs["opcode"] = IOCB_CMD_PWRITE
        self._iocbs["fildes"] = fd
        self._iocbs["data"] = np.arange(capacity, dtype=np.uint64)
        base = self._iocbs.ctypes.data
        # io_submit takes an array of pointers to iocbs: one fixed array, pointing at each.
        self._pointers = base + IOCB.itemsize * np.arange(capacity, dtype=np.uint64)
        self._events = np.zeros(capacity, dtype=IO_EVENT)
        self.capacity = capacity

    @classmethod
    def open(cls, fd: int, capacity: int) -> AioWriter | None:
        """An AIO context for `fd`, or None where this kernel or machine cannot give one."""
        numbers = _SYSCALLS.get(platform.machine())
        syscall = _syscall()
        if numbers is None or syscall is None or sys.byteorder != "little":
            return None
        ctx = ctypes.c_ulong(0)
        if syscall(ctypes.c_long(numbers[0]), ctypes.c_long(capacity), ctypes.byref(ctx)) < 0:
            err = ctypes.get_errno()
            log.warning("no Linux AIO (%s): the mirror writes run by run", os.strerror(err))
            return None
        return cls(fd, capacity, ctx.value, syscall)

    def pwrite(
        self, addresses: Sequence[int], sizes: Sequence[int], offsets: Sequence[int]
    ) -> list[int]:
        """Write buffer i (`sizes[i]` bytes at address `addresses[i]`) at `offsets[i]`, all at
        once; returns when every write is done, each one's result: bytes written, -errno,
        or NOT_SUBMITTED. The writes must not overlap (their order is the device's).
        """
        count = len(addresses)
        assert count <= self.capacity
        iocbs = self._iocbs
        iocbs["buf"][:count] = addresses
        iocbs["nbytes"][:count] = sizes
        iocbs["offset"][:count] = offsets
        results = np.full(count, NOT_SUBMITTED, dtype=np.int64)
        submitted = 0
        pointers = self._pointers.ctypes.data
        while submitted < count:
            took = self._syscall(
                ctypes.c_long(self._submit),
                ctypes.c_ulong(self._ctx),
                ctypes.c_long(count - submitted),
                ctypes.c_void_p(pointers + 8 * submitted),
            )
            if took < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                # EAGAIN and the like: what was not submitted is written by the caller.
                break
            submitted += took
        self._collect(submitted, results)
        return results.tolist()

    def _collect(self, submitted: int, results: npt.NDArray[np.int64]) -> None:
        events = self._events
        done = 0
        while done < submitted:
            got = self._syscall(
                ctypes.c_long(self._getevents),
                ctypes.c_ulong(self._ctx),
                ctypes.c_long(submitted - done),
                ctypes.c_long(submitted - done),
                ctypes.c_void_p(events.ctypes.data),
                None,
            )
            if got < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                # Cannot happen with a valid context; losing track of writes in flight would
                # let them land after later ones, so this is fatal for the writer.
                raise OSError(err, f"io_getevents: {os.strerror(err)}")
            taken = events[:got]
            results[taken["data"].astype(np.intp)] = taken["res"]
            done += got

    def close(self) -> None:
        if self._ctx:
            self._syscall(ctypes.c_long(self._destroy), ctypes.c_ulong(self._ctx))
            self._ctx = 0
