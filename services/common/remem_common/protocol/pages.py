"""Binary payload codecs for page batches: keys, checksums and page data as flat arrays.

Pages are never Python objects one by one: a batch of N pages is a few flat arrays, each
one frame on the wire and one numpy view on arrival (no copy):

- keys:      N x (slab u32, page u32) little-endian, `KEY_DTYPE`, 8 bytes a page
- checksums: N x u32 little-endian CRC-32C of each page's 4096 bytes (as sent: the
             ciphertext when the client encrypts)
- data:      N x 4096 bytes, the pages back to back
- seals:     N x 28 bytes, `SEAL_BYTES`: per page the client's AES-GCM nonce (12 bytes) and
             tag (16 bytes), opaque to the page server, which stores and returns them beside
             the page; all zeros from a client that does not encrypt (see
             `remem_client.sealing`)

Why one data frame of N x 4096 bytes rather than N frames of 4096: the receiver then does a
single vectorized copy into its arena (or out of it) and ZeroMQ one allocation, instead of N
Python-level operations; `unpack_pages` still checks that the frame is an exact multiple of
the page size and matches the declared count, so a short or long page is refused.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import crc32c
import numpy as np
import numpy.typing as npt

from remem_common.protocol.envelope import ErrorCode, ProtocolError

PAGE_SIZE = 4096
# A slab is 16384 pages = 64 MiB: the unit of placement and re-replication. Large enough that
# a 4 GiB device is 64 slabs (a slab map of a few KiB), small enough that re-replicating one
# slab over a LAN takes well under a second and that slabs spread over many servers.
SLAB_PAGES = 16384
SLAB_BYTES = SLAB_PAGES * PAGE_SIZE
# Most pages in one batch message: 1024 pages = 4 MiB, bounding a receiver's per-message memory.
MAX_BATCH_PAGES = 1024

# Batches up to this many pages are checked in plain Python rather than numpy (through
# native-order memoryview casts, so only where native order is the wire's).
SMALL_BATCH = 64
# Batches up to this many pages are served by the page server without a numpy array (the
# `*_words` and `rows_view` codecs below): a numpy call costs a microsecond warm and several
# with the cold caches of a server woken for one message, and most batches are a few pages.
SMALL_PAGES = 16
# Little-endian u32 words of a small batch's keys (two a page) or checksums, by word count.
_U32_WORDS = [struct.Struct(f"<{words}I") for words in range(2 * SMALL_PAGES + 1)]
_LITTLE_ENDIAN = sys.byteorder == "little"

KEY_DTYPE = np.dtype([("slab", "<u4"), ("page", "<u4")])
CRC_DTYPE = np.dtype("<u4")
# Nonce and tag of a page sealed with AES-256-GCM: carried and stored, never read, by the
# page servers.
SEAL_NONCE_BYTES = 12
SEAL_TAG_BYTES = 16
SEAL_BYTES = SEAL_NONCE_BYTES + SEAL_TAG_BYTES

KeyArray = npt.NDArray[np.void]
U32Array = npt.NDArray[np.uint32]
PageArray = npt.NDArray[np.uint8]


def _bad(detail: str) -> ProtocolError:
    return ProtocolError(ErrorCode.MALFORMED, detail, reason="bad_payload")


def check_count(count: int) -> None:
    """Refuse a batch size outside 1..MAX_BATCH_PAGES."""
    if not 1 <= count <= MAX_BATCH_PAGES:
        raise _bad(f"batch of {count} pages; must be 1..{MAX_BATCH_PAGES}")


def make_keys(slabs: Any, pages: Any) -> KeyArray:
    """A key array from two integer sequences (slab ids, page indices within the slab)."""
    slab_arr = np.asarray(slabs, dtype=np.uint32)
    keys = np.empty(slab_arr.shape[0], dtype=KEY_DTYPE)
    keys["slab"] = slab_arr
    keys["page"] = np.asarray(pages, dtype=np.uint32)
    return keys


def unpack_keys(frame: Any, count: int) -> KeyArray:
    """View a keys frame as `count` keys; checks length, page range and duplicates."""
    view = memoryview(frame)
    if view.nbytes != count * KEY_DTYPE.itemsize:
        raise _bad(f"keys frame of {view.nbytes} bytes for {count} pages")
    keys = np.frombuffer(view, dtype=KEY_DTYPE)
    if count <= SMALL_BATCH and _LITTLE_ENDIAN:
        # Plain Python on a few keys: each numpy call below costs microseconds, and most
        # data-plane batches are this small.
        words = view.cast("B").cast("I")
        if count and max(words[1::2]) >= SLAB_PAGES:
            raise _bad(f"page index past the slab's {SLAB_PAGES} pages")
        if count > 1 and len(set(view.cast("B").cast("Q"))) != count:
            raise _bad("the same page twice in one batch")
        return keys
    if int(keys["page"].max()) >= SLAB_PAGES:
        raise _bad(f"page index past the slab's {SLAB_PAGES} pages")
    combined = (keys["slab"].astype(np.uint64) << np.uint64(32)) | keys["page"]
    # Keys in ascending order (a sequential page-out's) hold no duplicate: checked in one
    # pass instead of a sort (256 keys: ~6 us instead of 20).
    if not bool((combined[1:] > combined[:-1]).all()) and np.unique(combined).shape[0] != count:
        raise _bad("the same page twice in one batch")
    return keys


def key_words(frame: Any, count: int) -> tuple[int, ...]:
    """The keys of a batch of `count` <= SMALL_PAGES pages as words (slab, page, slab, page,
    ...); checks what `unpack_keys` checks, with the same errors."""
    view = memoryview(frame)
    if view.nbytes != count * KEY_DTYPE.itemsize:
        raise _bad(f"keys frame of {view.nbytes} bytes for {count} pages")
    words: tuple[int, ...] = _U32_WORDS[2 * count].unpack(view)
    if count and max(words[1::2]) >= SLAB_PAGES:
        raise _bad(f"page index past the slab's {SLAB_PAGES} pages")
    if count > 1 and len(set(zip(words[::2], words[1::2], strict=True))) != count:
        raise _bad("the same page twice in one batch")
    return words


def crc_words(frame: Any, count: int) -> tuple[int, ...]:
    """The checksums of a batch of `count` <= SMALL_PAGES pages; checked as `unpack_crcs`."""
    view = memoryview(frame)
    if view.nbytes != count * CRC_DTYPE.itemsize:
        raise _bad(f"checksum frame of {view.nbytes} bytes for {count} pages")
    crcs: tuple[int, ...] = _U32_WORDS[count].unpack(view)
    return crcs


def unpack_page_indices(frame: Any, count: int) -> U32Array:
    """View a frame of `count` u32 page indices within one slab; checks length and range."""
    view = memoryview(frame)
    if view.nbytes != count * 4:
        raise _bad(f"page index frame of {view.nbytes} bytes for {count} pages")
    pages: U32Array = np.frombuffer(view, dtype=CRC_DTYPE)
    if count and int(pages.max()) >= SLAB_PAGES:
        raise _bad(f"page index past the slab's {SLAB_PAGES} pages")
    if count > 1 and np.unique(pages).shape[0] != count:
        raise _bad("the same page twice in one batch")
    return pages


def unpack_crcs(frame: Any, count: int) -> U32Array:
    """View a checksum frame as `count` u32 values."""
    view = memoryview(frame)
    if view.nbytes != count * CRC_DTYPE.itemsize:
        raise _bad(f"checksum frame of {view.nbytes} bytes for {count} pages")
    crcs: U32Array = np.frombuffer(view, dtype=CRC_DTYPE)
    return crcs


def _rows(frame: Any, count: int, width: int, what: str) -> memoryview:
    view = memoryview(frame)
    if view.nbytes != count * width:
        raise _bad(f"{what} frame of {view.nbytes} bytes is not {count} x {width} bytes")
    return view


def _unpack_rows(frame: Any, count: int, width: int, what: str) -> PageArray:
    rows: PageArray = np.frombuffer(_rows(frame, count, width, what), dtype=np.uint8)
    return rows.reshape(count, width)


def rows_view(frame: Any, count: int, width: int, what: str) -> memoryview:
    """A frame of `count` rows of `width` bytes (the `what` frame: data, seals) as a flat
    byte view; refuses any other length, as `unpack_pages` and `unpack_seals` do."""
    return _rows(frame, count, width, what).cast("B")


def unpack_pages(frame: Any, count: int) -> PageArray:
    """View a data frame as a (count, 4096) uint8 array; refuses any other length."""
    return _unpack_rows(frame, count, PAGE_SIZE, "data")


def unpack_seals(frame: Any, count: int) -> PageArray:
    """View a seals frame as a (count, 28) uint8 array; refuses any other length."""
    return _unpack_rows(frame, count, SEAL_BYTES, "seals")


def checksum_pages(pages: PageArray) -> U32Array:
    """CRC-32C of each row of a (N, 4096) page array (hardware CRC where the CPU has it)."""
    out = np.empty(pages.shape[0], dtype=CRC_DTYPE)
    for index in range(pages.shape[0]):
        out[index] = crc32c.crc32c(pages[index])
    return out


def bad_checksums(pages: PageArray, crcs: U32Array) -> npt.NDArray[np.intp]:
    """Indices of pages whose data does not match their checksum."""
    return np.flatnonzero(checksum_pages(pages) != crcs)


def bad_row_checksums(data: memoryview, crcs: tuple[int, ...]) -> list[int]:
    """`bad_checksums` of a small batch: `data` its pages back to back (`rows_view`)."""
    crc = crc32c.crc32c
    return [
        index
        for index, expected in enumerate(crcs)
        if crc(data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]) != expected
    ]
