"""``python tools/retrieval_report.py --index-path P [--metrics-dir D] [--plot FILE]``.

The same as ``nbs memory report``: a quick health check of a memory after retrieval runs.
"""

import argparse
import sys

from noblankslate.cli.memory import add_report_arguments, report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_report_arguments(parser)
    args = parser.parse_args()
    return report(args.index_path, args.metrics_dir, args.plot, args.json)


if __name__ == "__main__":
    sys.exit(main())
