"""``nbs data ...``: check, convert, generate and describe data files."""

from __future__ import annotations

import argparse
import sys

from noblankslate.data.schema import DataError, check_records, read_records


def check(path: str) -> int:
    """Validate a data file; print every bad record (index and field). Returns 1 if any."""
    try:
        records = read_records(path)
    except DataError as error:
        print(error, file=sys.stderr)
        return 1
    problems = check_records(records, path)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{path}: {len(problems)} problem(s) in {len(records)} records", file=sys.stderr)
        return 1
    print(f"{path}: {len(records)} records, all valid")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check, convert, generate and describe data files")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("check", help="validate a data file and list every bad record",
                            description="Validate a Coconut JSON data file (a list of {question, answer, steps}). "
                                        "Prints every bad record with its index and field; exit code 1 if any.")
    p.add_argument("file", help="JSON data file")
    p.set_defaults(handler=lambda a: check(a.file))
