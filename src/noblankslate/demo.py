"""The built-in demo: the whole pipeline at small scale on a CPU.

1. generate ProsQA-style data with small graphs (train, and a held-out split whose questions never
   appear in train);
2. train a small GPT-2 from scratch with the Coconut curriculum (stage 0 is CoT, then the stages that
   replace steps with continuous thoughts), evaluating every epoch;
3. build the No Blank Slate memory from the training data with the final model and evaluate with it;
4. print a table (method, accuracy, mean generated tokens, mean forward passes) and write the plots.

The training settings are in ``args/demo.yaml``; what the demo shows and what it does not is in
``docs/demo.md``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from noblankslate.config import load_config
from noblankslate.data.convert import write_json_atomic
from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa
from noblankslate.eval.plots import plot_run
from noblankslate.memory.report import build_report, plot_report
from noblankslate.runtime import distributed_context
from noblankslate.train.loop import EpochResult, Trainer
from noblankslate.train.track import read_metrics


@dataclass(frozen=True)
class DemoData:
    """The demo task: small ProsQA-style graphs (see docs/demo.md for why these sizes)."""

    train_examples: int = 12000
    valid_examples: int = 300
    concepts: tuple[int, int] = (3, 5)
    distance: tuple[int, int] = (2, 2)
    seed: int = 0


def make_data(folder: Path, data: DemoData) -> tuple[Path, Path]:
    """Write train.json and valid.json (valid never repeats a training question)."""
    config = ProsQAConfig.small(concepts=data.concepts, distance=data.distance)
    train = generate_prosqa(data.train_examples, seed=data.seed, config=config)
    valid = generate_prosqa(data.valid_examples, seed=data.seed + 1, config=config,
                            exclude_questions={e["question"] for e in train})
    paths = folder / "train.json", folder / "valid.json"
    for path, examples in zip(paths, (train, valid)):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(examples, path)
    return paths


def demo_table(results: list[EpochResult]) -> list[dict]:
    """Rows: the run at its last stage-0 epoch (written chains; not the paper's CoT baseline, which trains as
    long as Coconut: ``nbs experiment`` runs that), Coconut (the last epoch), and the memory's two settings."""
    rows = []
    cot = [r for r in results if r.stage == 0]
    if cot:
        e = cot[-1].evaluation
        # the same run's stage-0 checkpoint, not the paper's CoT baseline (a CoT run trained as long)
        rows.append({"method": f"stage 0 = written chain (epoch {cot[-1].epoch})", "accuracy": e.accuracy,
                     "mean_generated_tokens": e.mean_generated_tokens, "mean_forward_passes": e.mean_forward_passes})
    last = results[-1]
    e = last.evaluation
    rows.append({"method": f"Coconut (stage {last.stage}, epoch {last.epoch})", "accuracy": e.accuracy,
                 "mean_generated_tokens": e.mean_generated_tokens, "mean_forward_passes": e.mean_forward_passes})
    if last.retrieval is not None:
        m = last.retrieval
        for key, paired, name in (("full", "nudge_only_vs_off", "Coconut + memory (nudge)"),
                                  ("on", "memory_vs_off", "Coconut + memory (nudge + exit)")):
            run = m["runs"][key]
            rows.append({"method": name, "accuracy": run["accuracy"], "mean_generated_tokens": run["mean_generated_tokens"],
                         "mean_forward_passes": run["mean_forward_passes"], "paired_vs_coconut": _discordant(m["paired"][paired])})
        control = m.get("control_full_replacement")
        if control is not None:
            # whether the model uses its thoughts at all: what bounds any nudge (docs/memory.md, controls)
            rows.append({"method": "control: thoughts replaced (alpha 1)", "accuracy": control["accuracy"],
                         "mean_generated_tokens": control["mean_generated_tokens"],
                         "mean_forward_passes": control["mean_forward_passes"],
                         "paired_vs_coconut": _discordant(control["paired_vs_off"])})
    return rows


def _discordant(paired: dict | None) -> dict | None:
    """What the table prints of a paired comparison: b, c, the difference and the exact McNemar p."""
    return None if paired is None else {k: paired[k] for k in ("only_first", "only_second", "difference", "p_value")}


def format_table(rows: list[dict]) -> str:
    """The table; a memory row also says how it differs from Coconut on the same items: b items right only
    with the memory, c only without, and the exact McNemar p-value."""
    header = f"{'method':<38}{'accuracy':>10}{'tokens':>9}{'passes':>9}   vs Coconut: b/c, p"
    lines = [header, "-" * len(header)]
    for row in rows:
        line = f"{row['method']:<38}{row['accuracy']:>10.4f}{row['mean_generated_tokens']:>9.2f}{row['mean_forward_passes']:>9.2f}"
        paired = row.get("paired_vs_coconut")
        if paired:
            line += f"   {paired['only_first']}/{paired['only_second']}, p = {paired['p_value']:.3g}"
        lines.append(line)
    return "\n".join(lines)


def run_demo(out: str | Path = "runs/demo", config_path: str | Path = "args/demo.yaml", data: DemoData = DemoData(),
             overrides: list[str] | None = None) -> list[dict]:
    """Run the whole demo into ``out``; returns the table's rows (also written to ``out/demo_table.json``)."""
    started = time.perf_counter()
    out = Path(out)
    train_path, valid_path = make_data(out / "data", data)
    print(f"data: {data.train_examples} training and {data.valid_examples} held-out ProsQA-style examples "
          f"({data.concepts[0]}-{data.concepts[1]} concepts, distance {data.distance[0]}-{data.distance[1]}) in {out / 'data'}",
          flush=True)
    config = load_config(config_path, [f"save_path={out}", f"train_path={train_path}", f"val_path={valid_path}",
                                       f"index.path={out / 'index' / 'faiss_index.bin'}", *(overrides or [])])
    with distributed_context() as context:
        results = Trainer(config, context, memory_every_epoch=False).run()
    run_dir = config.run_dir
    rows = demo_table(results)
    table = format_table(rows)
    print("\n" + table)
    (out / "demo_table.json").write_text(json.dumps(rows, indent=1))
    curves = plot_run(read_metrics(run_dir), run_dir / "curves.png", title="demo: Coconut on small ProsQA-style graphs")
    pictures = [curves]
    if config.retrieval.enabled:
        pictures.append(plot_report(build_report(config.index.path, run_dir), run_dir / "retrieval.png"))
    print(f"\nplots: {', '.join(str(p) for p in pictures)}")
    print(f"run folder: {run_dir}   (nbs memory report --index-path {config.index.path} --metrics-dir {run_dir})")
    print(f"demo finished in {(time.perf_counter() - started) / 60:.1f} minutes")
    return rows


def settings_with(**changes) -> DemoData:
    return dataclasses.replace(DemoData(), **{k: v for k, v in changes.items() if v is not None})
