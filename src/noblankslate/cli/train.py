"""``nbs train CONFIG [key=value ...]``: the training run (one process, or under torchrun)."""

from __future__ import annotations

import argparse

from noblankslate.config import load_config


def train(config_path: str, overrides: list[str]) -> int:
    """Load and validate the config, then train; config and data errors stop before any work.

    Expected errors (bad config or data, a damaged checkpoint, a folder in use, a diverged or interrupted
    run) reach ``nbs``'s one handler as :class:`~noblankslate.errors.NbsError` with their exit status.
    """
    from noblankslate.runtime import distributed_context
    from noblankslate.train.loop import train as run_training

    config = load_config(config_path, overrides)
    with distributed_context() as context:
        run_training(config, context)
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
