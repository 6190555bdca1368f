"""The ``nbs`` command: subcommands mapped to plain typed functions.

Each subcommand group lives in its own module of this package and exposes ``register(subparsers)``;
nothing outside ``cli`` imports from it. Expected errors (:class:`noblankslate.errors.NbsError`) and
file-system errors are caught here, once, for every subcommand: one line on stderr, the error's exit
status, no traceback. Other exceptions are bugs and keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

from noblankslate.cli import analyze as analyze_commands
from noblankslate.cli import data as data_commands
from noblankslate.cli import demo as demo_commands
from noblankslate.cli import experiment as experiment_commands
from noblankslate.cli import inference as inference_commands
from noblankslate.cli import memory as memory_commands
from noblankslate.cli import plot as plot_commands
from noblankslate.cli import train as train_commands
from noblankslate.errors import NbsError, describe_os_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbs", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    data_commands.register(subparsers)
    train_commands.register(subparsers)
    plot_commands.register(subparsers)
    memory_commands.register(subparsers)
    demo_commands.register(subparsers)
    experiment_commands.register(subparsers)
    analyze_commands.register(subparsers)
    inference_commands.register(subparsers)
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, letting ``key=value`` overrides come anywhere after the config, between options too
    (``nbs memory build CONFIG --evaluate retrieval.k=8``). Plain argparse stops filling a ``nargs="*"``
    positional at the first option, and its intermixed parsing does not work with subcommands, so the
    leftover words are appended to the overrides in the order given; anything else left over (a mistyped
    option, a stray word) is the usual "unrecognized arguments" error."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_arguments(parser, argv)
    try:
        return int(args.handler(args) or 0)
    except NbsError as error:
        print(f"{error.label}: {error}", file=sys.stderr)
        return error.exit_code
    except OSError as error:
        if error.filename is None:  # not about a file the user can fix: keep the traceback
            raise
        print(f"file error: {describe_os_error(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
