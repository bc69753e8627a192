"""Shared library of remem's services: wire protocol, framing, config and process helpers."""
