"""Checking a large batch's page checksums with one CRC over the whole batch.

Why: a put of 256 pages (1 MiB) spent ~105 us in 256 calls of crc32c, ~0.2 us of each the
call itself; one call over the whole MiB takes ~40 us. The CRC-32C of the batch follows from
the pages' own checksums (CRC is linear: appending a 4 KiB page shifts the register by a
fixed linear map Z, then XORs in what the page alone adds), so comparing the batch's CRC
with the one its pages' checksums predict checks them all at once.

What it catches: any batch where exactly one page does not match its checksum (Z is
invertible, so that page's error cannot vanish), and pages in the wrong order; pages
with errors that cancel out pass with the odds of a CRC-32 collision (2^-32), the same as a
corrupted page whose own CRC happens to match. A mismatch is not reported from here: the
caller then checks page by page, to name the pages (and refuse the batch) as before.

The math, with R(data, s) the CRC register after `data` from state s, X = 0xFFFFFFFF and
c_i = crc32c(page i) = R(page_i, X) ^ X: R(page_i, s) = Z(s) ^ R(page_i, 0), and
R(page_i, 0) = c_i ^ X ^ Z(X), so after n pages from X the register is
Z^n(X) ^ XOR_i Z^(n-1-i)(c_i ^ K), K = X ^ Z(X). Z^e of a word is four table look-ups (one
per byte); e = 32q + r is applied as Z^r per page, XORed per 32 pages, then Z^(32q) per
group, so the tables stay small (65 x 4 x 256 words, 266 KiB).
"""

from __future__ import annotations

import crc32c
import numpy as np
import numpy.typing as npt
from remem_common.protocol.pages import MAX_BATCH_PAGES, PAGE_SIZE

# Batches of at least this many pages are checked whole (below it the numpy calls cost more
# than the crc32c calls they save).
WHOLE_BATCH_PAGES = 64
_GROUP = 32  # pages per group: Z^r within a group, Z^(32q) across groups
_X = 0xFFFFFFFF
_SHIFTS = np.array([0, 8, 16, 24], dtype=np.uint32)

Tables = npt.NDArray[np.uint32]  # (exponents, 4, 256): Z^e of each byte value at byte j


def _apply(tables: Tables, words: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """The linear map whose byte tables are `tables` (4 x 256) applied to each word."""
    out: npt.NDArray[np.uint32] = tables[0][words & 0xFF]
    for j in range(1, 4):
        out ^= tables[j][(words >> _SHIFTS[j]) & 0xFF]
    return out


def _powers(step: Tables, count: int) -> Tables:
    """Byte tables of step^0 .. step^(count - 1)."""
    identity = (np.arange(256, dtype=np.uint32)[None, :] << _SHIFTS[:, None]).astype(np.uint32)
    powers = np.empty((count, 4, 256), dtype=np.uint32)
    powers[0] = identity
    for power in range(1, count):
        powers[power] = _apply(step, powers[power - 1])
    return powers


def _shift_tables() -> tuple[Tables, Tables, int]:
    """(Z^r for r < 32, Z^(32q) for every q a batch needs, K)."""
    zeros = bytes(PAGE_SIZE)
    step = np.array(
        [[crc32c.crc32c(zeros, (b << (8 * j)) ^ _X) ^ _X for b in range(256)] for j in range(4)],
        dtype=np.uint32,
    )
    low = _powers(step, _GROUP)
    high = _powers(_apply(step, low[_GROUP - 1]), (MAX_BATCH_PAGES + 1) // _GROUP + 1)
    k = _X ^ int(_apply(step, np.array([_X], dtype=np.uint32))[0])
    return low, high, k


_LOW, _HIGH, _K = _shift_tables()
_LOW_WORDS = _LOW.reshape(-1)
_HIGH_WORDS = _HIGH.reshape(-1)
# Where word e's byte j is looked up: Z^(e % 32)'s table of byte j (then + the byte), and
# for group q, Z^(32q)'s.
_BYTE_AT = np.arange(4, dtype=np.int32) * 256
_LOW_AT = (np.arange(_HIGH.shape[0] * _GROUP, dtype=np.int32) % _GROUP)[:, None] * 1024 + _BYTE_AT
_HIGH_AT = np.arange(_HIGH.shape[0], dtype=np.int32)[:, None] * 1024 + _BYTE_AT


def _bytes(words: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint8]:
    """Each word's bytes, least significant first: (len(words), 4)."""
    little: npt.NDArray[np.uint32] = words.astype("<u4", copy=False)
    return little.view(np.uint8).reshape(-1, 4)


def predicted_crc(crcs: npt.NDArray[np.uint32]) -> int:
    """The CRC-32C of the pages whose checksums are `crcs`, back to back."""
    count = crcs.shape[0]
    # Word e is shifted by Z^e: the last page's term by Z^0, ..., the first's by
    # Z^(count-1), and the initial register X (word `count`) by Z^count.
    groups = count // _GROUP + 1
    size = groups * _GROUP
    words = np.zeros(size, dtype=np.uint32)
    words[:count] = crcs[::-1] ^ np.uint32(_K)
    words[count] = _X
    low = _LOW_WORDS.take(_LOW_AT[:size] + _bytes(words))
    grouped = np.bitwise_xor.reduce(low.reshape(groups, _GROUP * 4), axis=1)
    high = _HIGH_WORDS.take(_HIGH_AT[:groups] + _bytes(grouped))
    return int(np.bitwise_xor.reduce(high, axis=None)) ^ _X


def batch_matches(pages: npt.NDArray[np.uint8], crcs: npt.NDArray[np.uint32]) -> bool:
    """Whether the pages (N x 4096, contiguous) have the CRC-32C their checksums `crcs`
    predict. True: every page matches its checksum (bar a 2^-32 chance: see the module
    docstring); False: some page does not."""
    return bool(crc32c.crc32c(pages.data) == predicted_crc(crcs))
