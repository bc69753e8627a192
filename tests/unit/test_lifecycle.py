"""The service lifecycle (remem_common.lifecycle) in-process: exit statuses, the ready line,
cleanup order, and what the first stop signal does. The processes themselves, and a second
signal ending one, are tests/integration/test_service_lifecycle.py."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from remem_common.lifecycle import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    ConfigError,
    Lifecycle,
    ServiceFailure,
    Started,
    metrics_url,
    ready_line,
    run_service,
    run_service_async,
)
from remem_common.process import FIELD_RE, READY_RE
from remem_common.security import KeyFileError

PROG = "remem test"
log = logging.getLogger("lifecycle-test")


@dataclass
class FakeService:
    """Serves by running `during_serve`, then returns (or raises `failure`)."""

    during_serve: Callable[[FakeService], None] = lambda service: None
    failure: Exception | None = None
    stops: int = 0
    served: bool = False

    def request_stop(self) -> None:
        self.stops += 1

    def serve_forever(self) -> None:
        self.served = True
        self.during_serve(self)
        if self.failure is not None:
            raise self.failure


@dataclass
class Trail:
    """What a test's start() opened and what the lifecycle closed, in order."""

    events: list[str] = field(default_factory=list)

    def open(self, lifecycle: Lifecycle, name: str) -> None:
        self.events.append(f"open {name}")
        lifecycle.callback(self.events.append, f"close {name}")


def run(
    trail: Trail,
    service: FakeService,
    *,
    before_ready: Callable[[Lifecycle], None] = lambda lifecycle: None,
    ready: dict[str, object] | None = None,
) -> int:
    def start(lifecycle: Lifecycle) -> Started[Any]:
        trail.open(lifecycle, "store")
        trail.open(lifecycle, "socket")
        before_ready(lifecycle)
        return Started(service, ready or {"endpoint": "tcp://127.0.0.1:1"})

    return run_service(PROG, log, start)


# -- the ready line --------------------------------------------------------------------------


def test_the_ready_line_parses_back_into_its_fields() -> None:
    line = ready_line(
        {
            "endpoint": "tcp://127.0.0.1:7100",
            "pages": 12,
            "curve": True,
            "clean": False,
            "path": "/srv/a mirror\timg",
            "grace": "3.0s",
        }
    )
    assert line == (
        "ready endpoint=tcp://127.0.0.1:7100 pages=12 curve=on clean=off "
        "path=/srv/a%20mirror%09img grace=3.0s"
    )
    # As remem_common.process reads it (behind the logging prefix).
    match = READY_RE.search(f"INFO pageserver: {line}")
    assert match is not None
    assert dict(FIELD_RE.findall(match.group("fields"))) == {
        "endpoint": "tcp://127.0.0.1:7100",
        "pages": "12",
        "curve": "on",
        "clean": "off",
        "path": "/srv/a%20mirror%09img",
        "grace": "3.0s",
    }


def test_a_ready_field_must_be_a_word() -> None:
    with pytest.raises(ValueError, match="not a word"):
        ready_line({"two words": 1})


def test_metrics_url_of_wildcard_ipv6_and_plain_hosts() -> None:
    assert metrics_url("127.0.0.1", 9100) == "http://127.0.0.1:9100/metrics"
    assert metrics_url("0.0.0.0", 9100) == f"http://{socket.gethostname()}:9100/metrics"
    assert metrics_url("::", 9100) == f"http://{socket.gethostname()}:9100/metrics"
    assert metrics_url("::1", 9100) == "http://[::1]:9100/metrics"


# -- exit statuses and cleanup -----------------------------------------------------------------


def test_a_clean_run_logs_ready_serves_cleans_up_in_reverse_and_exits_0(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trail = Trail()
    service = FakeService(during_serve=lambda s: trail.events.append("serve"))
    with caplog.at_level(logging.INFO, logger=log.name):
        status = run(trail, service, ready={"endpoint": "tcp://h:1", "curve": False})
    assert status == EXIT_OK
    assert trail.events == ["open store", "open socket", "serve", "close socket", "close store"]
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0] == "ready endpoint=tcp://h:1 curve=off"
    assert messages[-1].startswith("stopped after ")


