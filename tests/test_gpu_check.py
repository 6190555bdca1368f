"""bench/gpu_check.sh in its CPU quick mode, on a machine without FAISS (as the GPU machine is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HIDE_FAISS = '''
import sys
from importlib.machinery import PathFinder


class HideInstalledFaiss:
    """faiss imports only from outside site-packages (the check's stand-in), as if it were not installed."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "faiss":
            return None
        spec = PathFinder.find_spec(name, [p for p in sys.path if "site-packages" not in p])
        if spec is None:
            raise ModuleNotFoundError("No module named 'faiss'", name="faiss")
        return spec


sys.meta_path.insert(0, HideInstalledFaiss())
'''


def run_check(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_FAISS)
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "PYTHONPATH": str(hide),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cpu", "--quick", *args],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    report = tmp_path / "gpu_check.json"
    assert report.is_file(), done.stdout + done.stderr
    return done, json.loads(report.read_text())


def test_the_quick_cpu_run_passes_without_faiss_and_reports_each_check(tmp_path):
    done, report = run_check(tmp_path, "--only", "env", "--only", "bf16_autocast", "--only", "bf16_weights",
                             "--only", "lora_llama")
    assert done.returncode == 0, done.stderr
    assert report["stand_ins"] == ["faiss"]  # FAISS hidden: the project still imports, nbs train still runs
    assert report["failed"] == []
    assert {"env", "bf16_autocast", "bf16_weights", "lora_llama"} <= report.keys()
    assert "fsdp_nccl" not in report and "decode" not in report
    assert report["bf16_weights"]["checkpoint_dtypes"] == ["BF16"]
    assert [e["epoch"] for e in report["bf16_weights"]["epochs"]] == [1]
    lora = report["lora_llama"]
    assert lora["frozen_weights_unchanged"] and lora["adapters"] > 0
    assert 0 < lora["trainable_parameters"] < lora["parameters"] / 2
    assert lora["losses"][-1] < lora["losses"][0]


def test_a_spent_budget_skips_the_remaining_checks(tmp_path):
    done, report = run_check(tmp_path, "--budget", "5", "--only", "env", "--only", "decode")
    assert done.returncode == 0, done.stderr
    assert report["env"] == report["decode"] == {"skipped": "the budget of 5 s was spent"}
