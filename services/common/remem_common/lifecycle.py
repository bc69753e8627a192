"""One lifecycle for every remem service process: validate, bind, ready, serve, drain, exit.

A service's `cli.main` parses its flags (`remem_common.config.load_config`) and hands a
`start` function to `run_service` (or, for an asyncio service, `run_service_async`); a
blocking service's `cli.main` is just `run_cli`, which does both:

    validate  `start` checks what the flags name (key files, an existing arena or mirror
              file); a `ConfigError` or a `KeyFileError` prints one line, exit status 2
    bind      `start` opens and binds; each resource it opens registers its cleanup once,
              on the lifecycle's stack (`callback`), right after it exists. A failure to
              bind or open (`ServiceFailure`, or `as_failure(...)` around the call) prints one
              line, exit status 1; whatever was already opened is cleaned up in reverse order
    ready     `start` returns the service and its ready fields; the lifecycle logs one line
              `ready key=value ...` (what `remem_common.process.spawn_service`, `remem up`
              and the tests wait for and parse)
    serve     until SIGTERM or SIGINT: the first asks the service to stop
              (`request_stop`), and it drains within its own timeout
    drain     `serve_forever` returns once drained; a `ServiceFailure` raised there (e.g.
              the mirror's writer missed its deadline) makes the exit status 1
    exit      the stack unwinds (metrics endpoint, sockets, ZAP handler, the ZeroMQ
              context, the store); status 0

The same signal a second time (SIGTERM twice, or Ctrl-C twice) ends the process at once,
whatever the drain is waiting for: after the first, that signal is back to the kernel's
default action, so no Python code needs to run (the process dies by it: status 128+N in a
shell, -N in `subprocess`). Every service survives that as it survives SIGKILL. A different
signal only asks again: `remem up`'s children get the terminal's SIGINT and then up's
SIGTERM, and must still drain. A signal that arrives while `start` still runs is kept: the
service stops as soon as it exists, without a ready line.

A service whose forced stop must be told apart from a kill passes `forced_exit`: the
repeat then logs one line ("second signal: ...") and exits with that status at once
(`os._exit`, no cleanup). The client does (130): under systemd its stop is a hand-over of
its NBD connections, and a cut-short one must show in the status and the journal.

From uvicorn's `Server` (startup / main_loop / shutdown, a second signal forces the exit)
and nbdkit's callback lifecycle (config, config_complete, open, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import zmq
from prometheus_client import REGISTRY, start_http_server

from remem_common.config import EXIT_CONFIG_ERROR, ServiceConfig, load_config
from remem_common.logs import setup_logging
from remem_common.security import KeyFileError

if TYPE_CHECKING:
    from collections.abc import Iterable
    from types import FrameType

    from prometheus_client import CollectorRegistry

    from remem_common.security import AuthMetrics, Role, Security

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = EXIT_CONFIG_ERROR

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ConfigError(Exception):
    """A setting, or a file a setting names, cannot be used: one line, exit status 2."""


class ServiceFailure(Exception):
    """The service could not bind, open or finish what it must: one line, exit status 1."""


class Servable(Protocol):
    """A service run by `run_service`: `serve_forever` returns once drained."""

    def serve_forever(self) -> object: ...

    def request_stop(self) -> None:
        """Ask `serve_forever` to drain and return; called from a signal handler."""


class AsyncServable(Protocol):
    """A service run by `run_service_async`: `serve` returns once drained."""

    async def serve(self) -> object: ...

    def request_stop(self) -> None:
        """Ask `serve` to drain and return; called from the event loop."""


ServiceT = TypeVar("ServiceT", Servable, AsyncServable)
ConfigT = TypeVar("ConfigT", bound=ServiceConfig)


@dataclass(frozen=True)
class Started(Generic[ServiceT]):
    """What `start` returns: the bound service and the fields of its ready line."""

    service: ServiceT
    ready: Mapping[str, object]


def ready_line(fields: Mapping[str, object]) -> str:
    """`ready key=value ...`: on/off for booleans, str() for the rest.

    A value never contains whitespace (each whitespace character is percent-encoded), so
    `remem_common.process.FIELD_RE` splits the line back into the same fields.
    """
    parts = ["ready"]
    for key, value in fields.items():
        if not key.isidentifier():
            raise ValueError(f"ready field {key!r} is not a word")
        text = ("on" if value else "off") if isinstance(value, bool) else str(value)
        parts.append(f"{key}=" + "".join(f"%{ord(c):02X}" if c.isspace() else c for c in text))
    return " ".join(parts)


def metrics_url(host: str, port: int) -> str:
    """The URL to scrape a metrics endpoint bound on `host`: a wildcard address is reached
    through this host's name; an IPv6 address goes in brackets."""
    if host in WILDCARD_HOSTS:
        host = socket.gethostname()
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/metrics"


