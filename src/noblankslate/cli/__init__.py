"""The ``nbs`` command: subcommands mapped to plain typed functions.

Each subcommand group lives in its own module of this package and exposes ``register(subparsers)``;
nothing outside ``cli`` imports from it.
"""

from __future__ import annotations

import argparse
import sys

from noblankslate.cli import data as data_commands
from noblankslate.cli import demo as demo_commands
from noblankslate.cli import experiment as experiment_commands
from noblankslate.cli import memory as memory_commands
from noblankslate.cli import plot as plot_commands
from noblankslate.cli import train as train_commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbs", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    data_commands.register(subparsers)
    train_commands.register(subparsers)
    plot_commands.register(subparsers)
    memory_commands.register(subparsers)
    demo_commands.register(subparsers)
    experiment_commands.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
