"""The rows of the paper's Table 1 as method flags over one base config.

Every row trains on the same data, for the same epochs and batch size as the base config, so all rows
take the same number of optimizer steps; only the method flags differ. Each row sets every method flag
explicitly, so a base config written for one method (say ``args/prosqa_coconut.yaml``) serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

from noblankslate.config import METHOD_FLAGS
from noblankslate.errors import InvalidValue

_ALL_FLAGS = (*METHOD_FLAGS, "pause_as_thought", "no_curriculum")


@dataclass(frozen=True)
class Row:
    """One row of Table 1."""

    name: str
    """What users type in ``--rows``."""
    label: str
    """The paper's name of the row."""
    flags: tuple[str, ...]
    """The method flags that are true; every other flag is set false."""
    paper_prosqa: float | None
    """The paper's ProsQA accuracy with GPT-2 (Table 1), for reference."""

    def overrides(self) -> list[str]:
        return [f"{flag}={'true' if flag in self.flags else 'false'}" for flag in _ALL_FLAGS]


ROWS: dict[str, Row] = {row.name: row for row in (
    Row("no_cot", "No-CoT", ("no_cot",), 0.767),
    Row("cot", "CoT", ("cot",), 0.775),
    Row("coconut", "Coconut", ("coconut",), 0.970),
    Row("no_curriculum", "Coconut w/o curriculum", ("coconut", "no_curriculum"), 0.761),
    Row("no_thoughts", "Coconut w/o thought", ("no_thoughts",), 0.955),
    Row("pause_as_thought", "Coconut pause as thought", ("coconut", "pause_as_thought"), 0.966),
    Row("pause_token", "Pause token", ("pause_token",), 0.759),
)}
"""Table 1's rows in the paper's order (iCoT is not implemented)."""

REFERENCE_ROW = "coconut"
"""Every other row is compared with this one, paired on the same items."""


def parse_rows(text: str | None) -> list[Row]:
    """``"no_cot,coconut"`` -> those rows in the given order; None or "all" -> every row.

    Raises:
        ValueError: naming an unknown row and listing the valid ones.
    """
    if text is None or text.strip() == "all":
        return list(ROWS.values())
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise InvalidValue("--rows is empty; give a comma-separated list of " + ", ".join(ROWS))
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        raise InvalidValue(f"unknown row {unknown[0]!r}; the rows are: {', '.join(ROWS)}")
    if len(set(names)) != len(names):
        raise InvalidValue(f"--rows names a row twice: {text}")
    return [ROWS[name] for name in names]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` or ``"0-2"`` -> [0, 1, 2]."""
    try:
        if "-" in text and "," not in text:
            low, high = (int(x) for x in text.split("-"))
            seeds = list(range(low, high + 1))
        else:
            seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidValue(f"--seeds: expected integers like 0,1 or 0-2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise InvalidValue(f"--seeds: expected distinct integers >= 0, got {text!r}")
    return seeds
