"""Page encryption: every page leaves the client host sealed with AES-256-GCM.

A page server (or anyone reading its memory or its /dev/shm arena) holds only ciphertext; a
page it altered, or moved to another address, fails authentication on the way back and the
client reads another replica instead. No transport code here: the remote backend calls
`PageSealer.seal` before a write and `PageSealer.open_into` after a read's checksum check.

Per page (protocol.pages): the ciphertext is as long as the page (4096 bytes, so the page
server's slots and checksums are unchanged), and a 28-byte seal travels and is stored beside
it: the 12-byte nonce, then the 16-byte tag. The associated data binds the ciphertext to its
place: tenant, volume, slab and page index (`_AAD_TAIL`), so a page served for another
address does not authenticate.

The key is 32 random bytes in a file (mode 0600) that never leaves the client host;
`open_page_sealer` creates it on first use. Nonces are a 96-bit counter (12 bytes little
endian) that must never repeat under one key, across crashes too: its high-water mark is
reserved in blocks of `NONCE_BLOCK` in a small state file beside the key (KEY.nonce),
fsynced before any nonce of a new block is used, so a restarted client starts past every
nonce the last one may have used. The state file holds two checksummed records written in
turn (a torn write leaves the other, older one, whose block was never used past its end)
and is locked while a client runs: two clients sharing a key would repeat nonces.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from remem_common.locking import lock_exclusive
from remem_common.protocol.pages import (
    PAGE_SIZE,
    SEAL_BYTES,
    SEAL_NONCE_BYTES,
    SEAL_TAG_BYTES,
    SLAB_PAGES,
    PageArray,
)

log = logging.getLogger("client.sealing")

KEY_BYTES = 32
# Nonces reserved per fsync of the state file: 2**22 pages = 16 GiB of page-outs, so the
# write path touches the disk about never, and a restart skips at most that many of 2**96.
NONCE_BLOCK = 1 << 22
NONCE_LIMIT = 1 << (8 * SEAL_NONCE_BYTES)
# A nonce: the counter's low 64 bits, then its high 32, little endian.
_NONCE = struct.Struct("<QI")
_LOW64_MASK = (1 << 64) - 1
STATE_MAGIC = b"REMEMNC1"
# magic, high-water mark (16 bytes little endian, < 2**96), CRC-32C of the two, padding.
STATE_RECORD = struct.Struct("<8s16sI4x")
STATE_SLOTS = 2
# Batches from this many pages are sealed and opened with their layout done per batch.
BATCH_LAYOUT_PAGES = 64
# Associated data of a page: a fixed prefix per device (domain tag, tenant, volume), then
# the page's slab and index, rewritten in place for each page.
_AAD_DOMAIN = b"remem-page-v1\0"
_AAD_TAIL = struct.Struct("<II")


class SealingError(Exception):
    """The key or the nonce state cannot be used safely; the message says why and what to do."""


class NonceCounter:
    """A 96-bit counter whose values are never handed out twice, across restarts.

    `take(n)` returns the first of n consecutive fresh values. Values are reserved in blocks
    in the state file (fsynced before use), and the file is locked for the counter's life.
    """

    def __init__(self, path: Path, *, block: int = NONCE_BLOCK) -> None:
        self.path = path
        self.block = block
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if not lock_exclusive(self._fd):
            raise SealingError(
                f"nonce state {path} is locked by another client: two clients must never "
                "share a page key"
            )
        self.existed = os.fstat(self._fd).st_size > 0
        marks = self._read_marks()
        if self.existed and not marks:
            os.close(self._fd)
            raise SealingError(
                f"nonce state {path} is unreadable, so nonces already used under its key "
                "are unknown; move the key away to start over with a new one (pages sealed "
                "with the old key become unreadable)"
            )
        self._next = max(marks.values(), default=0)
        # Overwrite the record that does not hold the newest mark.
        newest = max(marks, key=lambda slot: marks[slot], default=STATE_SLOTS - 1)
        self._slot = (newest + 1) % STATE_SLOTS
        self._limit = self._next

    def begin(self) -> None:
        """Reserve the first block (durably) before any value is taken."""
        self._reserve(0)
        if not self.existed:
            _fsync_dir(self.path.parent)  # the new file's name must survive a crash too
            self.existed = True

    def discard(self) -> None:
        """Close, and remove the state file if this counter created it and never began."""
        if not self.existed:
            self.path.unlink(missing_ok=True)
        self.close()

    def _read_marks(self) -> dict[int, int]:
        raw = os.pread(self._fd, STATE_RECORD.size * STATE_SLOTS, 0)
        marks = {}
        for slot in range(STATE_SLOTS):
            record = raw[slot * STATE_RECORD.size : (slot + 1) * STATE_RECORD.size]
            if len(record) < STATE_RECORD.size:
                continue
            magic, mark_bytes, checksum = STATE_RECORD.unpack(record)
            if magic != STATE_MAGIC or crc32c.crc32c(magic + mark_bytes) != checksum:
                continue
            mark = int.from_bytes(mark_bytes, "little")
            if mark <= NONCE_LIMIT:
                marks[slot] = mark
        return marks

    def _reserve(self, need: int) -> None:
        """Make [next, next + need) usable: durably move the high-water mark past it."""
        mark = self._next + max(need, self.block)
        if mark > NONCE_LIMIT:
            raise SealingError(
                f"the page key's 2**96 nonces are used up ({self.path}); start with a new key"
            )
        mark_bytes = mark.to_bytes(16, "little")
        record = STATE_RECORD.pack(STATE_MAGIC, mark_bytes, crc32c.crc32c(STATE_MAGIC + mark_bytes))
        os.pwrite(self._fd, record, self._slot * STATE_RECORD.size)
        os.fsync(self._fd)
        self._slot = (self._slot + 1) % STATE_SLOTS
        self._limit = mark

    @property
    def next_value(self) -> int:
        return self._next

    @property
    def reserved_until(self) -> int:
        return self._limit

    def take(self, count: int) -> int:
        """The first of `count` consecutive values never handed out before."""
        if self._next + count > self._limit:
            self._reserve(count)
        first = self._next
        self._next = first + count
        return first

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


class PageSealer:
    """AES-256-GCM of one device's pages: one cipher object, one call per page.

    Batches of BATCH_LAYOUT_PAGES or more (1 MiB reads and writes) keep the per-page Python
    to that one call: nonces, associated data and tags are laid out with a few numpy
    operations per batch, and no page is copied to join it with its tag (AESGCM wants
    ciphertext and tag adjacent). Page i's tag goes in the 16 bytes after its row, the head
    of row i+1: even pages are done in one pass and odd pages in another, so the head a pass
    writes belongs to a row that pass does not read, and is put back after. Smaller batches
    go page by page, which costs less than laying out a batch.
    """

    def __init__(self, key: bytes, nonces: NonceCounter, *, tenant: str, volume: int) -> None:
        if len(key) != KEY_BYTES:
            raise SealingError(f"a page key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._nonces = nonces
        prefix = _AAD_DOMAIN + bytes([len(tenant)]) + tenant.encode() + struct.pack("<I", volume)
        self._aad_prefix = np.frombuffer(prefix, dtype=np.uint8)
        self._aad_size = len(prefix) + _AAD_TAIL.size
        # One page's associated data, its tail rewritten in place per page (small batches).
        self._aad = bytearray(prefix + bytes(_AAD_TAIL.size))
        self._aad_tail = len(prefix)
        # ciphertext || tag of one page, assembled for decrypt_into where the ciphertext
        # cannot take its tag beside it (small batches, a read-only buffer, the last row).
        self._joined = memoryview(bytearray(PAGE_SIZE + SEAL_TAG_BYTES))

    @property
    def nonces(self) -> NonceCounter:
        return self._nonces

    def _aads(self, slabs: Any, pages: Any) -> bytes:
        """Associated data of each page, back to back (`_aad_size` bytes each; bytes, as
        slicing bytes this small costs less than slicing a memoryview)."""
        count = len(pages)
        prefix = self._aad_prefix.size
        aads = np.empty((count, self._aad_size), dtype=np.uint8)
        aads[:, :prefix] = self._aad_prefix
        tail = aads[:, prefix:].view("<u4")  # (count, 2): slab, page index
        tail[:, 0] = slabs
        tail[:, 1] = pages
        return aads.tobytes()

    def seal(self, first: int, plain: PageArray) -> tuple[PageArray, PageArray]:
        """Encrypt device pages first, first + 1, ...; returns (ciphertext, seals) arrays of
        shapes (N, 4096) and (N, 28), fresh nonces in the seals."""
        count = plain.shape[0]
        if count == 1 and plain.flags.c_contiguous:
            return self._seal_one(first, plain)
        seals = np.empty((count, SEAL_BYTES), dtype=np.uint8)
        if count < BATCH_LAYOUT_PAGES:
            return self._seal_each(first, plain, seals), seals
        _fill_nonces(seals, self._nonces.take(count))
        nonces = seals[:, :SEAL_NONCE_BYTES].tobytes()
        numbers = first + np.arange(count, dtype=np.int64)
        aads = self._aads(numbers // SLAB_PAGES, numbers % SLAB_PAGES)
        # The ciphertext rows are the frame that is sent; a spare head past the last row
        # takes the last page's tag.
        out = np.empty(count * PAGE_SIZE + SEAL_TAG_BYTES, dtype=np.uint8)
        heads = _heads(out, count + 1)
        plain_view = np.ascontiguousarray(plain).data.cast("B")
        encrypt_into, out_view = self._aead.encrypt_into, out.data
        self._pages(encrypt_into, nonces, plain_view, aads, out_view, range(0, count, 2))
        seals[0::2, SEAL_NONCE_BYTES:] = heads[1::2]
        if count > 1:
            even_heads = heads[2:count:2].copy()  # ciphertext the odd pages' tags land on
            self._pages(encrypt_into, nonces, plain_view, aads, out_view, range(1, count, 2))
            seals[1::2, SEAL_NONCE_BYTES:] = heads[2::2]
            heads[2:count:2] = even_heads
        cipher: PageArray = out[: count * PAGE_SIZE].reshape(count, PAGE_SIZE)
        return cipher, seals

    def _seal_one(self, page: int, plain: PageArray) -> tuple[PageArray, PageArray]:
        """`seal` of one page (most swap writes), with the fewest buffers and views."""
        value = self._nonces.take(1)
        aad = self._aad
        _AAD_TAIL.pack_into(aad, self._aad_tail, page // SLAB_PAGES, page % SLAB_PAGES)
        nonce = _NONCE.pack(value & _LOW64_MASK, value >> 64)
        out = bytearray(PAGE_SIZE + SEAL_TAG_BYTES)
        self._aead.encrypt_into(nonce, plain.data, aad, out)
        seals: PageArray = np.frombuffer(nonce + out[PAGE_SIZE:], dtype=np.uint8).reshape(
            1, SEAL_BYTES
        )
        cipher: PageArray = np.frombuffer(out, dtype=np.uint8, count=PAGE_SIZE).reshape(
            1, PAGE_SIZE
        )
        return cipher, seals

    def _seal_each(self, first: int, plain: PageArray, seals: PageArray) -> PageArray:
        count = plain.shape[0]
        nonce = self._nonces.take(count)
        # Each page's ciphertext and tag are written at its row with the tag spilling 16
        # bytes into the next row; the tag is copied out before the next page overwrites
        # it. So no per-page buffer, and the ciphertext rows are the frame that is sent.
        out = np.empty(count * PAGE_SIZE + SEAL_TAG_BYTES, dtype=np.uint8)
        out_view = out.data
        plain_view = np.ascontiguousarray(plain).data.cast("B")
        seal_view = seals.data.cast("B")
        aad, tail, encrypt_into = self._aad, self._aad_tail, self._aead.encrypt_into
        for index in range(count):
            page = first + index
            _AAD_TAIL.pack_into(aad, tail, page // SLAB_PAGES, page % SLAB_PAGES)
            value = nonce + index
            _NONCE.pack_into(seal_view, index * SEAL_BYTES, value & _LOW64_MASK, value >> 64)
            start = index * PAGE_SIZE
            end = start + PAGE_SIZE
            at = index * SEAL_BYTES
            encrypt_into(
                seal_view[at : at + SEAL_NONCE_BYTES],
                plain_view[start:end],
                aad,
                out_view[start : end + SEAL_TAG_BYTES],
            )
            seal_view[at + SEAL_NONCE_BYTES : at + SEAL_BYTES] = out_view[
                end : end + SEAL_TAG_BYTES
            ]
        cipher: PageArray = out[: count * PAGE_SIZE].reshape(count, PAGE_SIZE)
        return cipher

    def open_into(
        self, slab: int, pages: Iterable[int], cipher: Any, seals: Any, out: Any
    ) -> list[int]:
        """Authenticate and decrypt pages of one slab.

        Args:
            slab: the slab every page belongs to.
            pages: page index within the slab of each row, in row order.
            cipher, seals, out: contiguous buffers of N x 4096, N x 28 and N x 4096 bytes
                (`out` writable, apart from `cipher`); row i of `out` gets page i's
                plaintext. A writable `cipher` is changed while this runs (each page's tag
                is put beside it) and is as it was when this returns.

        Returns:
            Rows that failed authentication (their `out` rows are undefined); usually [].
        """
        cipher_view = memoryview(cipher).cast("B")
        if cipher_view.nbytes < BATCH_LAYOUT_PAGES * PAGE_SIZE:
            return self._open_each(slab, pages, cipher_view, seals, out)
        if isinstance(pages, range):
            numbers = np.arange(pages.start, pages.stop, pages.step, dtype=np.int64)
        else:
            numbers = np.asarray(pages, dtype=np.int64)
        count = numbers.size
        aads = self._aads(slab, numbers)
        seal_rows = np.frombuffer(memoryview(seals).cast("B"), dtype=np.uint8).reshape(
            count, SEAL_BYTES
        )
        nonces = seal_rows[:, :SEAL_NONCE_BYTES].tobytes()
        tags = seal_rows[:, SEAL_NONCE_BYTES:]
        out_view = memoryview(out).cast("B")
        decrypt_into = self._aead.decrypt_into
        failed: list[int] = []
        # Every row but the last (no row after it takes its tag), tags in the next row's
        # head; a read-only `cipher` (read-ahead's bytes) takes the copying path below.
        joined_rows = range(count)
        if not cipher_view.readonly:
            joined_rows = range(count - 1, count)
            heads = _heads(np.frombuffer(cipher_view, dtype=np.uint8), count)
            saved = heads[1:].copy()
            try:
                heads[1::2] = tags[0 : count - 1 : 2]
                self._pages(
                    decrypt_into,
                    nonces,
                    cipher_view,
                    aads,
                    out_view,
                    range(0, count - 1, 2),
                    failed,
                )
                heads[1::2] = saved[0::2]  # the odd rows' own ciphertext, for their pass
                heads[2::2] = tags[1 : count - 1 : 2]
                self._pages(
                    decrypt_into,
                    nonces,
                    cipher_view,
                    aads,
                    out_view,
                    range(1, count - 1, 2),
                    failed,
                )
            finally:
                heads[1:] = saved
        joined = self._joined
        aad_size = self._aad_size
        for index in joined_rows:
            start = index * PAGE_SIZE
            joined[:PAGE_SIZE] = cipher_view[start : start + PAGE_SIZE]
            joined[PAGE_SIZE:] = tags[index]
            try:
                decrypt_into(
                    nonces[index * SEAL_NONCE_BYTES : (index + 1) * SEAL_NONCE_BYTES],
                    joined,
                    aads[index * aad_size : (index + 1) * aad_size],
                    out_view[start : start + PAGE_SIZE],
                )
            except InvalidTag:
                failed.append(index)
        failed.sort()
        return failed

    def _open_each(
        self, slab: int, pages: Iterable[int], cipher_view: memoryview, seals: Any, out: Any
    ) -> list[int]:
        seal_view = memoryview(seals).cast("B")
        out_view = memoryview(out).cast("B")
        joined = self._joined
        aad, tail, decrypt_into = self._aad, self._aad_tail, self._aead.decrypt_into
        failed: list[int] = []
        for index, page in enumerate(pages):
            _AAD_TAIL.pack_into(aad, tail, slab, page)
            start = index * PAGE_SIZE
            at = index * SEAL_BYTES
            joined[:PAGE_SIZE] = cipher_view[start : start + PAGE_SIZE]
            joined[PAGE_SIZE:] = seal_view[at + SEAL_NONCE_BYTES : at + SEAL_BYTES]
            try:
                decrypt_into(
                    seal_view[at : at + SEAL_NONCE_BYTES],
                    joined,
                    aad,
                    out_view[start : start + PAGE_SIZE],
                )
            except InvalidTag:
                failed.append(index)
        return failed

    def _pages(
        self,
        crypt: Any,
        nonces: bytes,
        source: memoryview,
        aads: bytes,
        target: memoryview,
        rows: range,
        failed: list[int] | None = None,
    ) -> None:
        """`crypt` (encrypt_into or decrypt_into) of the rows `rows` (a step-2 range).

        Encrypting reads 4096 bytes a row and writes 4096 + 16 (ciphertext and tag);
        decrypting the other way round. Rows that fail authentication go to `failed`."""
        aad_size = self._aad_size
        step = rows.step
        if failed is None:
            source_bytes, target_bytes = PAGE_SIZE, PAGE_SIZE + SEAL_TAG_BYTES
        else:
            source_bytes, target_bytes = PAGE_SIZE + SEAL_TAG_BYTES, PAGE_SIZE
        for start, nonce_at, aad_at in zip(
            range(rows.start * PAGE_SIZE, rows.stop * PAGE_SIZE, step * PAGE_SIZE),
            range(
                rows.start * SEAL_NONCE_BYTES, rows.stop * SEAL_NONCE_BYTES, step * SEAL_NONCE_BYTES
            ),
            range(rows.start * aad_size, rows.stop * aad_size, step * aad_size),
            strict=True,
        ):
            try:
                crypt(
                    nonces[nonce_at : nonce_at + SEAL_NONCE_BYTES],
                    source[start : start + source_bytes],
                    aads[aad_at : aad_at + aad_size],
                    target[start : start + target_bytes],
                )
            except InvalidTag:
                assert failed is not None
                failed.append(start // PAGE_SIZE)

    def close(self) -> None:
        self._nonces.close()


def _heads(buf: Any, rows: int) -> PageArray:
    """(rows, 16) view of the first 16 bytes of each 4096-byte row of flat uint8 `buf`."""
    heads: PageArray = np.ndarray(
        (rows, SEAL_TAG_BYTES), dtype=np.uint8, buffer=buf, strides=(PAGE_SIZE, 1)
    )
    return heads


def _fill_nonces(seals: PageArray, first: int) -> None:
    """Nonces first, first + 1, ... into the first 12 bytes of each row of `seals`."""
    count = seals.shape[0]
    low, high = first & _LOW64_MASK, first >> 64
    if low + count <= 1 << 64:
        lows = np.arange(count, dtype=np.uint64) + np.uint64(low)
        seals[:, :8] = lows.astype("<u8").view(np.uint8).reshape(count, 8)
        seals[:, 8:SEAL_NONCE_BYTES] = np.frombuffer(high.to_bytes(4, "little"), dtype=np.uint8)
        return
    for index in range(count):  # the low 64 bits wrap in this batch: once in 2**64 pages
        value = first + index
        _NONCE.pack_into(seals[index], 0, value & _LOW64_MASK, value >> 64)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> bytes:
    info = path.stat()
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SealingError(f"page key {path} is open to other users; chmod 600 it")
    key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise SealingError(f"page key {path} holds {len(key)} bytes, not {KEY_BYTES}")
    return key


def _create_key(path: Path) -> bytes:
    """Write a new random key, durably and without replacing one another process made."""
    key = AESGCM.generate_key(bit_length=8 * KEY_BYTES)
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(staging, path)  # fails if the key appeared meanwhile: never overwrite a key
    finally:
        staging.unlink()
    _fsync_dir(path.parent)
    return key


def open_page_sealer(key_path: Path, *, tenant: str, volume: int) -> PageSealer:
    """The sealer of a device: its key from `key_path` (created if missing) and its nonce
    counter from KEY.nonce beside it.

    Raises:
        SealingError: the key is malformed or readable by others, its nonce state is lost
            or locked by another client, or the files cannot be written.
    """
    state_path = key_path.with_name(key_path.name + ".nonce")
    try:
        key_path.parent.mkdir(parents=True, exist_ok=True)
        nonces = NonceCounter(state_path)
    except OSError as exc:
        raise SealingError(f"cannot open nonce state {state_path}: {exc}") from exc
    try:
        if key_path.exists():
            if not nonces.existed:
                raise SealingError(
                    f"page key {key_path} has no nonce state {state_path}, so the nonces "
                    "it already used are unknown; restore that file, or move the key away "
                    "to start over with a new one (pages sealed with it become unreadable)"
                )
            key = _read_key(key_path)
            nonces.begin()
            log.info("page key loaded path=%s next_nonce=%d", key_path, nonces.next_value)
        else:
            nonces.begin()
            key = _create_key(key_path)
            log.info("page key created path=%s (keep it: pages sealed with it need it)", key_path)
        return PageSealer(key, nonces, tenant=tenant, volume=volume)
    except OSError as exc:
        nonces.discard()
        raise SealingError(f"cannot use page key {key_path}: {exc}") from exc
    except SealingError:
        nonces.discard()
        raise
