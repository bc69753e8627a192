"""The client's start-up error, apart from the server that reports it, so that the parts the
server assembles (remote/assembly.py) can raise it without importing the server."""

from __future__ import annotations


class StartupError(Exception):
    """Something could not be bound or built; the message is the one log line."""
