"""``analyze``: every analysis of one checkpoint, written as ``analysis.json``, PNG figures and a summary.

The parts that do not apply to a checkpoint are skipped with a message naming what is missing, and
the others still run: the budget curve needs latent tokens in the prompts (Coconut, pause as thought,
pause token); decoded thoughts, the latent search and the interventions need continuous thoughts
(Coconut); the latent search also needs graph keys in the data. A CoT or no-thoughts checkpoint still
gets its ordinary evaluation, so its row can stand beside Coconut's (:func:`side_by_side`).
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from noblankslate.analysis import figures
from noblankslate.analysis.budget import budget_curve
from noblankslate.analysis.interventions import DEFAULT_SCALES, interventions
from noblankslate.analysis.search import latent_search
from noblankslate.analysis.subject import AnalysisError, Subject, generate, summary
from noblankslate.analysis.thoughts import decoded_thoughts
from noblankslate.config import Config
from noblankslate.data.convert import write_json_atomic
from noblankslate.eval.setup import setup_run
from noblankslate.model.checkpoint_files import evaluated_position
from noblankslate.model.weights import MODEL_FILE

REPORT_FILE = "analysis.json"
TABLES_FILE = "analysis.md"


def load_subject(config: Config, checkpoint: str | Path | None = None, data: str | Path | None = None,
                 limit: int | None = None) -> Subject:
    """Build the model and the evaluated items through :func:`~noblankslate.eval.setup.setup_run`.

    Args:
        checkpoint: a checkpoint folder (``model.safetensors``, ``config.yaml``, ``tokenizer/``);
            None uses ``config.load_model_path``.
        data: a data file to analyse instead of ``config.val_path``.
        limit: analyse only the first ``limit`` items.

    Raises:
        AnalysisError: no weights to analyse, a checkpoint folder without its model file, a bad limit.
    """
    if limit is not None and limit < 1:
        raise AnalysisError(f"--limit must be >= 1, got {limit}")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not (checkpoint / MODEL_FILE).is_file():
            raise AnalysisError(f"{checkpoint}: not a checkpoint folder (no {MODEL_FILE})")
    elif config.load_model_path is None:
        raise AnalysisError("nothing to analyse: pass --checkpoint (or set load_model_path in the config); "
                            f"no complete checkpoint was found in the run folder {config.run_dir}")
    weights = str(checkpoint) if checkpoint is not None else config.load_model_path
    run = replace(config, only_eval=True, load_model_path=weights,
                  val_path=str(data) if data is not None else config.val_path,
                  retrieval=replace(config.retrieval, enabled=False), debug=False)
    setup = setup_run(run, weights_from=checkpoint)
    stage = evaluated_position(weights, config).stage
    count = len(setup.val) if limit is None else min(limit, len(setup.val))
    return Subject(model=setup.model.eval(), tokenizer=setup.tokenizer, examples=setup.val[:count],
                   tokens=setup.val_tokens[:count], spec=setup.spec, collate=setup.collate, stage=stage,
                   method=config.variant, batch_size=config.batch_size_eval or config.batch_size_training,
                   max_new_tokens=config.resolved_max_new_tokens, step_separator=config.step_separator)


def analyze_subject(subject: Subject, out: str | Path | None = None, *, show: int = 0, top_k: int = 5,
                    scales: Sequence[float] = DEFAULT_SCALES, seed: int = 0, extra: int = 2,
                    meta: dict[str, Any] | None = None, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every analysis that applies; write ``analysis.json`` and the figures into ``out``.

    Args:
        show: print this many items with their decoded thoughts.
        top_k: tokens kept per decoded thought.
        scales: noise scales, relative to each thought's norm.
        seed: of the noise and of the swap pairing.
        extra: budgets tried beyond ``T``.
        meta: put into the report as is (the checkpoint and data file).

    Returns:
        The report (what ``analysis.json`` holds).
    """
    if not subject.examples:
        raise AnalysisError("no items to analyse (the data file is empty)")
    seconds: dict[str, float] = {}
    report: dict[str, Any] = {"method": subject.method, "stage": subject.stage, "items": len(subject.examples),
                              **(meta or {}), "skipped": {}, "seconds": seconds}
    started = time.perf_counter()
    base = generate(subject, subject.ordinary_prompts(), keep_thoughts=subject.feeds_thoughts)
    seconds["ordinary"] = time.perf_counter() - started
    counts = subject.latent_counts()
    report["ordinary"] = {**summary(base), "T": max(counts, default=0)}
    report["ordinary_items"] = [{k: r[k] for k in ("idx", "answer", "prediction", "output", "correct",
                                                   "generated_tokens", "forward_passes", "latent_count")}
                                for r in base]
    thoughts = subject.feeds_thoughts and max(counts, default=0) > 0
    why_not = (f"method {subject.method} feeds no continuous thoughts (its <|latent|> tokens are "
               "ordinary tokens, or its prompts have none)" if not subject.feeds_thoughts
               else f"the prompts of stage {subject.stage} hold no latent tokens")

    def timed(name: str, run: Callable[[], Any]) -> Any:
        begin = time.perf_counter()
        value = run()
        seconds[name] = time.perf_counter() - begin
        return value

    if subject.has_latent_budget:
        report["budget"] = timed("budget", lambda: budget_curve(subject, base, extra=extra))
    else:
        report["skipped"]["budget"] = (f"method {subject.method} puts no latent tokens in its prompts (no "
                                       "<|start-latent|> ... <|end-latent|> block); the budget curve needs a "
                                       "Coconut, pause-as-thought or pause-token checkpoint")
    if thoughts:
        report["decoded"] = timed("decoded", lambda: decoded_thoughts(subject.model, subject.tokenizer, base, k=top_k))
        search = timed("search", lambda: latent_search(subject.model, subject.tokenizer, subject.examples, base,
                                                       thoughts_per_step=subject.spec.c_thought))
        if "skipped" in search:
            report["skipped"]["search"] = search["skipped"]
        else:
            report["search"] = search
        report["interventions"] = timed("interventions", lambda: interventions(subject, base, scales=scales, seed=seed))
    else:
        for part in ("decoded", "search", "interventions"):
            report["skipped"][part] = f"{part} needs continuous thoughts: {why_not}"
    report["figures"] = write_outputs(report, out) if out is not None else []
    for line in format_summary(report):
        echo(line)
    if show:
        for line in format_examples(report, subject, show):
            echo(line)
    return report