@pytest.mark.parametrize(
    "error", [ConfigError("--capacity does not fit"), KeyFileError("x.key_secret holds no key")]
)
def test_a_config_error_exits_2_with_one_line_after_cleaning_up(
    error: Exception, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = Trail()
    service = FakeService()

    def fail(lifecycle: Lifecycle) -> None:
        raise error

    assert run(trail, service, before_ready=fail) == EXIT_CONFIG
    assert trail.events == ["open store", "open socket", "close socket", "close store"]
    assert not service.served
    assert capsys.readouterr().err == f"{PROG}: {error}\n"


def test_as_config_error_and_as_failure_map_errors_to_2_and_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    def misfit(lifecycle: Lifecycle) -> None:
        with lifecycle.as_config_error(OSError):
            raise FileExistsError("arena /dev/shm/a holds 1 MiB; --forget to start over")

    def taken(lifecycle: Lifecycle) -> None:
        with lifecycle.as_failure("cannot bind tcp://127.0.0.1:7100", OSError):
            raise OSError(98, "Address already in use")

    assert run(Trail(), FakeService(), before_ready=misfit) == EXIT_CONFIG
    assert run(Trail(), FakeService(), before_ready=taken) == EXIT_FAILURE
    assert capsys.readouterr().err.splitlines() == [
        f"{PROG}: arena /dev/shm/a holds 1 MiB; --forget to start over",
        f"{PROG}: cannot bind tcp://127.0.0.1:7100: [Errno 98] Address already in use",
    ]


def test_a_metrics_port_in_use_is_a_failure_and_a_bound_endpoint_is_shut_down(
    capsys: pytest.CaptureFixture[str],
) -> None:
    urls: list[str] = []

    def two_endpoints(lifecycle: Lifecycle) -> None:
        urls.append(lifecycle.metrics_endpoint(0, "127.0.0.1"))
        port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
        lifecycle.metrics_endpoint(port, "127.0.0.1")  # taken by the first

    assert run(Trail(), FakeService(), before_ready=two_endpoints) == EXIT_FAILURE
    err = capsys.readouterr().err
    assert err.startswith(f"{PROG}: cannot serve metrics on port ") and err.count("\n") == 1
    # The first endpoint was shut down and its port released by the cleanup.
    port = int(urls[0].rsplit(":", 1)[1].split("/")[0])
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_a_failure_while_serving_exits_1_logged_after_cleaning_up(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    trail = Trail()
    service = FakeService(failure=ServiceFailure("the writer did not finish in time"))
    with caplog.at_level(logging.INFO, logger=log.name):
        assert run(trail, service) == EXIT_FAILURE
    assert trail.events == ["open store", "open socket", "close socket", "close store"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["the writer did not finish in time"]
    assert not any(r.getMessage().startswith("stopped") for r in caplog.records)
    assert capsys.readouterr().err == ""  # after the ready line, failures are log lines


def test_a_bug_exits_1_with_its_traceback_logged(caplog: pytest.LogCaptureFixture) -> None:
    def bug(lifecycle: Lifecycle) -> None:
        raise RuntimeError("unexpected")

    with caplog.at_level(logging.INFO, logger=log.name):
        assert run(Trail(), FakeService(), before_ready=bug) == EXIT_FAILURE
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage() == f"{PROG} failed" and record.exc_info is not None


def test_a_failing_cleanup_still_runs_the_others_and_exits_1() -> None:
    trail = Trail()

    def broken_close(lifecycle: Lifecycle) -> None:
        def close() -> None:
            raise OSError(5, "Input/output error")

        lifecycle.callback(close)

    assert run(trail, FakeService(), before_ready=broken_close) == EXIT_FAILURE
    assert trail.events == ["open store", "open socket", "close socket", "close store"]


# -- signals -----------------------------------------------------------------------------------


def test_the_first_signal_asks_to_stop_and_arms_the_default_for_a_repeat(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    seen: dict[str, Any] = {}

    def signalled(service: FakeService) -> None:
        signal.raise_signal(signal.SIGTERM)  # its handler runs before the next line
        seen["stops after SIGTERM"] = service.stops
        seen["SIGTERM"] = signal.getsignal(signal.SIGTERM)
        seen["SIGINT handled"] = signal.getsignal(signal.SIGINT) not in (
            signal.SIG_DFL,
            signal.default_int_handler,
        )
        # Another signal asks again (nothing more to do), and is armed in its turn.
        signal.raise_signal(signal.SIGINT)
        seen["stops after SIGINT"] = service.stops
        seen["SIGINT"] = signal.getsignal(signal.SIGINT)

    with caplog.at_level(logging.INFO, logger=log.name):
        assert run(Trail(), FakeService(during_serve=signalled)) == EXIT_OK
    assert seen == {
        "stops after SIGTERM": 1,
        "SIGTERM": signal.SIG_DFL,
        "SIGINT handled": True,
        "stops after SIGINT": 1,
        "SIGINT": signal.SIG_DFL,
    }
    assert caplog.records[-1].getMessage().startswith("stopped on SIGTERM after ")
    # The handlers from before the run are back.
    assert {signum: signal.getsignal(signum) for signum in before} == before


def test_a_signal_during_start_stops_the_service_before_it_is_ready(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = FakeService()

    def interrupted(lifecycle: Lifecycle) -> None:
        signal.raise_signal(signal.SIGTERM)

    with caplog.at_level(logging.INFO, logger=log.name):
        assert run(Trail(), service, before_ready=interrupted) == EXIT_OK
    # Asked to stop before it served: it serves nothing (its loop sees the request at once).
    assert service.stops == 1 and service.served
    assert not any(r.getMessage().startswith("ready") for r in caplog.records)


# -- the asyncio variant -----------------------------------------------------------------------


@dataclass
class AsyncFakeService:
    """Serves until request_stop, after raising SIGTERM at itself once ready."""

    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    seen: dict[str, Any] = field(default_factory=dict)

    def request_stop(self) -> None:
        self.stopped.set()

    async def serve(self) -> None:
        signal.raise_signal(signal.SIGTERM)  # delivered through the loop
        await asyncio.wait_for(self.stopped.wait(), 10)
        self.seen["SIGTERM"] = signal.getsignal(signal.SIGTERM)


async def test_the_async_variant_stops_on_a_signal_and_awaits_async_cleanups(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = AsyncFakeService()
    events: list[str] = []

    async def close_backend() -> None:
        await asyncio.sleep(0)  # a real await: the backend's close is a coroutine
        events.append("close backend")

    async def start(lifecycle: Lifecycle) -> Started[Any]:
        lifecycle.async_callback(close_backend)
        lifecycle.callback(events.append, "close listeners")
        return Started(service, {"nbd_uri": "nbd+unix:///remem?socket=/run/x.sock"})

    with caplog.at_level(logging.INFO, logger=log.name):
        assert await run_service_async(PROG, log, start) == EXIT_OK
    assert service.seen == {"SIGTERM": signal.SIG_DFL}
    assert events == ["close listeners", "close backend"]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "ready nbd_uri=nbd+unix:///remem?socket=/run/x.sock"
    assert messages[-1].startswith("stopped on SIGTERM after ")
    loop = asyncio.get_running_loop()
    assert not loop.remove_signal_handler(signal.SIGTERM)  # the lifecycle removed its own


async def test_the_async_variant_maps_a_key_error_to_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    async def start(lifecycle: Lifecycle) -> Started[Any]:
        raise KeyFileError("--page-key k: not 32 bytes")

    assert await run_service_async(PROG, log, start) == EXIT_CONFIG
    assert capsys.readouterr().err == f"{PROG}: --page-key k: not 32 bytes\n"


def test_async_callbacks_need_the_async_variant() -> None:
    async def close() -> None:
        pass

    def sync_only(lifecycle: Lifecycle) -> None:
        lifecycle.async_callback(close)

    assert run(Trail(), FakeService(), before_ready=sync_only) == EXIT_FAILURE