class StopSignals:
    """SIGTERM and SIGINT: the first asks the service to stop (`request_stop`; it drains),
    and each one received goes back to the kernel's default action, so the same signal again
    ends the process whatever Python is busy with (a drain waiting for a peer, a context
    that will not terminate).

    Before a target is set (`start` still runs) a signal is only recorded; `set_target`
    passes it on.

    With `forced_exit`, a repeat is handled instead of left to the kernel: it logs one line
    on `log` and ends the process with that status (`os._exit`).
    """

    def __init__(self, forced_exit: int | None = None, log: logging.Logger | None = None) -> None:
        self.received: int | None = None  # the first stop signal
        self._seen: set[int] = set()
        self._target: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._forced_exit = forced_exit
        self._log = log or logging.getLogger(__name__)

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Handle the stop signals: with `signal.signal`, or through `loop` (asyncio)."""
        self._loop = loop
        for signum in STOP_SIGNALS:
            if loop is None:
                self._previous[signum] = signal.signal(signum, self._on_signal)
            else:
                loop.add_signal_handler(signum, self._on_signal, signum, None)

    def restore(self) -> None:
        """Put back what was there before `install` (tests run services in-process)."""
        if self._loop is not None:
            for signum in STOP_SIGNALS:
                self._loop.remove_signal_handler(signum)
            self._loop = None
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous.clear()

    def set_target(self, request_stop: Callable[[], None]) -> None:
        """From now on a stop signal calls `request_stop` (at once, if one came already)."""
        self._target = request_stop
        if self.received is not None:
            request_stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in self._seen:
            # Only reached when the repeat still found this handler: asyncio queues signals
            # and runs the handlers later, from its loop. Die as the default action would.
            if self._forced_exit is not None:
                self._exit_forced(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self._seen.add(signum)
        # The kernel's default from now on: a repeat needs no Python to act. (Nothing is
        # logged here: a handler that writes to stderr can interrupt a write in progress.)
        # With a forced exit status, a plain handler instead: it runs in the main thread
        # between two bytecodes, so also while the event loop is stuck in a call.
        signal.signal(signum, signal.SIG_DFL if self._forced_exit is None else self._exit_forced)
        if self.received is None:
            self.received = signum
            if self._target is not None:
                self._target()

    def _exit_forced(self, signum: int, frame: FrameType | None) -> None:
        assert self._forced_exit is not None
        # The one line is worth the risk of interrupting a write in progress: the process
        # ends right after it either way.
        with contextlib.suppress(Exception):
            self._log.warning(
                "second signal (%s): exiting without finishing the shutdown",
                signal.Signals(signum).name,
            )
        os._exit(self._forced_exit)


class Lifecycle:
    """What `start` uses: the cleanup stack, and the steps every service shares."""

    def __init__(self, prog: str, log: logging.Logger, forced_exit: int | None = None) -> None:
        self.prog = prog
        self.log = log
        self.signals = StopSignals(forced_exit, log)
        self._stack: ExitStack | AsyncExitStack | None = None
        self._serving_since: float | None = None  # set once start() returned

    # -- cleanup -----------------------------------------------------------------------------

    def callback(self, cleanup: Callable[..., object], *args: object) -> None:
        """Run `cleanup(*args)` when the service ends, in reverse order of registration."""
        assert self._stack is not None, "callback() is for start(), under run_service"
        self._stack.callback(cleanup, *args)

    def async_callback(self, cleanup: Callable[..., Awaitable[object]], *args: object) -> None:
        """Await `cleanup(*args)` when the service ends (run_service_async only)."""
        if not isinstance(self._stack, AsyncExitStack):
            raise TypeError("async_callback() needs run_service_async")
        self._stack.push_async_callback(cleanup, *args)

    # -- failures ----------------------------------------------------------------------------

    @staticmethod
    @contextlib.contextmanager
    def as_config_error(*errors: type[Exception]) -> Iterator[None]:
        """`errors` raised inside become a ConfigError (exit status 2) with their message."""
        try:
            yield
        except errors as exc:
            raise ConfigError(str(exc)) from exc

    @staticmethod
    @contextlib.contextmanager
    def as_failure(what: str, *errors: type[Exception]) -> Iterator[None]:
        """`errors` raised inside become a ServiceFailure "WHAT: error" (exit status 1)."""
        try:
            yield
        except errors as exc:
            raise ServiceFailure(f"{what}: {exc}") from exc

    # -- shared steps ------------------------------------------------------------------------

    def zmq_context(self) -> zmq.Context[zmq.Socket[bytes]]:
        """A ZeroMQ context, terminated last (register each socket's close after this, so
        every one is closed first: an open socket makes term() wait forever)."""
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.callback(context.term)
        return context

    def serve_security(
        self,
        security: Security,
        context: zmq.Context[zmq.Socket[bytes]],
        roles: Iterable[Role],
        auth: AuthMetrics,
    ) -> None:
        """Start `security`'s ZAP handler on `context`; stopped before the context ends."""
        security.serve(context, roles, auth)
        self.callback(security.close)

    def metrics_endpoint(self, port: int, host: str, registry: CollectorRegistry = REGISTRY) -> str:
        """Serve `registry` over HTTP on host:port (0 picks a port); returns the URL to
        scrape. A port that cannot be bound is a ServiceFailure."""
        try:
            server, _thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ServiceFailure(f"cannot serve metrics on port {port}: {exc}") from exc
        self.callback(server.server_close)
        self.callback(server.shutdown)
        return metrics_url(host, int(server.server_port))

    # -- the outcome -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _outcome(self) -> Iterator[list[int]]:
        """Map what ended the service to its exit status; restore the signal handlers."""
        status = [EXIT_OK]
        try:
            yield status
        except (ConfigError, KeyFileError) as exc:
            self._report(exc)
            status[0] = EXIT_CONFIG
        except ServiceFailure as exc:
            self._report(exc)
            status[0] = EXIT_FAILURE
        except Exception:
            self.log.exception("%s failed", self.prog)
            status[0] = EXIT_FAILURE
        finally:
            self.signals.restore()

    def _report(self, exc: Exception) -> None:
        line = " ".join(str(exc).splitlines())
        if self._serving_since is None:
            # Before the ready line nothing else was printed: the one line is the answer.
            sys.stderr.write(f"{self.prog}: {line}\n")
        else:
            self.log.error("%s", line)

    def _announce(self, started: Started[Any]) -> None:
        self.signals.set_target(started.service.request_stop)
        if self.signals.received is None:
            self.log.info("%s", ready_line(started.ready))
        self._serving_since = time.monotonic()

    def _stopped(self) -> None:
        if self._serving_since is None:
            return
        why = ""
        if self.signals.received is not None:
            why = f" on {signal.Signals(self.signals.received).name}"
        self.log.info("stopped%s after %.1fs", why, time.monotonic() - self._serving_since)


