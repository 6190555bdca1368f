"""``nbs generate``, ``nbs eval``, ``nbs export``: use a trained model without writing a config.

Each takes a run folder (its latest complete checkpoint), a checkpoint folder or an exported folder
(and, for a weights file of the original Coconut code, ``--config``). Heavy imports happen inside the
handlers, so ``nbs`` starts fast and ``nbs generate`` reaches its first answer quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from noblankslate.errors import NbsError

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "seed")


class UsageError(NbsError, ValueError):
    """Flags that do not go together; the message names them."""

    label = "usage error"


def _sampling_options(args: argparse.Namespace, num_samples: int | None = None):
    """SamplingOptions from ``--sample`` and its flags, or None; sampling flags without ``--sample`` are refused."""
    given = [flag for flag in SAMPLING_FLAGS + ("num_samples",) if getattr(args, flag, None) is not None]
    if not args.sample:
        if given:
            flags = ", ".join("--" + flag.replace("_", "-") for flag in given)
            raise UsageError(f"{flags} {'applies' if len(given) == 1 else 'apply'} only with --sample "
                             "(greedy decoding is the default)")
        return None
    from noblankslate.inference.evaluation import SamplingOptions

    chosen = {flag: getattr(args, flag) for flag in SAMPLING_FLAGS if getattr(args, flag) is not None}
    return SamplingOptions(**chosen, num_samples=num_samples or 1)


def read_questions(questions: list[str] | None, file: str | None) -> list[str]:
    """Questions from ``--question``, else from a file (``-``: stdin): one per line of text, or JSONL
    records with a "question" field (a Coconut data file in JSON is read too)."""
    if questions:
        if file is not None:
            raise UsageError("give questions with --question or with --file, not both")
        return questions
    if file is None or file == "-":
        if file is None and sys.stdin.isatty():
            raise UsageError("no questions: pass --question TEXT, --file FILE, or pipe them on stdin")
        text, name = sys.stdin.read(), "stdin"
    else:
        text, name = Path(file).read_text(encoding="utf-8"), file
    stripped = text.strip()
    if stripped.startswith("["):  # a Coconut data file: a JSON list of records
        try:
            records = json.loads(stripped)
        except ValueError as error:
            raise UsageError(f"{name}: starts with '[' but is not a JSON list: {error}") from None
    else:
        records = []
        for number, line in enumerate(stripped.splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError as error:
                    raise UsageError(f"{name}: line {number}: not a JSON object: {error}") from None
            else:
                records.append(line.strip())
    out = []
    for number, record in enumerate(records, 1):
        if isinstance(record, dict):
            if not isinstance(record.get("question"), str):
                raise UsageError(f"{name}: record {number}: no string field 'question'")
            record = record["question"]
        if not isinstance(record, str):
            raise UsageError(f"{name}: record {number}: expected a question string or an object with 'question'")
        out.append(record)
    if not out:
        raise UsageError(f"{name}: no questions")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}{'es' if noun.endswith('s') else 's'}"


def _format_answer(answer, show_thoughts: bool) -> str:
    lines = [f"question: {answer.question}"]
    if show_thoughts and answer.thought_tokens is not None:
        for i, thought in enumerate(answer.thought_tokens, 1):
            lines.append(f"  thought {i}: " + "  ".join(f"{token!r} {p:.3f}" for token, p in thought))
    lines.append(f"output: {answer.output!r}")
    lines.append(f"answer: {answer.answer}   ({_count(answer.thoughts, 'thought')}, {_count(answer.generated_tokens, 'token')}, "
                 f"{_count(answer.forward_passes, 'forward pass')})")
    return "\n".join(lines)


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers while loading or saving (they would mix with answers)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def generate(args: argparse.Namespace) -> int:
    """Answer questions with a trained model, printing each batch's answers as soon as they are made."""
    questions = read_questions(args.question, args.file)
    sample = _sampling_options(args)
    _quiet_transformers()
    from noblankslate.inference import load

    thinking = load(args.model, config=args.config, device=args.device)
    sampling = None
    if sample is not None:
        import torch

        from noblankslate.model.coconut import Sampling

        sampling = Sampling(sample.temperature, sample.top_k, sample.top_p,
                            torch.Generator(device=thinking.device).manual_seed(sample.seed))
    top = args.thoughts_decoded
    for start in range(0, len(questions), args.batch_size):
        chunk = questions[start : start + args.batch_size]
        for answer in thinking.answer(chunk, args.num_thoughts, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size, top_tokens=top, sampling=sampling):
            text = json.dumps(answer.to_dict()) if args.json else _format_answer(answer, top > 0) + "\n"
            print(text, flush=True)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Accuracy (or pass@k and majority vote) on a data file; one process or under torchrun."""
    sample = _sampling_options(args, args.num_samples)
    _quiet_transformers()
    from noblankslate.data.schema import load_examples
    from noblankslate.inference import load
    from noblankslate.inference.evaluation import evaluate_file
    from noblankslate.runtime import distributed_context

    examples = load_examples(args.data)  # a bad record stops the run before the model is loaded
    with distributed_context() as context:
        thinking = load(args.model, config=args.config, device=context.device)
        report = evaluate_file(thinking, args.data, context, num_thoughts=args.num_thoughts, batch_size=args.batch_size,
                               max_new_tokens=args.max_new_tokens, sample=sample, examples=examples)
        if not context.is_main:
            return 0
        out = Path(args.predictions)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in report.predictions), encoding="utf-8")
        summary = {"model": str(thinking.source), **report.summary(), "predictions": str(out)}
        if args.json:
            print(json.dumps(summary, indent=1))
            return 0
        thoughts = thinking.num_thoughts if args.num_thoughts is None else args.num_thoughts
        print(f"model: {thinking.source} ({thinking.variant}, stage {thinking.stage}, {_count(thoughts, 'thought')} per question)")
        print(f"data: {report.data}: {report.total} questions"
              + (f", {sample.num_samples} samples each (temperature {sample.temperature}, top-k {sample.top_k}, "
                 f"top-p {sample.top_p}, seed {sample.seed})" if sample is not None else ""))
        kind = "mean accuracy of the samples" if sample is not None else "accuracy"
        print(f"{kind}: {report.accuracy:.4f}   CoT match {report.cot_match:.4f}   generated tokens "
              f"{report.mean_generated_tokens:.2f}   forward passes {report.mean_forward_passes:.2f} (per answer)")
        if report.pass_at_k is not None:
            print("pass@k: " + "  ".join(f"@{k} {v:.4f}" for k, v in report.pass_at_k.items()))
            print(f"majority vote accuracy: {report.majority_accuracy:.4f}")
        print(f"predictions: {out}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Write a checkpoint as a Hugging Face folder with coconut.json and a model card."""
    _quiet_transformers()
    from noblankslate.inference import load
    from noblankslate.inference.export import export_model

    thinking = load(args.checkpoint, config=args.config)
    out = export_model(thinking, args.out)
    print(f"exported {thinking.source} ({thinking.variant}, {_count(thinking.num_thoughts, 'thought')}) to {out}")
    return 0


