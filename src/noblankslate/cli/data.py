"""``nbs data ...``: check, convert, generate and describe data files."""

from __future__ import annotations

import argparse
import sys

from noblankslate.data.schema import DataError, check_records, read_records
from noblankslate.errors import NbsError


class DataCheckFailed(NbsError):
    """``nbs data check`` found bad records (each is printed on stdout before this one-line summary)."""

    label = "data error"


def check(path: str) -> int:
    """Validate a data file; print every bad record (index and field), then fail (exit 2) if any."""
    records = read_records(path)
    problems = check_records(records, path)
    for problem in problems:
        print(problem)
    if problems:
        raise DataCheckFailed(f"{path}: {len(problems)} problem(s) in {len(records)} records (listed above)")
    print(f"{path}: {len(records)} records, all valid")
    return 0


def convert_gsm_icot(in_path: str, out_path: str) -> int:
    """Internalize-CoT GSM8K text -> Coconut JSON. Bad input raises a ConversionError naming line and field."""
    from noblankslate.data.convert import convert_gsm_icot_file

    n = convert_gsm_icot_file(in_path, out_path)
    print(f"{out_path}: {n} records from {in_path}")
    return 0


def convert_gsm_jsonl(in_path: str, out_path: str, exclude_questions_of: str | None = None) -> int:
    """Original GSM8K jsonl -> Coconut JSON, optionally minus the questions of another Coconut JSON file."""
    from noblankslate.data.convert import convert_gsm_jsonl_file

    n, n_excluded = convert_gsm_jsonl_file(in_path, out_path, exclude_questions_of)
    excluded = f", {n_excluded} excluded as questions of {exclude_questions_of}" if exclude_questions_of else ""
    print(f"{out_path}: {n} records from {in_path}{excluded}")
    return 0


def convert_prontoqa(in_path: str, out_dir: str, prefix: str, train_size: int, valid_size: int) -> int:
    """ProntoQA generator output -> train/valid/test Coconut JSON files in ``out_dir``."""
    from noblankslate.data.convert import convert_prontoqa_file

    written = convert_prontoqa_file(in_path, out_dir, prefix, train_size, valid_size)
    for path, n in written.values():
        note = " (empty: the input has no examples left for this split)" if n == 0 else ""
        print(f"{path}: {n} records{note}")
    return 0


def show_stats(path: str, compare: str | None = None, tokenizer: str | None = None, as_json: bool = False) -> int:
    """Print the statistics of a data file, beside those of ``compare`` if given."""
    import json

    from noblankslate.data.stats import dataset_stats, format_table, load_token_counter

    count_tokens = load_token_counter(tokenizer) if tokenizer is not None else None
    columns = []
    for name in [path] if compare is None else [path, compare]:
        records = read_records(name)
        problems = check_records(records, name)
        if problems:
            raise DataError(problems)
        columns.append((name, dataset_stats(records, count_tokens, source=name)))
    if as_json:
        print(json.dumps(dict(columns), indent=2))
    else:
        print(format_table(columns))
    return 0


def symbolic(in_path: str, out_path: str, seed: int, symbols: int, steps: str = "facts") -> int:
    """Write the ProsQA records of ``in_path`` as symbol tokens (``noblankslate.data.symbolic``)."""
    from noblankslate.data.convert import write_json_atomic
    from noblankslate.data.symbolic import symbolic_examples

    records = read_records(in_path)
    problems = check_records(records, in_path)
    if problems:
        raise DataError(problems)
    examples = symbolic_examples(records, seed, symbols, source=in_path, steps=steps)
    write_json_atomic(examples, out_path, inputs=[in_path])
    print(f"{out_path}: {len(examples)} records of {in_path} as symbols (seed {seed}, {symbols} symbols, "
          f"steps as {steps})")
    return 0


def _int_range(text: str) -> tuple[int, int]:
    """``"LO-HI"`` or ``"N"`` -> an inclusive ``(lo, hi)`` range, for argparse."""
    low, _, high = text.partition("-")
    try:
        bounds = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI or N, got {text!r}") from None
    if bounds[0] > bounds[1]:
        raise argparse.ArgumentTypeError(f"empty range {text!r}")
    return bounds


def prosqa(out_path: str, num: int, seed: int, exclude: list[str], small: bool = False,
           concepts: tuple[int, int] | None = None, distance: tuple[int, int] | None = None) -> int:
    """Generate ProsQA examples into ``out_path``, never repeating a question of the ``exclude`` files."""
    from noblankslate.data.convert import (
        read_questions,
        write_json_atomic,
    )
    from noblankslate.data.prosqa import ProsQAConfig, generate_prosqa

    config = (ProsQAConfig.small() if small else ProsQAConfig()).with_ranges(concepts, distance)
    excluded = {q for path in exclude for q in read_questions(path)}
    examples = generate_prosqa(num, seed, exclude_questions=excluded, config=config)
    write_json_atomic(examples, out_path, inputs=exclude)
    if not exclude:
        print("note: no --exclude given; pass the published ProsQA valid/test files so that no evaluation "
              "question is generated", file=sys.stderr)
    print(f"{out_path}: {len(examples)} ProsQA examples (seed {seed}, distance {config.min_distance}-"
          f"{config.max_distance}), none repeating the {len(excluded)} excluded questions")
    return 0


