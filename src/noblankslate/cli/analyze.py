"""``nbs analyze CONFIG``: the latent analyses of a checkpoint (docs/analysis.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def analyze(config_path: str, overrides: list[str], checkpoint: str | None, data: str | None, out: str | None,
            limit: int | None, show: int, top_k: int, seed: int, beside: list[str]) -> int:
    """Analyse ``checkpoint`` (default: the latest complete one of the config's run folder)."""
    from noblankslate.analysis.run import REPORT_FILE, side_by_side
    from noblankslate.analysis.run import analyze as run_analysis
    from noblankslate.config import load_config
    from noblankslate.files import write_text_atomic
    from noblankslate.train.checkpoint import latest_checkpoint

    config = load_config(config_path, overrides)
    if checkpoint is None and config.load_model_path is None:
        found = latest_checkpoint(config.run_dir)
        checkpoint = str(found) if found is not None else None
    if out is not None:
        folder = Path(out)
    elif checkpoint is not None:  # beside the checkpoint, not inside it (its files are checksummed)
        folder = Path(checkpoint).parent / f"analysis_{Path(checkpoint).name}"
    else:
        folder = config.run_dir / "analysis"
    report = run_analysis(config, checkpoint, data=data, out=folder, limit=limit, show=show, top_k=top_k, seed=seed)
    print(f"wrote {folder / REPORT_FILE} and {len(report['figures'])} figures")
    if beside:
        others = [json.loads(Path(path).read_text(encoding="utf-8")) for path in beside]
        table = side_by_side([report, *others])
        write_text_atomic(folder / "side_by_side.md", table + "\n")
        print(table)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze", help="the latent analyses of a checkpoint: budget curve, decoded thoughts, latent search, interventions",
        description="Analyse a checkpoint on the evaluated data: accuracy after exactly j thoughts (j = 0..T+2, "
                    "paired with the ordinary evaluation), the LM head's reading of every thought, the probability "
                    "it puts on the graph's frontier (ProsQA data), and answer flips under interventions on the "
                    "thoughts. Writes OUT/analysis.json and PNG figures and prints a summary.")
    p.add_argument("config", help="the run's YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. batch_size_eval=64")
    p.add_argument("--checkpoint", help="checkpoint folder (default: the latest complete checkpoint of the run "
                                        "folder, or load_model_path when the config sets it)")
    p.add_argument("--data", help="data file to analyse instead of val_path")
    p.add_argument("--out", help="output folder (default: analysis_<checkpoint name> beside the checkpoint)")
    p.add_argument("--limit", type=int, help="analyse only the first N items")
    p.add_argument("--show", type=int, default=0, metavar="K", help="print K items with their decoded thoughts")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per decoded thought (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise and the swap pairing (default 0)")
    p.add_argument("--beside", nargs="+", default=[], metavar="JSON",
                   help="other analysis.json files to put beside this one in a table (OUT/side_by_side.md)")
    p.set_defaults(handler=lambda a: analyze(a.config, a.overrides, a.checkpoint, a.data, a.out, a.limit, a.show,
                                             a.top_k, a.seed, a.beside))
