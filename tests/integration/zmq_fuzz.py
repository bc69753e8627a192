"""ZeroMQ fuzzing shared by the services' suites: bad messages built from good ones.

A boundary is described by samples: valid messages (header as a dict, payload frames) of
every type the socket takes. `messages(samples)` draws a bad message from them in one of
these ways:

- garbage: random frames, no delimiter, an empty or non-JSON or oversized header
- envelope: wrong or missing `version`, an unknown or missing or foreign `type`, a bad or
  negative `msg_id`, a field the type does not have
- fields: one field dropped or replaced by a value of the wrong type or out of its range
  (negative, past 2**32 or 2**64, empty, too long, a path, an endpoint no socket accepts)
- payload: a frame dropped, added, cut short, grown, emptied or bit-flipped, so lengths and
  counts disagree (or a checksum no longer matches)
- oversized batches and other invalid values, given as samples of their own by each suite
- a sample as it is (valid ones must be served)

Some draws are still valid (a field replaced by another legal value): the service must then
serve them. So a fuzzer counts what came back rather than assuming every message is refused:
`Tally` holds the error codes of the replies, and a suite asserts that the service's
`*_malformed_messages_total` rose by exactly the number of `malformed`, `unknown_type` and
`unsupported_version` replies, that nothing was answered `internal`, and that most draws
were refused.

`REMEM_ZMQ_FUZZ_SCALE` multiplies every fuzzer's example count (`make test-fuzz`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from remem_common.framing import MAX_HEADER_BYTES

from .. import fuzz_summary

Sample = tuple[dict[str, Any], list[bytes]]
MALFORMED_CODES = frozenset({"malformed", "unknown_type", "unsupported_version"})

# Values that break a field of any type in some way; a few are legal for some fields.
JUNK: list[Any] = [
    None,
    True,
    -1,
    0,
    1,
    2**32,
    2**64,
    -(2**63),
    1.5,
    -0.0,
    1e308,
    "",
    "1",
    "x" * 300,
    "../../etc/passwd",
    "t\x00",
    "tcp://x",
    "tcp://*:5555",
    "tcp://127.0.0.1:0",
    "tcp://host:99999",
    "ipc://",
    "http://",
    [],
    [1, 2],
    ["a", "b", "c", "d", "e", "f", "g", "h", "i"],
    {},
    {"a": 1},
]
FOREIGN_TYPES = [
    "error_reply",
    "put_pages_reply",
    "heartbeat_reply",
    "map_changed_notice",
    "get_pages_request ",
    "GET_PAGES_REQUEST",
    "",
    "request",
]


def _dump(header: dict[str, Any]) -> bytes:
    return json.dumps(header).encode()


def _header_mutations(header: dict[str, Any]) -> st.SearchStrategy[bytes]:
    keys = sorted(header)
    replaced = st.tuples(st.sampled_from(keys), st.sampled_from(JUNK)).map(
        lambda kv: _dump({**header, kv[0]: kv[1]})
    )
    dropped = st.sampled_from(keys).map(
        lambda key: _dump({k: v for k, v in header.items() if k != key})
    )
    extra = st.sampled_from(["surprise", "status", "parent_id", "payload"]).map(
        lambda key: _dump({**header, key: 1})
    )
    version = st.sampled_from([0, 2, 99, "1", 1.0, None, -1]).map(
        lambda v: _dump({**header, "version": v})
    )
    foreign = st.one_of(st.sampled_from(FOREIGN_TYPES), st.text(max_size=20)).map(
        lambda t: _dump({**header, "type": t})
    )
    text = _dump(header)
    cut = st.integers(0, len(text) - 1).map(lambda n: text[:n])
    flipped = st.tuples(st.integers(0, len(text) - 1), st.integers(1, 255)).map(
        lambda t: text[: t[0]] + bytes([text[t[0]] ^ t[1]]) + text[t[0] + 1 :]
    )
    return st.one_of(replaced, dropped, extra, version, foreign, cut, flipped)


def _payload_mutations(payload: list[bytes]) -> st.SearchStrategy[list[bytes]]:
    options: list[st.SearchStrategy[list[bytes]]] = [
        st.binary(max_size=64).map(lambda extra: [*payload, extra]),
    ]
    if payload:
        index = st.integers(0, len(payload) - 1)
        options += [
            index.map(lambda i: payload[:i] + payload[i + 1 :]),
            st.tuples(index, st.integers(1, 4097)).map(
                lambda t: _replace(
                    payload, t[0], payload[t[0]][: max(0, len(payload[t[0]]) - t[1])]
                )
            ),
            st.tuples(index, st.sampled_from([1, 7, 8, 4096])).map(
                lambda t: _replace(payload, t[0], payload[t[0]] + bytes(t[1]))
            ),
            index.map(lambda i: _replace(payload, i, b"")),
            st.tuples(index, st.integers(0, 1 << 20)).map(lambda t: _flip(payload, *t)),
        ]
    return st.one_of(options)


def _replace(payload: list[bytes], index: int, frame: bytes) -> list[bytes]:
    return [*payload[:index], frame, *payload[index + 1 :]]


def _flip(payload: list[bytes], index: int, position: int) -> list[bytes]:
    frame = payload[index]
    if not frame:
        return _replace(payload, index, b"\x01")
    at = position % len(frame)
    return _replace(payload, index, frame[:at] + bytes([frame[at] ^ 0x40]) + frame[at + 1 :])


GARBAGE: st.SearchStrategy[list[bytes]] = st.one_of(
    # no empty delimiter frame at all
    st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=4),
    # a delimiter, then anything
    st.lists(st.binary(max_size=64), max_size=4).map(lambda frames: [b"", *frames]),
    st.sampled_from(
        [
            [b""],
            [b"", b""],
            [b"", b"{}"],
            [b"", b"[]"],
            [b"", b"null"],
            [b"", b"\xff\xfe{"],
            [b"", b'{"type": 1}'],
            [b"", b"{" * 100_000],
            [b"", b" " * (MAX_HEADER_BYTES + 1)],
            [b"", b"[" + b"1," * 40_000 + b"1]"],
        ]
    ),
)


def messages(samples: list[Sample]) -> st.SearchStrategy[list[bytes]]:
    """Frames of one bad (or occasionally still valid) message, from `samples`."""
    mutated = st.sampled_from(samples).flatmap(
        lambda sample: st.one_of(
            _header_mutations(sample[0]).map(lambda header: [b"", header, *sample[1]]),
            _payload_mutations(sample[1]).map(lambda payload: [b"", _dump(sample[0]), *payload]),
        )
    )
    # Samples as they are: valid ones must be served, deliberately invalid ones refused.
    as_is = st.sampled_from(samples).map(lambda sample: [b"", _dump(sample[0]), *sample[1]])
    return st.one_of(GARBAGE, as_is, mutated, mutated, mutated)


@dataclass
class Tally:
    """What a fuzzer sent and what came back."""

    sent: int = 0
    ok: int = 0
    codes: Counter[str] = field(default_factory=Counter)

    @property
    def malformed(self) -> int:
        """Replies that say the message itself was bad: each must be counted by the service."""
        return sum(self.codes[code] for code in MALFORMED_CODES)

    def record(self, reply: list[bytes]) -> None:
        header = json.loads(reply[1] if reply[0] == b"" else reply[0])
        self.sent += 1
        if header["status"] == "ok":
            self.ok += 1
        else:
            self.codes[header["error_code"]] += 1


def fuzz_settings(examples: int) -> settings:
    """Hypothesis settings of every fuzzer here: `examples` draws, reproducible (derandomized,
    no example database), no deadline or health check (services answer at their pace)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