def balanced(out_path: str, num: int, seed: int, exclude: list[str], branches: tuple[int, int],
             distance: tuple[int, int], shortcuts: bool = False) -> int:
    """Generate balanced ProsQA examples (no shortcut answers them) into ``out_path``."""
    from noblankslate.data.balanced import (
        BalancedConfig,
        generate_balanced,
        shortcut_accuracies,
    )
    from noblankslate.data.convert import (
        read_questions,
        write_json_atomic,
    )

    config = BalancedConfig(branches=branches, distance=distance)
    excluded = {q for path in exclude for q in read_questions(path)}
    examples = generate_balanced(num, seed, exclude_questions=excluded, config=config)
    write_json_atomic(examples, out_path, inputs=exclude)
    print(f"{out_path}: {len(examples)} balanced ProsQA examples (seed {seed}, {branches[0]}-{branches[1]} branches "
          f"per person, distance {distance[0]}-{distance[1]}), none repeating the {len(excluded)} excluded questions")
    if shortcuts and examples:
        found = shortcut_accuracies(examples, max_hops=distance[1])
        best = found["best_one_hop"]
        print(f"best one-hop rule: {best['rule']} {best['accuracy']:.4f}; root among the ancestors within h hops: "
              + ", ".join(f"h={h} {a:.4f}" for h, a in found["within_hops"].items()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    data = subparsers.add_parser("data", help="check, convert, generate and describe data files")
    commands = data.add_subparsers(dest="data_command", required=True)

    p = commands.add_parser("check", help="validate a data file and list every bad record",
                            description="Validate a Coconut JSON data file (a list of {question, answer, steps}). "
                                        "Prints every bad record with its index and field; exit code 1 if any.")
    p.add_argument("file", help="JSON data file")
    p.set_defaults(handler=lambda a: check(a.file))

    p = commands.add_parser(
        "gsm-icot", help="GSM8K in Internalize-CoT text form -> Coconut JSON",
        description="Convert GSM8K in the Internalize-CoT text form (one 'question||<<eq>> <<eq>> #### answer' per "
                    "line, e.g. da03/Internalize_CoT_Step_by_Step data/gsm8k/valid.txt) into a Coconut JSON list of "
                    "{question, steps, answer} with Coconut's rule: steps = the space-separated equations, [\"\"] "
                    "when there are none. The output is written atomically and never over the input.")
    p.add_argument("input", metavar="IN.txt", help="Internalize-CoT text file")
    p.add_argument("output", metavar="OUT.json", help="Coconut JSON file to write")
    p.set_defaults(handler=lambda a: convert_gsm_icot(a.input, a.output))

    p = commands.add_parser(
        "gsm-jsonl", help="original GSM8K jsonl -> Coconut JSON (steps = calculator annotations)",
        description="Convert the original GSM8K jsonl (openai/grade-school-math: {question, answer} per line, the "
                    "answer with <<a*b=c>> calculator annotations and a final '#### N') into a Coconut JSON list: "
                    "each example is put in the Internalize-CoT form (annotations joined by spaces, then ' #### N') "
                    "and converted as by 'gsm-icot'. The output is written atomically and never over an input.")
    p.add_argument("input", metavar="IN.jsonl", help="original GSM8K jsonl file")
    p.add_argument("output", metavar="OUT.json", help="Coconut JSON file to write")
    p.add_argument("--exclude-questions-of", metavar="FILE.json", default=None,
                   help="leave out the examples whose question (whitespace-collapsed) is in this Coconut JSON file, "
                        "e.g. the validation set")
    p.set_defaults(handler=lambda a: convert_gsm_jsonl(a.input, a.output, a.exclude_questions_of))

    p = commands.add_parser(
        "prontoqa", help="ProntoQA generator output -> Coconut JSON train/valid/test",
        description="Convert the ProntoQA generator's output ({\"exampleN\": {\"test_example\": {question, query, "
                    "chain_of_thought, answer}}}, e.g. 5hop_0shot_random.json) with Coconut's rule (question = "
                    "question + ' ' + query; steps = chain_of_thought joined in pairs) and split it in file order "
                    "into DIR/PREFIX_train.json (first 9000), DIR/PREFIX_valid.json (next 200) and "
                    "DIR/PREFIX_test.json (the rest; '[]' when nothing is left).")
    p.add_argument("input", metavar="IN.json", help="ProntoQA generator output")
    p.add_argument("--out-dir", metavar="DIR", required=True, help="folder for the three output files")
    p.add_argument("--prefix", default="prontoqa", help="output file name prefix (default: prontoqa)")
    p.add_argument("--train-size", type=int, default=9000, help="examples in the train split (default: 9000)")
    p.add_argument("--valid-size", type=int, default=200, help="examples in the valid split (default: 200)")
    p.set_defaults(handler=lambda a: convert_prontoqa(a.input, a.out_dir, a.prefix, a.train_size, a.valid_size))

    p = commands.add_parser(
        "stats", help="statistics of a data file, optionally beside another",
        description="Print statistics of a Coconut JSON data file: example count, steps per example (histogram), "
                    "question/answer/step lengths in words (mean/min/max) and, with --tokenizer, in tokens; for "
                    "ProsQA files (records with idx_to_symbol, edges, root, target, neg_target) also the graph "
                    "statistics: nodes, edges, in-degree, people per graph, root->target distance, number of "
                    "shortest paths, question length. Histogram bins are shown in percent.")
    p.add_argument("file", help="JSON data file")
    p.add_argument("--compare", metavar="OTHER", default=None, help="second data file, shown in a column beside FILE")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="local tokenizer folder, loaded with transformers.AutoTokenizer.from_pretrained(DIR, "
                        "local_files_only=True), or a folder holding only GPT-2's vocab.json and merges.txt")
    p.add_argument("--json", action="store_true", help="print the statistics as JSON ({file: stats}) instead of a table")
    p.set_defaults(handler=lambda a: show_stats(a.file, a.compare, a.tokenizer, a.json))

    p = commands.add_parser(
        "prosqa", help="generate ProsQA examples statistically like the published sets",
        description="Generate ProsQA examples (question, answer, steps and the graph: idx_to_symbol, edges, root, "
                    "target, neg_target) whose statistics match the published valid/test sets; see "
                    "docs/prosqa-generator.md. The same --seed gives the same file, byte for byte. Pass the "
                    "published evaluation files with --exclude (e.g. --exclude ../shared/data/prosqa_valid.json) "
                    "so that no generated question repeats one of theirs. The output is written atomically.")
    p.add_argument("--num", type=int, required=True, help="number of examples (the paper's train set has 17886)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", metavar="FILE.json", required=True, help="output file")
    p.add_argument("--exclude", metavar="FILE.json", action="append", default=[],
                   help="a Coconut JSON file whose questions must not be generated; repeatable")
    p.add_argument("--small", action="store_true",
                   help="small graphs for CPU demos: 6-9 concepts, root -> target distance 2-3")
    p.add_argument("--concepts", metavar="LO-HI", type=_int_range, default=None,
                   help="concept nodes per graph, drawn uniformly from this range (default: the published histogram, "
                        "11-25, mean 20.3)")
    p.add_argument("--distance", metavar="LO-HI", type=_int_range, default=None,
                   help="root -> target distance range (default: 3-6, or 2-3 with --small)")
    p.set_defaults(handler=lambda a: prosqa(a.out, a.num, a.seed, a.exclude, a.small, a.concepts, a.distance))

    p = commands.add_parser(
        "balanced", help="generate balanced ProsQA examples: no shortcut answers them (Table 1 on a CPU)",
        description="Generate ProsQA-format examples whose two people have the same shape: each has the same number "
                    "of branches, each branch a chain of the same length d from the person to a leaf; the target "
                    "ends one of the root's branches and the negative target one of the other person's, so no rule "
                    "that looks fewer than d hops away beats chance. See docs/table1.md. The same --seed gives the "
                    "same file, byte for byte; written atomically.")
    p.add_argument("--num", type=int, required=True, help="number of examples")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--out", metavar="FILE.json", required=True, help="output file")
    p.add_argument("--exclude", metavar="FILE.json", action="append", default=[],
                   help="a Coconut JSON file whose questions must not be generated (the training file, when writing "
                        "a held-out split); repeatable")
    p.add_argument("--branches", metavar="LO-HI", type=_int_range, default=(2, 2),
                   help="branches per person, drawn per graph (default: 2)")
    p.add_argument("--distance", metavar="LO-HI", type=_int_range, default=(3, 4),
                   help="branch length = root -> target distance = steps, drawn per graph (default: 3-4)")
    p.add_argument("--shortcuts", action="store_true", help="also print what the shortcut rules score on the file")
    p.set_defaults(handler=lambda a: balanced(a.out, a.num, a.seed, a.exclude, a.branches, a.distance, a.shortcuts))

    p = commands.add_parser(
        "symbolic", help="write ProsQA records as symbol tokens (one token per node, a fact as 'a b')",
        description="Write the records of a ProsQA-format file (published, generated or balanced; the graph fields "
                    "are needed) in the symbolic encoding of Zhu, Hao et al. 2025: every node a random symbol "
                    "0..N-1, the question the facts 'a b' in random order joined by ' | ', then '[Q] o1 o2 [R] root'; "
                    "the steps the path's facts ' a b' (or with --steps nodes the path's nodes ' b'), the answer the "
                    "target. The graph fields are kept. Convert the "
                    "training and the held-out file with the same --symbols. See docs/table1.md.")
    p.add_argument("input", metavar="IN.json", help="ProsQA-format data file")
    p.add_argument("out", metavar="OUT.json", help="output file (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--symbols", type=int, default=32, help="size of the symbol pool (default: 32)")
    p.add_argument("--steps", choices=("facts", "nodes"), default="facts",
                   help="a step writes the path's fact ' a b' (default) or the node it reaches ' b' (Zhu et al.)")
    p.set_defaults(handler=lambda a: symbolic(a.input, a.out, a.seed, a.symbols, a.steps))
