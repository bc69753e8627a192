"""Logging set-up shared by the services: one line per event, key=value fields after the text."""

from __future__ import annotations

import logging
import sys


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    """Configure the root logger for a service process and return the service's logger.

    Lines go to stderr as `LEVEL service: text key=value ...`; tests and `remem up` wait for
    the `ready ...` line a service prints once it serves.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    return logging.getLogger(service)