def _model_arguments(p: argparse.ArgumentParser, name: str = "model") -> None:
    p.add_argument(name, help="run folder (its latest complete checkpoint), checkpoint folder, exported folder, "
                              "or a weights file of the original Coconut code (with --config)")
    p.add_argument("--config", help="the run config of an original-code weights file")


def _sampling_arguments(p: argparse.ArgumentParser, samples: bool = False) -> None:
    group = p.add_argument_group("sampling (only with --sample; greedy otherwise)")
    if samples:
        group.add_argument("--num-samples", type=int, help="answers per question (default 1)")
    group.add_argument("--sample", action="store_true", help="sample the answer tokens (the thoughts stay deterministic)")
    group.add_argument("--temperature", type=float, help="divide the logits by this (> 0; default 1.0)")
    group.add_argument("--top-k", type=int, help="keep the k most likely tokens (default 0: all)")
    group.add_argument("--top-p", type=float, help="nucleus: keep the most likely tokens up to this probability (default 1.0)")
    group.add_argument("--seed", type=int, help="seed of the sampling generator (default 0)")


def _decoding_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-thoughts", type=int, help="answer with this many continuous thoughts (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=int, help="generation budget (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="questions per batch (default 32)")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="answer questions with a trained model",
                              description="Answer questions with a trained model: each answer, the thoughts used "
                                          "and, with --thoughts-decoded, the top tokens of each thought.")
    _model_arguments(p)
    p.add_argument("--question", "-q", action="append", help="a question (repeatable)")
    p.add_argument("--file", help="questions: one per line, JSONL records with 'question', or a Coconut data "
                                  "file; '-' or no --question/--file: stdin")
    p.add_argument("--thoughts-decoded", type=int, nargs="?", const=5, default=0, metavar="N",
                   help="print the N (default 5) most likely tokens of each continuous thought")
    p.add_argument("--json", action="store_true", help="one JSON object per answer")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    _decoding_arguments(p)
    _sampling_arguments(p)
    p.set_defaults(handler=generate)

    p = subparsers.add_parser("eval", help="evaluate a trained model on a data file (greedy, or sampled: pass@k)",
                              description="Accuracy, generated tokens and forward passes of a trained model on a "
                                          "data file, with a predictions file; with --sample, pass@k (unbiased "
                                          "estimator) and majority-vote accuracy. Runs under torchrun too.")
    _model_arguments(p)
    p.add_argument("--data", required=True, help="data file in the Coconut format (JSON list of question/steps/answer)")
    p.add_argument("--predictions", default="predictions.jsonl", help="where to write one record per answer "
                                                                      "(default predictions.jsonl)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    _decoding_arguments(p)
    _sampling_arguments(p, samples=True)
    p.set_defaults(handler=evaluate)

    p = subparsers.add_parser("export", help="export a checkpoint as a Hugging Face folder",
                              description="Write a checkpoint as a standard Hugging Face folder (config.json, "
                                          "safetensors, tokenizer with the latent tokens) plus coconut.json and a "
                                          "model card; original-code checkpoints convert with --config.")
    _model_arguments(p, "checkpoint")
    p.add_argument("out", help="output folder (must not exist, or be empty)")
    p.set_defaults(handler=export)
