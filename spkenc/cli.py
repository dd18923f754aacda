"""The `spkenc` command line: preprocess, train, embed, verify, evaluate.

Exit codes: 0 on success, 2 on a usage error (argparse), 1 when nothing usable came out
or a checkpoint was refused.
"""

import argparse
import logging
import sys
from typing import Callable, Optional, Sequence

log = logging.getLogger("spkenc")

# Each command registers (name, add_arguments, run). run(args) returns the exit code.
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = []


def command(name: str, help_text: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Decorator: register `run(args) -> int` as the subcommand `name`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        _COMMANDS.append((name, help_text, add_arguments, run))
        return run

    return register


# ---- section: preprocess (corpus -> trimmed wavs -> mel shards) ----

# ---- section: train ----

# ---- section: embed / verify ----

# ---- section: evaluate ----


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spkenc", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
