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
    """AES-256-GCM of one device's pages: one cipher object, one call per page."""

    def __init__(self, key: bytes, nonces: NonceCounter, *, tenant: str, volume: int) -> None:
        if len(key) != KEY_BYTES:
            raise SealingError(f"a page key is {KEY_BYTES} bytes, got {len(key)}")
        self._aead = AESGCM(key)
        self._nonces = nonces
        prefix = _AAD_DOMAIN + bytes([len(tenant)]) + tenant.encode() + struct.pack("<I", volume)
        self._aad = bytearray(prefix + bytes(_AAD_TAIL.size))
        self._aad_tail = len(prefix)
        # ciphertext || tag of one page, assembled for decrypt_into (it wants them joined).
        self._joined = memoryview(bytearray(PAGE_SIZE + SEAL_TAG_BYTES))

    @property
    def nonces(self) -> NonceCounter:
        return self._nonces

    def seal(self, first: int, plain: PageArray) -> tuple[PageArray, PageArray]:
        """Encrypt device pages first, first + 1, ...; returns (ciphertext, seals) arrays of
        shapes (N, 4096) and (N, 28), fresh nonces in the seals."""
        count = plain.shape[0]
        seals = np.empty((count, SEAL_BYTES), dtype=np.uint8)
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
        return cipher, seals

    def open_into(
        self, slab: int, pages: Iterable[int], cipher: Any, seals: Any, out: Any
    ) -> list[int]:
        """Authenticate and decrypt pages of one slab.

        Args:
            slab: the slab every page belongs to.
            pages: page index within the slab of each row, in row order.
            cipher, seals, out: contiguous buffers of N x 4096, N x 28 and N x 4096 bytes
                (`out` writable); row i of `out` gets page i's plaintext.

        Returns:
            Rows that failed authentication (their `out` rows are undefined); usually [].
        """
        cipher_view = memoryview(cipher).cast("B")
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

    def close(self) -> None:
        self._nonces.close()


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
