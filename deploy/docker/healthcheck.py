"""Container health check of a remem service (the images' HEALTHCHECK).

    python3 healthcheck.py SERVICE        # SERVICE: pageserver, placement, client or mirror

Healthy means the service answers where it serves: its metrics endpoint returns its own
metric families (not just any HTTP server on that port), and for the client the NBD listener
sends the NBD greeting. It reads the same environment as the service
(REMEM_<SERVICE>_METRICS_HOST, _METRICS_PORT, REMEM_CLIENT_NBD_LISTEN), which the images set,
so a flag given on the command line instead is not seen. Exit 0 when healthy, 1 with one line
on stderr saying what failed. Standard library only, so it costs a fraction of a second.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request

TIMEOUT = 3.0
# A metric family each service always exports once it serves: its presence shows the
# endpoint is that service's and that the service got past startup.
MARKER = {
    "pageserver": "pageserver_capacity_bytes",
    "placement": "placement_pageservers",
    "client": "client_nbd_connections",
    "mirror": "mirror_clean",
}
WILDCARDS = ("", "0.0.0.0", "::", "[::]")


def env(service: str, name: str) -> str:
    """REMEM_<SERVICE>_<NAME>, or raise if the image or the user did not set it."""
    key = f"REMEM_{service.upper()}_{name}"
    value = os.environ.get(key)
    if value is None:
        raise RuntimeError(f"{key} is not set")
    return value


def check_metrics(service: str) -> None:
    """The metrics endpoint answers 200 with the service's marker family."""
    host = env(service, "METRICS_HOST")
    host = "127.0.0.1" if host in WILDCARDS else host
    port = env(service, "METRICS_PORT")
    url = f"http://{host}:{port}/metrics"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        body = response.read().decode()
    if f"\n{MARKER[service]}" not in body:
        raise RuntimeError(f"{url} lacks {MARKER[service]}")


def check_nbd_greeting() -> None:
    """The client's NBD TCP listener sends the fixed-newstyle greeting.

    Hanging up before sending the client flags is a clean leave for the server (no error
    counted, nothing logged above debug).
    """
    listen = os.environ.get("REMEM_CLIENT_NBD_LISTEN")
    if not listen:
        return  # Unix socket only: the metrics check stands alone
    from remem_client.nbd import wire

    host, _, port = listen.rpartition(":")
    host = "127.0.0.1" if host in WILDCARDS else host.strip("[]")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as conn:
        greeting = b""
        while len(greeting) < wire.GREETING.size:
            chunk = conn.recv(wire.GREETING.size - len(greeting))
            if not chunk:
                raise RuntimeError(f"NBD {listen} closed during the greeting")
            greeting += chunk
    magic, option_magic, _flags = wire.GREETING.unpack(greeting)
    if (magic, option_magic) != (wire.NBDMAGIC, wire.IHAVEOPT):
        raise RuntimeError(f"NBD {listen} sent no NBD greeting")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] not in MARKER:
        sys.stderr.write(f"usage: healthcheck.py {{{','.join(MARKER)}}}\n")
        return 2
    service = argv[1]
    try:
        check_metrics(service)
        if service == "client":
            check_nbd_greeting()
    except (OSError, RuntimeError, ValueError) as exc:
        sys.stderr.write(f"unhealthy: {service}: {exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
