"""``nbs memory build CONFIG`` and ``nbs memory report --index-path P``: the No Blank Slate memory."""

from __future__ import annotations

import argparse
import dataclasses
import json


def build(config_path: str, overrides: list[str]) -> int:
    """Build the memory of the model at ``load_model_path`` from training data; save it at ``index.path``."""
    from noblankslate.config import ConfigError, load_config
    from noblankslate.eval.setup import setup_run
    from noblankslate.memory.builder import build_memory, saved_key_head
    from noblankslate.runtime import distributed_context, print0
    from noblankslate.train.parallel import wrap_model

    config = load_config(config_path, overrides)
    if config.load_model_path is None:
        raise ConfigError("nbs memory build needs load_model_path (the trained model whose thoughts to store)")
    config = dataclasses.replace(config, only_eval=True, retrieval=dataclasses.replace(config.retrieval, enabled=True))
    with distributed_context() as context:
        setup = setup_run(config)
        key_head = saved_key_head(config)
        parallel = wrap_model(setup.model, config, context)
        with parallel.gathered() as model:
            built = build_memory(model, setup, context, lockstep=parallel.lockstep, key_head=key_head)
        print0(f"memory written to {config.index.path}")
        print0(json.dumps(built.report, indent=1))
    return 0


def report(index_path: str, metrics_dir: str | None, plot: str | None, as_json: bool) -> int:
    """Print the report of a memory (and its per-epoch metrics); optionally draw the figures."""
    from noblankslate.memory.report import build_report, format_report, plot_report

    data = build_report(index_path, metrics_dir)
    print(json.dumps(data, indent=1) if as_json else format_report(data))
    if plot:
        print(plot_report(data, plot))
    return 0


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index-path", required=True, help="the FAISS index file (index.path)")
    parser.add_argument("--metrics-dir", help="folder with retrieval_metrics_epoch_*.json (default: next to the index, "
                                              "then the current folder)")
    parser.add_argument("--plot", metavar="FILE", help="also draw the per-epoch figures into this PNG")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    memory = subparsers.add_parser("memory", help="build and inspect the No Blank Slate memory")
    commands = memory.add_subparsers(dest="memory_command", required=True)
    p = commands.add_parser("build", help="build the memory of a trained model from training data",
                            description="Run the model at load_model_path over the training data (retrieval.build_from "
                                        "or train_path; never val_path) and write the memory at index.path: the FAISS "
                                        "index, values, metadata, projections, calibration and exit probe.")
    p.add_argument("config", help="YAML config (with load_model_path)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. retrieval.k=8")
    p.set_defaults(handler=lambda a: build(a.config, a.overrides))
    p = commands.add_parser("report", help="summarise a memory and its per-epoch retrieval metrics",
                            description="Entry count, dims, key/value norms, nearest-anchor similarities, and a "
                                        "per-epoch table of ECE, Brier, false exits, mean forward passes and index size.")
    add_report_arguments(p)
    p.set_defaults(handler=lambda a: report(a.index_path, a.metrics_dir, a.plot, a.json))
