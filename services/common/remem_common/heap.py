"""Keep freed buffers for the next requests instead of handing them back to the kernel.

A request's buffers (a 1 MiB page-out and its sealed copy, a batch joined for a page server,
a receive buffer) are freed when it completes. glibc gives a freed chunk of 128 KiB or more
back to the kernel (its own mmap, or trimmed off the top of the heap), so the next request's
buffers are fresh memory that the kernel must find and zero page by page on first touch: at
1 MiB writes, kept memory cut the client's system time per write from ~1,110 to ~670 us
(and page faults had been 12% of the mirror's CPU). On a host short of memory, which is when
a swap device is busy, each such fault may also have to reclaim first: allocation on the I/O
path of the very pressure the process relieves. Serving those sizes from a heap that keeps
what it freed, up to a bound, makes steady-state requests reuse memory the process already
holds (and has locked).
"""

from __future__ import annotations

import ctypes

# glibc mallopt parameters: allocations from this size on get a fresh mmap of their own
# (freed back at once); free memory at the top of the heap past the trim threshold is given
# back to the kernel.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# Any single buffer the services make (an NBD request is at most 32 MiB) comes from the heap.
MMAP_FROM_BYTES = 32 << 20


def keep_freed_memory(keep_bytes: int) -> bool:
    """Serve allocations below MMAP_FROM_BYTES from the heap and keep up to `keep_bytes` of
    freed heap memory (the most the caller holds at once in request buffers); whether glibc
    took the settings (False elsewhere: musl has no mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # mallopt returns 1 on success; setting either threshold also turns off glibc's dynamic
    # adjustment of the other, which would trim the heap back after every large free.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_FROM_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, max(keep_bytes, MMAP_FROM_BYTES))
    )
