"""`remem keys`: make a Curve keypair for one remem process (pyzmq's certificate format).

Writes KEYDIR/NAME.key (the public certificate: give it to the peers that must admit or reach
this process) and KEYDIR/NAME.key_secret (mode 0600: only this process reads it). The
certificate's metadata records the role and, for a client, its tenant; the services read it
from the public certificates in their `--curve-authorized` folder.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import NoReturn, cast

from remem_common.config import EXIT_CONFIG_ERROR, DefaultsHelpFormatter
from remem_common.protocol.client_pageserver import TENANT_PATTERN
from remem_common.security import ROLES, Role, write_keypair

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_CONFIG_ERROR)


def main(argv: list[str] | None = None) -> int:
    """Write NAME.key and NAME.key_secret; returns the exit status."""
    parser = _Parser(
        prog="remem keys",
        description=__doc__.splitlines()[0] if __doc__ else "",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("name", help="file name of the pair, e.g. pageserver-0 or tenant-a")
    parser.add_argument("--dir", type=Path, required=True, help="folder to write the pair to")
    parser.add_argument("--role", choices=ROLES, default="client", help="what the key may do")
    parser.add_argument("--tenant", help="the tenant a client key acts for (clients only)")
    parser.add_argument("--force", action="store_true", help="replace an existing pair")
    args = parser.parse_args(argv)
    if not re.match(NAME_PATTERN, args.name):
        parser.error(f"name {args.name!r}: letters, digits, . _ - only")
    if args.role == "client" and not args.tenant:
        parser.error("a client key needs --tenant")
    if args.role != "client" and args.tenant:
        parser.error("--tenant is for client keys only (other roles act for every tenant)")
    if args.tenant and not re.match(TENANT_PATTERN, args.tenant):
        parser.error(f"--tenant {args.tenant!r} is not a valid tenant name")
    public = args.dir / f"{args.name}.key"
    if not args.force and (public.exists() or public.with_suffix(".key_secret").exists()):
        sys.stderr.write(f"remem keys: {public} exists (--force replaces it)\n")
        return 1
    public, secret = write_keypair(args.dir, args.name, cast(Role, args.role), args.tenant)
    sys.stdout.write(f"public={public} secret={secret} role={args.role}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