def analyze(config: Config, checkpoint: str | Path | None = None, *, data: str | Path | None = None,
            out: str | Path | None = None, limit: int | None = None, show: int = 0, **options) -> dict[str, Any]:
    """``nbs analyze`` as a function: :func:`load_subject`, then :func:`analyze_subject`."""
    subject = load_subject(config, checkpoint, data=data, limit=limit)
    meta = {"checkpoint": str(checkpoint) if checkpoint is not None else config.load_model_path,
            "data": str(data) if data is not None else config.val_path,
            "stage_from": evaluated_position(checkpoint or config.load_model_path, config).source}
    return analyze_subject(subject, out, show=show, meta=meta, **options)


def write_outputs(report: dict[str, Any], out: str | Path) -> list[str]:
    """``analysis.json`` and one PNG per part that ran; returns the figure paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    method = report["method"]
    drawn = []
    if "budget" in report:
        drawn.append(figures.plot_budget(report["budget"], report["ordinary"]["accuracy"], out / "analysis_budget.png",
                                         f"{method}: answer after exactly j latent tokens"))
    if "decoded" in report:
        drawn.append(figures.plot_norms(report["decoded"], out / "analysis_norms.png", f"{method}: thought norms"))
    if "search" in report:
        drawn.append(figures.plot_search_mass(report["search"], out / "analysis_search_mass.png"))
        drawn.append(figures.plot_search_value(report["search"], out / "analysis_search_value.png"))
    if "interventions" in report:
        drawn.append(figures.plot_interventions(report["interventions"], report["ordinary"]["accuracy"],
                                                out / "analysis_interventions.png"))
    report["figures"] = [str(p) for p in drawn]
    write_json_atomic(report, out / REPORT_FILE)
    (out / TABLES_FILE).write_text(markdown_tables(report), encoding="utf-8")
    return report["figures"]


def _cell(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value).replace("|", "\\|")


def _p(value: float) -> str:
    return f"{value:.3g}"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows), ""]


def markdown_tables(report: dict[str, Any]) -> str:
    """The report's numbers as markdown tables (``analysis.md``), one per part that ran."""
    o = report["ordinary"]
    lines = [f"# {report['method']} at stage {report['stage']}, {o['n']} items", "",
             (f"Ordinary evaluation: accuracy {_percent(o['accuracy'])}, T = {o['T']}, "
              f"{o['mean_generated_tokens']:.2f} generated tokens, {o['mean_forward_passes']:.2f} forward passes."), ""]
    if "budget" in report:
        b = report["budget"]
        lines += ["## Thinking budget", ""]
        lines += _table(["j", "accuracy", "generated tokens", "forward passes", "only j right", "only T right",
                         "McNemar p"],
                        [[r["j"], r["accuracy"], r["mean_generated_tokens"], r["mean_forward_passes"],
                          r["vs_ordinary"]["only_first"], r["vs_ordinary"]["only_second"], _p(r["vs_ordinary"]["p_value"])]
                         for r in b["budgets"]])
        e = b["exit_oracle"]
        lines += [(f"Exit oracle: {_percent(e['share_right_before_T'])} of items are right at some j < T "
                   f"({_percent(e['share_right_before_T_among_right_at_T'])} of those right at T); oracle accuracy "
                   f"{_percent(e['oracle_accuracy'])}. j = T equals the ordinary evaluation: "
                   f"{b['j_T_matches_ordinary']}."), ""]
    if "decoded" in report:
        d = report["decoded"]
        lines += ["## Decoded thoughts", "", (f"Token embedding norms: median {d['embedding_norms']['median']:.3f}, "
                                              f"range {d['embedding_norms']['min']:.3f}-{d['embedding_norms']['max']:.3f}."), ""]
        lines += _table(["thought", "mean norm", "norm / median embedding", "mean top-1 p", "most frequent top-1"],
                        [[s["t"], s["mean_norm"], s["norm_over_median_embedding"], s["mean_top1_probability"],
                          ", ".join(f"`{t!r}` {c}" for t, c in s["most_common_top1"][:4])] for s in d["per_step"]])
    if "search" in report:
        lines += ["## Latent search", ""]
        rows = []
        for s in report["search"]["per_step"]:
            lead, other = s["frontier_value_leads_to_target"], s["frontier_value_other"]
            rows.append([s["t"], *(s["mean_mass"][g] for g in ("frontier", "earlier", "later", "unreachable")),
                         s["mean_target_value"], lead["mean"] if lead else None, other["mean"] if other else None])
        lines += _table(["thought", "frontier", "earlier", "later", "unreachable", "target",
                         "frontier value: leads to target", "frontier value: other"], rows)
    if "interventions" in report:
        lines += ["## Interventions", ""]
        lines += _table(["intervention", "flip rate", "flips", "accuracy", "McNemar p vs unperturbed"],
                        [[r["name"], r["flip_rate"], r["flips"], r["accuracy"], _p(r["vs_unperturbed"]["p_value"])]
                         for r in report["interventions"]["runs"]])
    for part, why in report["skipped"].items():
        lines.append(f"Skipped {part}: {why}")
    return "\n".join(lines) + "\n"


