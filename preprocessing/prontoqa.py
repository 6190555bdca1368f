"""Convert data/5hop_0shot_random.json (the ProntoQA generator's output) to data/prontoqa_{train,valid,test}.json.

Run from the project root after copying the generator's output into data/ (see the README). The same
conversion is ``nbs data prontoqa data/5hop_0shot_random.json --out-dir data``.
"""

from __future__ import annotations

import sys

from noblankslate.data.convert import ConversionError, convert_prontoqa_file


def main() -> int:
    try:
        written = convert_prontoqa_file("data/5hop_0shot_random.json", "data")
    except ConversionError as error:
        print(error, file=sys.stderr)
        return 1
    for path, n in written.values():
        print(f"{path}: {n} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
