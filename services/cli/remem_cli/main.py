"""`remem SUBCOMMAND ...`: dispatch to each service's own entry point.

Each subcommand is the `main(argv)` of one package, imported only when chosen so that
`remem pageserver` does not pay for the client's imports.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "pageserver": ("remem_pageserver.cli", "store pages in RAM for clients (memory donor)"),
    "placement": ("remem_placement.cli", "control plane: registration, placement, repair"),
    "client": ("remem_client.cli", "the NBD export a host swaps to"),
    "mirror": ("remem_mirror.cli", "local write-behind copy of every page-out"),
    "up": ("remem_cli.up", "run a whole local cluster in the foreground"),
    "status": ("remem_placement.status", "show page servers, slabs and repairs"),
    "drain": ("remem_placement.drain", "move every slab off a page server"),
    "keys": ("remem_cli.keys", "make a Curve keypair (role, tenant) for a remem process"),
}

USAGE = "usage: remem SUBCOMMAND [--help] [args...]\n\nsubcommands:\n" + "".join(
    f"  {name:<11} {text}\n" for name, (_, text) in SUBCOMMANDS.items()
)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen subcommand; returns its exit status."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        sys.stderr.write(f"remem: unknown subcommand {name!r}\n{USAGE}")
        return 2
    module_name, _ = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            sys.stderr.write(f"remem: subcommand {name!r} is not available in this build\n")
            return 2
        raise
    entry: Callable[[list[str]], int] = module.main
    return entry(rest)


if __name__ == "__main__":
    sys.exit(main())