def fuzz_router(
    context: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    strategy: st.SearchStrategy[list[bytes]],
    examples: int,
    *,
    between: Callable[[], None] | None = None,
    every: int = 100,
) -> Tally:
    """Send `examples` draws of `strategy` to a ROUTER, one at a time, each answered in time.

    `between` (a well-behaved client's check) runs after every `every` examples.
    """
    tally = Tally()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)

    @fuzz_settings(examples)
    @given(strategy)
    def one(frames: list[bytes]) -> None:
        sock.send_multipart(frames)
        assert sock.poll(15_000), f"no answer to {[f[:80] for f in frames]}"
        tally.record(sock.recv_multipart())
        if between is not None and tally.sent % every == 0:
            between()

    try:
        one()
    finally:
        sock.close(linger=0)
    return tally


def malformed_total(metrics: dict[str, float], service: str) -> float:
    prefix = f"{service}_malformed_messages_total{{"
    return sum(value for name, value in metrics.items() if name.startswith(prefix))


def check_and_report(
    socket_name: str, tally: Tally, counted: float, *, examples: int, refused_at_least: float
) -> None:
    """The assertions every ROUTER fuzzer shares, then its line in the summary."""
    others = {k: v for k, v in sorted(tally.codes.items()) if k not in MALFORMED_CODES}
    fuzz_summary.record(
        f"zmq {socket_name}: {tally.sent} sent, {tally.malformed} answered malformed/"
        f"unknown_type/unsupported_version and {int(counted)} counted, "
        f"{sum(others.values())} other refusals{f' {others}' if others else ''}, "
        f"{tally.ok} served"
    )
    assert tally.sent >= examples
    assert counted == tally.malformed, (counted, tally)
    assert tally.codes["internal"] == 0, tally
    assert set(tally.codes) >= MALFORMED_CODES, tally
    assert tally.malformed >= refused_at_least * tally.sent, tally


def fuzz_service_router(
    context: zmq.Context[zmq.Socket[bytes]],
    service: str,
    endpoint: str,
    scrape: Callable[[], dict[str, float]],
    samples: list[Sample],
    examples: int,
    *,
    between: Callable[[], None],
) -> None:
    """Fuzz one service's ROUTER and check that every refusal was counted in
    `<service>_malformed_messages_total`, while `between` checks its data stays intact."""
    before = malformed_total(scrape(), service)
    tally = fuzz_router(context, endpoint, messages(samples), examples, between=between)
    counted = malformed_total(scrape(), service) - before
    check_and_report(f"{service} ROUTER", tally, counted, examples=examples, refused_at_least=0.6)