def run_service(
    prog: str, log: logging.Logger, start: Callable[[Lifecycle], Started[Servable]]
) -> int:
    """Run a blocking service from `start` to its exit; returns the exit status.

    Args:
        prog: the program name that starts one-line errors, e.g. "remem pageserver".
        log: the service's logger (the ready line and the stop are logged there).
        start: opens and binds everything, registering cleanups on the lifecycle it is
            given; returns the service and its ready fields.
    """
    lifecycle = Lifecycle(prog, log)
    with lifecycle._outcome() as status:
        lifecycle.signals.install()
        with ExitStack() as stack:
            lifecycle._stack = stack
            started = start(lifecycle)
            lifecycle._announce(started)
            started.service.serve_forever()
        lifecycle._stopped()
    return status[0]


def run_cli(
    argv: list[str] | None,
    model: type[ConfigT],
    start: Callable[[ConfigT, Lifecycle], Started[Servable]],
    *,
    prog: str,
    env_prefix: str,
    description: str,
) -> int:
    """The whole `cli.main` of a blocking service: parse its flags and environment into
    `model` (`load_config`: one line and exit status 2 on a bad value), log at the config's
    `log_level`, and `run_service` with `start(config, lifecycle)`.

    Args:
        prog: "remem SERVICE"; the service's logger is named SERVICE.
        env_prefix, description: as `load_config` takes them.

    Returns:
        The process exit status.
    """
    config = load_config(model, argv, prog=prog, env_prefix=env_prefix, description=description)
    log = setup_logging(prog.removeprefix("remem "), config.log_level)
    return run_service(prog, log, partial(start, config))


async def run_service_async(
    prog: str,
    log: logging.Logger,
    start: Callable[[Lifecycle], Awaitable[Started[AsyncServable]]],
    *,
    forced_exit: int | None = None,
) -> int:
    """`run_service` for an asyncio service: `start` and `serve` are awaited, cleanups may be
    coroutines (`Lifecycle.async_callback`), and the signals arrive through the loop.

    `forced_exit`: the status a repeated stop signal exits with, after one log line (None:
    the repeat kills the process, as the kernel's default action does).
    """
    lifecycle = Lifecycle(prog, log, forced_exit)
    with lifecycle._outcome() as status:
        lifecycle.signals.install(asyncio.get_running_loop())
        async with AsyncExitStack() as stack:
            lifecycle._stack = stack
            started = await start(lifecycle)
            lifecycle._announce(started)
            await started.service.serve()
        lifecycle._stopped()
    return status[0]
