"""Every third-party module the package imports at module level is a declared dependency, so a bare
``pip install`` of the project runs every command (optional ones, such as wandb, are imported lazily)."""

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTRIBUTION = {"faiss": "faiss-cpu", "yaml": "PyYAML"}  # import name -> distribution name, where they differ


def test_module_level_imports_are_plain_dependencies():
    declared = {re.split(r"[<>=!~\[ ;]", d)[0].lower()
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    imported = set()
    for path in (ROOT / "src" / "noblankslate").rglob("*.py"):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level only
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            imported |= {n.split(".")[0] for n in names}
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "noblankslate"}
    missing = sorted(m for m in third_party if DISTRIBUTION.get(m, m).lower() not in declared)
    assert not missing, f"imported at module level but not in [project.dependencies]: {missing}"
    assert "faiss" in third_party  # the memory's store; a plain dependency, so a bare install trains
