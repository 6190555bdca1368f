"""nbs plot: stage boundaries, a PNG from metrics.jsonl, clear errors."""

from __future__ import annotations

import json

from noblankslate.cli import main
from noblankslate.eval.plots import stage_boundaries


def _epochs(stages):
    return [{"event": "epoch", "epoch": i + 1, "stage": s, "train_loss": 1.0 / (i + 1), "val_loss": 1.2 / (i + 1),
             "accuracy": 0.1 * i, "cot_match": 0.05 * i} for i, s in enumerate(stages)]


def test_stage_boundaries_fall_between_the_epochs_that_switch():
    assert stage_boundaries(_epochs([0, 0, 1, 1, 2, 3])) == [2.5, 4.5, 5.5]
    assert stage_boundaries(_epochs([0, 0, 0])) == []


def test_plot_command_writes_a_png(tmp_path, capsys):
    records = [{"event": "step", "step": 1, "train_loss": 2.0}] + _epochs([0, 1, 2])
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["plot", str(tmp_path)]) == 0
    png = (tmp_path / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_plot_command_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"event": "step"}\nnot json\n')
    assert main(["plot", str(tmp_path)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
