"""Imports run one way: config/errors/files/runtime <- data <- model <- eval <- memory/analysis <- train <- experiment/demo <- cli.

A module may import its own layer and the layers below it, never a layer above (the model knows no data
or training code; the memory knows no trainer). The test reads every import statement, including those
inside functions, so a lazy import cannot hide a wrong direction.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "noblankslate"
LAYER = {"config": 0, "errors": 0, "files": 0, "runtime": 0, "data": 1, "model": 2, "eval": 3, "memory": 4,
         "train": 5, "experiment": 6, "demo": 6, "cli": 7,
         # the thoughts' instruments and a trained model's users need evaluation, never the memory or training
         "analysis": 4, "inference": 4}


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [m for m in found if m.startswith("noblankslate.")]


def test_every_module_belongs_to_a_layer():
    top = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")} - {"__init__"}
    assert top <= set(LAYER), f"modules without a layer: {sorted(top - set(LAYER))}"


def test_no_import_runs_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mine = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if mine == "__init__":
            continue
        for module in _imports(path):
            target = module.split(".")[1]
            if LAYER.get(target, -1) > LAYER[mine]:
                wrong.append(f"{path.relative_to(PACKAGE)} ({mine}) imports {module}")
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from noblankslate.train.loop import Trainer\n")
    assert _imports(bad) == ["noblankslate.train.loop"]
