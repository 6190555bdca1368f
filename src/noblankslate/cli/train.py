"""``nbs train CONFIG [key=value ...]``: the training run (one process, or under torchrun)."""

from __future__ import annotations

import argparse
import sys

from noblankslate.config import ConfigError, load_config
from noblankslate.data.schema import DataError
from noblankslate.data.tokenize import TokenizationMismatchError


def train(config_path: str, overrides: list[str]) -> int:
    """Load and validate the config, then train; config and data errors stop before any work."""
    from noblankslate.runtime import distributed_context
    from noblankslate.train.checkpoint import CheckpointError
    from noblankslate.train.lock import RunLocked
    from noblankslate.train.loop import (
        ConfigChanged,
        TrainingDiverged,
        TrainingInterrupted,
    )
    from noblankslate.train.loop import train as run_training

    try:
        config = load_config(config_path, overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    # Expected failures: one line on stderr and an exit status, no traceback (others keep theirs).
    expected = [((DataError, TokenizationMismatchError), "data error:", 2), ((ConfigChanged,), "config error:", 2),
                ((CheckpointError,), "checkpoint error:", 2), ((RunLocked,), "run folder in use:", 2),
                ((TrainingInterrupted,), "training", 130), ((TrainingDiverged,), "training stopped:", 1)]
    with distributed_context() as context:
        try:
            run_training(config, context)
        except tuple(kind for kinds, _, _ in expected for kind in kinds) as error:
            label, status = next((label, status) for kinds, label, status in expected if isinstance(error, kinds))
            print(f"{label} {error}", file=sys.stderr)
            return status
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="train (or evaluate) a run from a YAML config",
        description="Train a run from a YAML config (the original Coconut keys), with dotted key=value "
                    "overrides. Works as one process, or under torchrun (DDP/FSDP). A run started again in "
                    "the same save_path/name folder resumes from its latest complete checkpoint.",
    )
    p.add_argument("config", help="YAML config file (see args/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=3e-4 model_config.n_layer=2")
    p.set_defaults(handler=lambda a: train(a.config, a.overrides))
