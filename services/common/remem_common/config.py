"""Command-line and environment configuration shared by every remem service.

Each service describes its settings as one frozen pydantic model. `load_config` turns the
model's fields into flags (`--metrics-port`) and environment variables
(`REMEM_PAGESERVER_METRICS_PORT`), with flag > environment > default, validates the result
before anything is bound, and on a bad value prints one line and exits with status 2.
Every flag's help shows its default (`DefaultsHelpFormatter` does the same for the plain
argparse tools).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from pydantic import BaseModel, ByteSize, ConfigDict, ValidationError
from pydantic.fields import FieldInfo

ModelT = TypeVar("ModelT", bound=BaseModel)
EndpointT = TypeVar("EndpointT", bound=str | None)

EXIT_CONFIG_ERROR = 2


class ServiceConfig(BaseModel):
    """Base of every service's config: frozen, and unknown keys are an error."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    if TYPE_CHECKING:
        # Every service has one (`remem_common.lifecycle.run_cli` reads it), declared in its
        # own model: a field here would move the flag in each --help.
        log_level: str


class _OneLineParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line, as the services promise."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_CONFIG_ERROR)


def shown_default(value: Any) -> str:
    """A default as a user types it: on/off for switches, none, 1.0GiB for sizes."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, ByteSize):
        return value.human_readable(decimal=False) if value else "0"
    return str(value)


def _default_note(field: FieldInfo) -> str:
    """' (default: X)' for the help of a field, ' (required)' if it has none, or '' when the
    description already says what an unset (None) value means."""
    if field.is_required():
        return "" if "required" in (field.description or "") else " (required)"
    default = field.get_default(call_default_factory=True)
    if default is None and "default" in (field.description or ""):
        return ""
    return f" (default: {shown_default(default)})".replace("%", "%%")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help of every option ends with its default, or `(required)`."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS:
            return text
        if action.required:
            return text + " (required)"
        if "default" in text:
            return text
        return text + f" (default: {shown_default(action.default)})".replace("%", "%%")


def _is_bool(annotation: Any) -> bool:
    """bool, or `bool | None` (a switch whose default depends on other settings)."""
    return annotation is bool or annotation == bool | None


def env_name(prefix: str, field: str) -> str:
    """The environment variable that sets `field`, e.g. REMEM_PAGESERVER_METRICS_PORT."""
    return f"{prefix}{field.upper()}"


def load_config(
    model: type[ModelT],
    argv: list[str] | None,
    *,
    prog: str,
    env_prefix: str,
    description: str = "",
    environ: dict[str, str] | None = None,
) -> ModelT:
    """Parse flags and environment into a validated `model`, or exit 2 with one line.

    Args:
        model: the service's frozen settings model; each field becomes a flag.
        argv: arguments after the program name (None means sys.argv[1:]).
        prog: program name used in messages, e.g. "remem pageserver".
        env_prefix: e.g. "REMEM_PAGESERVER_"; the field name upper-cased follows it.
        description: help text.
        environ: the environment to read (default os.environ).

    Returns:
        The validated config. `--print-config` prints it as JSON and exits 0.
    """
    env = os.environ if environ is None else environ
    parser = _OneLineParser(prog=prog, description=description)
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = (
            (field.description or "")
            + _default_note(field)
            + f" [env {env_name(env_prefix, name)}]"
        ).lstrip()
        if _is_bool(field.annotation):
            # --flag / --no-flag: a boolean that defaults to on must be switchable off too.
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, default=None, help=help_text)
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective config and exit (default: off)",
    )
    namespace = parser.parse_args(argv)

    values: dict[str, Any] = {}
    for name in model.model_fields:
        from_env = env.get(env_name(env_prefix, name))
        if from_env is not None:
            values[name] = from_env
        from_flag = getattr(namespace, name)
        if from_flag is not None:
            values[name] = from_flag
    try:
        config = model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if not where:
            # A check across fields (e.g. "Curve is on by default: give ... or --insecure")
            # names its flags itself.
            message = first["msg"].removeprefix("Value error, ")
            sys.stderr.write(f"{prog}: {message}\n")
            sys.exit(EXIT_CONFIG_ERROR)
        flag = "--" + where.replace("_", "-")
        sys.stderr.write(f"{prog}: invalid {flag}: {first['msg']}\n")
        sys.exit(EXIT_CONFIG_ERROR)
    if namespace.print_config:
        sys.stdout.write(
            json.dumps(config.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"
        )
        sys.exit(0)
    return config


def zmq_endpoint(value: EndpointT, example: str) -> EndpointT:
    """A config's endpoint setting (None: unset) as given if tcp:// or ipc://, what the
    services bind and connect to; else a ValueError that shows `example`."""
    if value is not None and not value.startswith(("tcp://", "ipc://")):
        raise ValueError(f"must be a ZeroMQ endpoint like {example} or ipc://PATH")
    return value


def bind_address(listen: str) -> str:
    """The endpoint to hand zmq bind: port 0 becomes zmq's wildcard port."""
    if listen.startswith("tcp://") and listen.endswith(":0"):
        return listen[:-2] + ":*"
    return listen