def _percent(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(report: dict[str, Any]) -> list[str]:
    """The printed summary: one short block per part, and the skipped parts with their reasons."""
    o = report["ordinary"]
    lines = [(f"{report['method']} at stage {report['stage']}: {o['n']} items, accuracy {_percent(o['accuracy'])} "
              f"with T = {o['T']} latent tokens, {o['mean_generated_tokens']:.1f} tokens and "
              f"{o['mean_forward_passes']:.1f} forward passes per item")]
    if "budget" in report:
        b = report["budget"]
        lines.append("budget  j: " + "  ".join(
            f"{r['j']}={_percent(r['accuracy'])} (p={r['vs_ordinary']['p_value']:.3g})" for r in b["budgets"]))
        e = b["exit_oracle"]
        lines.append(f"exit oracle: right at some j < T for {_percent(e['share_right_before_T'])} of items; "
                     f"oracle accuracy {_percent(e['oracle_accuracy'])}"
                     + ("" if b["j_T_matches_ordinary"] is None else
                        f"; j = T equals the ordinary evaluation: {b['j_T_matches_ordinary']}"))
        lines += [f"  {s}" for s in b["skipped"]]
    if "decoded" in report:
        d = report["decoded"]
        lines.append(f"thought norms (median token embedding {d['embedding_norms']['median']:.2f}): " + "  ".join(
            f"t{s['t']}={s['mean_norm']:.2f}, top-1 p {s['mean_top1_probability']:.2f} "
            f"({', '.join(repr(t) for t, _ in s['most_common_top1'][:3])})" for s in d["per_step"]))
    if "search" in report:
        for step in report["search"]["per_step"]:
            line = f"search thought {step['t']}: mass " + ", ".join(f"{g} {m:.3f}" for g, m in step["mean_mass"].items())
            for key, label in (("frontier_value_leads_to_target", "leads to target"), ("frontier_value_other", "other")):
                if step[key]:
                    line += f"; frontier value {label} {step[key]['mean']:.3f} (n={step[key]['n']})"
            lines.append(line)
    if "interventions" in report:
        lines.append("interventions (flip rate, accuracy): " + "  ".join(
            f"{r['name']} {_percent(r['flip_rate'])}/{_percent(r['accuracy'])}" for r in report["interventions"]["runs"]))
    for part, why in report["skipped"].items():
        lines.append(f"skipped {part}: {why}")
    return lines


def format_examples(report: dict[str, Any], subject: Subject, count: int) -> list[str]:
    """``count`` items with their question, decoded thoughts and answer, for a terminal."""
    decoded = report.get("decoded", {}).get("items")
    lines = []
    for i, item in enumerate(report["ordinary_items"][:count]):
        example = subject.examples[i]
        lines.append(f"--- item {item['idx']} ({'right' if item['correct'] else 'wrong'})")
        lines += textwrap.wrap(example.question, width=100, initial_indent="Q: ", subsequent_indent="   ")
        if decoded is not None:
            for thought in decoded[i]["thoughts"]:
                tops = ", ".join(f"{token!r} {p:.2f}" for token, p in thought["top"])
                lines.append(f"  thought {thought['t']} |h|={thought['norm']:.1f}: {tops}")
        lines.append(f"A: {item['output'].strip()!r}  (reference: {item['answer']!r})")
    return lines


def method_row(report: dict[str, Any]) -> dict[str, Any]:
    """One row of the side-by-side table: the numbers that exist for this method."""
    checkpoint = report.get("checkpoint")
    row: dict[str, Any] = {"method": report["method"], "checkpoint": Path(checkpoint).name if checkpoint else None,
                           "accuracy": report["ordinary"]["accuracy"],
                           "T": report["ordinary"]["T"], "forward_passes": report["ordinary"]["mean_forward_passes"]}
    budget = {b["j"]: b["accuracy"] for b in report.get("budget", {}).get("budgets", [])}
    row["accuracy_j0"] = budget.get(0)
    row["exit_oracle"] = report.get("budget", {}).get("exit_oracle", {}).get("share_right_before_T")
    for run in report.get("interventions", {}).get("runs", []):
        if run["name"] in ("swap", "mean", "noise_1", "zero_1"):
            row[f"flip_{run['name']}"] = run["flip_rate"]
    return row


def side_by_side(reports: Sequence[dict[str, Any]]) -> str:
    """A markdown table of several analyses (Coconut beside its ablations); a dash where a part did not apply."""
    columns = ["method", "checkpoint", "accuracy", "T", "forward_passes", "accuracy_j0", "exit_oracle", "flip_swap", "flip_mean",
               "flip_noise_1", "flip_zero_1"]
    rows = [method_row(r) for r in reports]

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)
