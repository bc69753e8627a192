"""Page sealing: AES-256-GCM round trip and tamper detection, the key file, nonces that never
repeat across restarts (the state file beside the key), and the seal frame codec."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import crc32c
import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from remem_client.sealing import (
    BATCH_LAYOUT_PAGES,
    NONCE_LIMIT,
    STATE_MAGIC,
    STATE_RECORD,
    NonceCounter,
    PageSealer,
    SealingError,
    open_page_sealer,
)
from remem_common.protocol.envelope import ErrorCode, ProtocolError
from remem_common.protocol.pages import PAGE_SIZE, SEAL_BYTES, SLAB_PAGES, unpack_seals


def random_pages(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, PAGE_SIZE), dtype=np.uint8)


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "page.key"


@pytest.fixture
def sealer(key_path: Path) -> PageSealer:
    return open_page_sealer(key_path, tenant="t", volume=3)


def open_rows(
    sealer: PageSealer, slab: int, pages: list[int], cipher: np.ndarray, seals: np.ndarray
) -> tuple[np.ndarray, list[int]]:
    out = np.empty(cipher.shape, dtype=np.uint8)
    failed = sealer.open_into(slab, pages, cipher, seals, out)
    return out, failed


# -- sealing ---------------------------------------------------------------------------


def test_round_trip_across_a_slab_boundary(sealer: PageSealer) -> None:
    plain = random_pages(4)
    first = 2 * SLAB_PAGES - 2  # pages 16382, 16383 of slab 1, then 0, 1 of slab 2
    cipher, seals = sealer.seal(first, plain)
    assert cipher.shape == plain.shape and seals.shape == (4, SEAL_BYTES)
    assert not (cipher == plain).all(axis=1).any()
    out, failed = open_rows(sealer, 1, [SLAB_PAGES - 2, SLAB_PAGES - 1], cipher[:2], seals[:2])
    assert failed == [] and np.array_equal(out, plain[:2])
    out, failed = open_rows(sealer, 2, [0, 1], cipher[2:], seals[2:])
    assert failed == [] and np.array_equal(out, plain[2:])


def test_the_same_page_twice_never_shares_a_nonce(sealer: PageSealer) -> None:
    plain = random_pages(1)
    first_cipher, first_seals = sealer.seal(7, plain)
    second_cipher, second_seals = sealer.seal(7, plain)
    assert not np.array_equal(first_seals[:, :12], second_seals[:, :12])
    assert not np.array_equal(first_cipher, second_cipher)


def test_tampering_and_misplacement_fail_authentication(sealer: PageSealer, key_path: Path) -> None:
    plain = random_pages(3, 1)
    cipher, seals = sealer.seal(10, plain)  # slab 0, pages 10, 11, 12
    flipped = cipher.copy()
    flipped[1, 100] ^= 0x01
    assert open_rows(sealer, 0, [10, 11, 12], flipped, seals)[1] == [1]
    bad_tag = seals.copy()
    bad_tag[2, -1] ^= 0x80
    assert open_rows(sealer, 0, [10, 11, 12], cipher, bad_tag)[1] == [2]
    bad_nonce = seals.copy()
    bad_nonce[0, 0] ^= 0x01
    assert open_rows(sealer, 0, [10, 11, 12], cipher, bad_nonce)[1] == [0]
    # A page server answering with another address's page (same key, valid tag).
    assert open_rows(sealer, 0, [11, 10, 12], cipher, seals)[1] == [0, 1]
    assert open_rows(sealer, 1, [10, 11, 12], cipher, seals)[1] == [0, 1, 2]
    # Another volume or tenant under the same key.
    other_volume = PageSealer(_key_of(key_path), _spare_counter(key_path), tenant="t", volume=4)
    assert open_rows(other_volume, 0, [10, 11, 12], cipher, seals)[1] == [0, 1, 2]
    other_tenant = PageSealer(_key_of(key_path), _spare_counter(key_path), tenant="u", volume=3)
    assert open_rows(other_tenant, 0, [10, 11, 12], cipher, seals)[1] == [0, 1, 2]
    # And the untouched batch still opens.
    out, failed = open_rows(sealer, 0, [10, 11, 12], cipher, seals)
    assert failed == [] and np.array_equal(out, plain)


@pytest.mark.parametrize("count", [1, 2, 3, 7, BATCH_LAYOUT_PAGES, BATCH_LAYOUT_PAGES + 1, 256])
def test_batches_seal_as_single_pages_and_open_in_place_unchanged(
    sealer: PageSealer, key_path: Path, count: int
) -> None:
    """Large batches are laid out without per-page copies (tags beside their ciphertext, in
    the next row), small ones go page by page: either way each page is AES-GCM of its own
    nonce and place, and opening from a writable buffer leaves it as it was, tampered rows
    or not."""
    first = SLAB_PAGES - 2 if count < 4 else 5
    plain = random_pages(count, count)
    cipher, seals = sealer.seal(first, plain)
    aead = AESGCM(_key_of(key_path))
    for row in range(count):
        page = first + row
        aad = b"remem-page-v1\0\x01t" + (3).to_bytes(4, "little")
        aad += (page // SLAB_PAGES).to_bytes(4, "little") + (page % SLAB_PAGES).to_bytes(
            4, "little"
        )
        sealed = aead.encrypt(bytes(seals[row, :12]), plain[row].tobytes(), aad)
        assert sealed == cipher[row].tobytes() + seals[row, 12:].tobytes()
    if (first + count - 1) // SLAB_PAGES != first // SLAB_PAGES:
        return  # a batch across slabs opens slab by slab (test_round_trip_...)
    pages = list(range(first % SLAB_PAGES, first % SLAB_PAGES + count))
    slab = first // SLAB_PAGES
    tampered = cipher.copy()
    bad = sorted({0, count // 2, count - 1})
    tampered[bad, 7] ^= 0x40
    for buffer, expect in ((cipher, []), (tampered, bad)):
        before = buffer.copy()
        read_only = np.frombuffer(buffer.tobytes(), dtype=np.uint8).reshape(count, PAGE_SIZE)
        for given in (buffer, read_only):  # opened in place, and copying
            out, failed = open_rows(sealer, slab, pages, given, seals)
            assert failed == expect
            good = np.setdiff1d(np.arange(count), expect)
            assert np.array_equal(out[good], plain[good])
        assert np.array_equal(buffer, before)
        assert (
            open_rows(sealer, slab, range(pages[0], pages[0] + count), buffer, seals)[1] == expect
        )


def _key_of(key_path: Path) -> bytes:
    return key_path.read_bytes()


def _spare_counter(key_path: Path) -> NonceCounter:
    return NonceCounter(key_path.with_name(f"spare-{os.urandom(4).hex()}.nonce"))


def test_another_key_cannot_open(sealer: PageSealer, tmp_path: Path) -> None:
    cipher, seals = sealer.seal(0, random_pages(1))
    stranger = open_page_sealer(tmp_path / "other.key", tenant="t", volume=3)
    assert open_rows(stranger, 0, [0], cipher, seals)[1] == [0]


# -- the key file ----------------------------------------------------------------------


def test_key_is_created_private_and_reused(key_path: Path) -> None:
    first = open_page_sealer(key_path, tenant="t", volume=0)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(key_path.read_bytes()) == 32
    cipher, seals = first.seal(5, random_pages(1, 2))
    first.close()
    again = open_page_sealer(key_path, tenant="t", volume=0)  # a restarted client
    out, failed = open_rows(again, 0, [5], cipher, seals)
    assert failed == [] and np.array_equal(out, random_pages(1, 2))


def test_bad_keys_are_refused(key_path: Path) -> None:
    open_page_sealer(key_path, tenant="t", volume=0).close()
    key_path.chmod(0o644)
    with pytest.raises(SealingError, match="chmod 600"):
        open_page_sealer(key_path, tenant="t", volume=0)
    key_path.chmod(0o600)
    key_path.write_bytes(b"short")
    with pytest.raises(SealingError, match="holds 5 bytes"):
        open_page_sealer(key_path, tenant="t", volume=0)


def test_a_key_without_its_nonce_state_is_refused(key_path: Path) -> None:
    open_page_sealer(key_path, tenant="t", volume=0).close()
    state = key_path.with_name("page.key.nonce")
    state.unlink()
    for _ in range(2):  # the refusal leaves no state file that would pass the next start
        with pytest.raises(SealingError, match="nonces it already used are unknown"):
            open_page_sealer(key_path, tenant="t", volume=0)
        assert not state.exists()


def test_two_clients_cannot_share_a_key(key_path: Path) -> None:
    running = open_page_sealer(key_path, tenant="t", volume=0)
    with pytest.raises(SealingError, match="locked by another client"):
        open_page_sealer(key_path, tenant="t", volume=0)
    running.close()
    open_page_sealer(key_path, tenant="t", volume=0).close()


# -- nonces ----------------------------------------------------------------------------


def take_all(counter: NonceCounter, sizes: list[int]) -> list[int]:
    values = []
    for size in sizes:
        first = counter.take(size)
        values.extend(range(first, first + size))
    return values


def test_restarts_never_reuse_a_nonce(tmp_path: Path) -> None:
    path = tmp_path / "k.nonce"
    seen: list[int] = []
    for restart in range(5):
        counter = NonceCounter(path, block=100)
        counter.begin()
        # Uneven batches: some cross a block, one is larger than a block.
        seen += take_all(counter, [1, 64, 37, 250, 3][: restart + 1])
        assert counter.reserved_until >= counter.next_value
        counter.close()  # a crash: nothing is written at exit
    assert len(seen) == len(set(seen))
    # A restart skips to the last reserved mark: at most one block (or batch) per run.
    assert max(seen) < 5 * 250 + 5 * 100


def test_a_torn_reservation_falls_back_to_the_older_record(tmp_path: Path) -> None:
    path = tmp_path / "k.nonce"
    counter = NonceCounter(path, block=100)
    counter.begin()
    used = take_all(counter, [60, 30])  # inside the first block: one record written
    assert counter.reserved_until == 100
    counter.take(20)  # reserves a second block in the other record
    assert counter.reserved_until == 190  # next (90) + one block
    counter.close()
    # Tear the newer record (slot 1), as a crash mid-write would before its block is used.
    with path.open("r+b") as raw:
        raw.seek(STATE_RECORD.size + 12)
        raw.write(b"\xff\xff")
    again = NonceCounter(path, block=100)
    again.begin()
    assert again.next_value == 100 > max(used)
    again.close()


def test_unreadable_state_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.nonce"
    path.write_bytes(os.urandom(2 * STATE_RECORD.size))
    with pytest.raises(SealingError, match="unreadable"):
        NonceCounter(path)


def test_the_nonce_space_ends_with_an_error(tmp_path: Path) -> None:
    path = tmp_path / "k.nonce"
    counter = NonceCounter(path, block=NONCE_LIMIT - 10)
    counter.begin()
    counter.take(NONCE_LIMIT - 12)
    with pytest.raises(SealingError, match="used up"):
        counter.take(20)
    counter.close()


def test_nonces_across_the_64_bit_boundary(key_path: Path) -> None:
    open_page_sealer(key_path, tenant="t", volume=0).close()
    state = key_path.with_name("page.key.nonce")
    mark = ((1 << 64) - 2).to_bytes(16, "little")
    record = STATE_RECORD.pack(STATE_MAGIC, mark, crc32c.crc32c(STATE_MAGIC + mark))
    state.write_bytes(record + bytes(STATE_RECORD.size))  # as if the counter got that far
    sealer = open_page_sealer(key_path, tenant="t", volume=0)
    plain = random_pages(4, 3)
    cipher, seals = sealer.seal(0, plain)
    nonces = [int.from_bytes(bytes(row[:12]), "little") for row in seals]
    assert nonces == [(1 << 64) - 2 + i for i in range(4)]
    out, failed = open_rows(sealer, 0, [0, 1, 2, 3], cipher, seals)
    assert failed == [] and np.array_equal(out, plain)


# -- the seal frame codec --------------------------------------------------------------


def test_seal_frame_codec() -> None:
    frame = np.arange(3 * SEAL_BYTES, dtype=np.uint8).tobytes()
    seals = unpack_seals(frame, 3)
    assert seals.shape == (3, SEAL_BYTES) and bytes(seals[1]) == frame[SEAL_BYTES : 2 * SEAL_BYTES]
    for wrong in (b"", frame[:-1], frame + b"\0", frame * 2):
        with pytest.raises(ProtocolError) as refused:
            unpack_seals(wrong, 3)
        assert refused.value.code == ErrorCode.MALFORMED
        assert refused.value.reason == "bad_payload"
