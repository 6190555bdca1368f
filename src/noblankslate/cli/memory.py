"""``nbs memory build CONFIG`` and ``nbs memory report --index-path P``: the No Blank Slate memory."""

from __future__ import annotations

import argparse
import dataclasses
import json


def build(config_path: str, overrides: list[str], evaluate: bool = False, metrics_out: str | None = None) -> int:
    """Build the memory of the model at ``load_model_path`` from training data; save it at ``index.path``.

    With ``evaluate``, the memory is then evaluated on ``val_path`` exactly as training evaluates it after an
    epoch (:func:`~noblankslate.memory.evaluation.evaluate_memory`, at the checkpoint's stage): a checkpoint
    trained with ``training.memory_in_training`` reads it through the gate saved beside it, any other through
    the fixed nudge; the metrics say which (``nudge.kind``) and are printed (and written to ``metrics_out``).
    """
    import time
    from pathlib import Path

    from noblankslate.config import ConfigError, load_config
    from noblankslate.data.curriculum import prompt_view
    from noblankslate.eval.evaluate import evaluate_generation
    from noblankslate.eval.setup import setup_run
    from noblankslate.files import write_text_atomic
    from noblankslate.memory.builder import build_memory, saved_key_head
    from noblankslate.memory.evaluation import evaluate_memory
    from noblankslate.memory.gate import NUDGE_FIXED, NUDGE_GATE, saved_gate
    from noblankslate.model.checkpoint_files import evaluated_position
    from noblankslate.runtime import distributed_context, print0
    from noblankslate.train.parallel import autocast, wrap_model

    config = load_config(config_path, overrides)
    if config.load_model_path is None:
        raise ConfigError("nbs memory build needs load_model_path (the trained model whose thoughts to store)")
    if metrics_out is not None and not evaluate:
        raise ConfigError("--metrics-out needs --evaluate (the metrics come from the evaluation)")
    config = dataclasses.replace(config, only_eval=True, retrieval=dataclasses.replace(config.retrieval, enabled=True))
    with distributed_context() as context:
        setup = setup_run(config)
        key_head = saved_key_head(config)
        gate = saved_gate(config.load_model_path, config, setup.model.base_causallm.config.hidden_size, context.device)
        print0(f"nudge: {NUDGE_GATE + ' (the learned gate saved with the checkpoint)' if gate is not None else NUDGE_FIXED}")
        parallel = wrap_model(setup.model, config, context)
        if not evaluate:
            with parallel.gathered() as model:
                built = build_memory(model, setup, context, lockstep=parallel.lockstep, key_head=key_head)
            print0(f"memory written to {config.index.path}")
            print0(json.dumps(built.report, indent=1))
            return 0
        position = evaluated_position(config.load_model_path, config)
        epoch, stage = position.epoch or 0, position.stage
        print0(f"evaluating at stage {stage} (from {position.source})")
        prompts = prompt_view(setup.val_tokens, stage, setup.spec)
        with parallel.gathered() as model, autocast(config, context, parallel.kind):
            started = time.perf_counter()
            off = evaluate_generation(model, setup.tokenizer, setup.val, prompts, setup.collate,
                                      batch_size=config.batch_size_eval or config.batch_size_training,
                                      max_new_tokens=config.resolved_max_new_tokens, context=context,
                                      lockstep=parallel.lockstep, step_separator=config.step_separator)
            metrics, _ = evaluate_memory(model, setup, context, epoch=epoch, stage=stage, off=off,
                                         off_seconds=time.perf_counter() - started, lockstep=parallel.lockstep,
                                         key_head=key_head, gate=gate)
        print0(f"memory written to {config.index.path}")
        if metrics is not None:
            print0(json.dumps(metrics, indent=1))
            if metrics_out is not None:
                write_text_atomic(Path(metrics_out), json.dumps(metrics, indent=1))
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
                                        "index, values, metadata, projections, calibration and exit probe. With "
                                        "--evaluate, then evaluate val_path with it as training does after an epoch, "
                                        "through the learned gate saved with a checkpoint trained with "
                                        "training.memory_in_training, else the fixed nudge (the metrics' nudge.kind).")
    p.add_argument("config", help="YAML config (with load_model_path)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. retrieval.k=8")
    p.add_argument("--evaluate", action="store_true",
                   help="then evaluate val_path with the memory as training does after an epoch (through the learned "
                        "gate if the checkpoint has one, else the fixed nudge) and print the metrics")
    p.add_argument("--metrics-out", metavar="FILE", help="with --evaluate: also write the metrics here (JSON)")
    p.set_defaults(handler=lambda a: build(a.config, a.overrides, a.evaluate, a.metrics_out))
    p = commands.add_parser("report", help="summarise a memory and its per-epoch retrieval metrics",
                            description="Entry count, dims, key/value norms, nearest-anchor similarities, and a "
                                        "per-epoch table of ECE, Brier, false exits, mean forward passes and index size.")
    add_report_arguments(p)
    p.set_defaults(handler=lambda a: report(a.index_path, a.metrics_dir, a.plot, a.json))
