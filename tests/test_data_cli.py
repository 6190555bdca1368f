"""``nbs data ...`` run in process: exit codes, messages, outputs, and --help that says what goes in and out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from noblankslate.cli import main

BIN = Path(sys.executable).parent


def _write(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_check_good_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "good.json", [{"question": "q?", "answer": "a", "steps": ["s1", "s2"], "extra": 1}])
    assert main(["data", "check", str(path)]) == 0
    assert capsys.readouterr().out == f"{path}: 1 records, all valid\n"


def test_check_lists_every_bad_record_with_index_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = [
        {"question": "q?", "answer": "a", "steps": []},
        {"question": "q?", "steps": ["s"]},
        {"question": "", "answer": 3, "steps": ["s", None]},
        "not a record",
    ]
    path = _write(tmp_path / "bad.json", records)
    assert main(["data", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{path}: record 1, field 'answer': missing",
        f"{path}: record 2, field 'answer': expected a string, got int",
        f"{path}: record 2, field 'question': empty",
        f"{path}: record 2, field 'steps[1]': expected a string, got NoneType",
        f"{path}: record 3: expected an object, got str",
    ]
    assert "5 problem(s) in 4 records" in captured.err


def test_check_unreadable_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[{"question": ')
    assert main(["data", "check", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"data error: {path}: not valid JSON")
    assert main(["data", "check", str(tmp_path / "missing.json")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_gsm_icot_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "valid.txt"
    source.write_text("A  b?||<<2*3=6>> <<6+1=7>> #### 7\nC?|| #### 1\n")
    out = tmp_path / "valid.json"
    assert main(["data", "gsm-icot", str(source), str(out)]) == 0
    assert out.read_bytes() == (
        b'[{"question": "A  b?", "steps": ["<<2*3=6>>", "<<6+1=7>>"], "answer": "7"}, '
        b'{"question": "C?", "steps": [""], "answer": "1"}]'
    )
    assert capsys.readouterr().out == f"{out}: 2 records from {source}\n"


def test_gsm_icot_command_bad_input_and_own_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "valid.txt"
    source.write_text("A?||<<1=1>> #### 1\nB? <<1=1>> #### 1\n")
    assert main(["data", "gsm-icot", str(source), str(tmp_path / "out.json")]) == 2
    assert capsys.readouterr().err.startswith(f"conversion error: {source}: line 2: expected one '||'")
    source.write_text("A?||<<1=1>> #### 1\n")
    assert main(["data", "gsm-icot", str(source), str(source)]) == 2
    assert "refusing to overwrite the input file" in capsys.readouterr().err
    assert source.read_text() == "A?||<<1=1>> #### 1\n"


def test_gsm_jsonl_command_with_exclusion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "train.jsonl"
    source.write_text(
        json.dumps({"question": "Keep?", "answer": "2*3 = <<2*3=6>>6\n#### 6"})
        + "\n"
        + json.dumps({"question": "Drop?", "answer": "#### 1"})
        + "\n"
    )
    valid = _write(tmp_path / "valid.json", [{"question": "Drop?", "answer": "1", "steps": [""]}])
    out = tmp_path / "train.json"
    assert main(["data", "gsm-jsonl", str(source), str(out), "--exclude-questions-of", str(valid)]) == 0
    assert json.loads(out.read_text()) == [{"question": "Keep?", "steps": ["<<2*3=6>>"], "answer": "6"}]
    assert capsys.readouterr().out == f"{out}: 1 records from {source}, 1 excluded as questions of {valid}\n"
    # A bad exclusion file is reported like any bad data file.
    bad = _write(tmp_path / "bad.json", [{"answer": "1", "steps": []}])
    assert main(["data", "gsm-jsonl", str(source), str(out), "--exclude-questions-of", str(bad)]) == 2
    assert f"{bad}: record 0, field 'question': missing" in capsys.readouterr().err


def test_prontoqa_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = {
        f"example{i}": {
            "test_example": {"question": f"F{i}.", "query": "Q?", "chain_of_thought": ["a.", "b."], "answer": "True"}
        }
        for i in range(1, 4)
    }
    source = _write(tmp_path / "raw.json", raw)
    out_dir = tmp_path / "out"
    assert main(["data", "prontoqa", str(source), "--out-dir", str(out_dir), "--train-size", "2", "--valid-size", "1"]) == 0
    assert json.loads((out_dir / "prontoqa_train.json").read_text())[1] == {
        "question": "F2. Q?",
        "steps": ["a. b."],
        "answer": "True",
    }
    assert len(json.loads((out_dir / "prontoqa_valid.json").read_text())) == 1
    assert (out_dir / "prontoqa_test.json").read_text() == "[]"
    assert "prontoqa_test.json: 0 records (empty" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "words"),
    [
        ("check", ["Coconut JSON", "index and field", "exit code 1"]),
        ("gsm-icot", ["IN.txt", "OUT.json", "question||<<eq>> <<eq>> #### answer", "{question, steps, answer}"]),
        ("gsm-jsonl", ["IN.jsonl", "OUT.json", "--exclude-questions-of", "#### N", "<<a*b=c>>"]),
        ("prontoqa", ["IN.json", "--out-dir", "PREFIX_train.json", "PREFIX_valid.json", "PREFIX_test.json", "9000"]),
        ("stats", ["--compare", "--tokenizer", "--json", "local_files_only", "ProsQA", "percent"]),
    ],
)
def test_help_says_what_goes_in_and_out(command: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["data", command, "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for word in words:
        assert word in text, word


def test_stats_command_json_and_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _write(tmp_path / "a.json", [{"question": "one two", "answer": "x", "steps": ["s", "t u"]}])
    b = _write(tmp_path / "b.json", [{"question": "one", "answer": "y z", "steps": ["s"]}] * 2)
    assert main(["data", "stats", str(a), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)[str(a)]
    assert stats["examples"] == 1 and stats["steps_hist"] == {"2": 1.0}
    assert main(["data", "stats", str(a), "--compare", str(b)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [str(a), str(b)]
    assert lines[1].split() == ["examples", "1", "2"]
    assert [line.split() for line in lines[4:6]] == [["1", "0.0%", "100.0%"], ["2", "100.0%", "0.0%"]]
    bad = _write(tmp_path / "bad.json", [{"question": "q"}])
    assert main(["data", "stats", str(bad)]) == 2
    assert "record 0, field 'answer': missing" in capsys.readouterr().err
    assert main(["data", "stats", str(a), "--tokenizer", str(tmp_path / "nope")]) == 2
    assert "tokenizer folder not found" in capsys.readouterr().err


def test_nbs_console_script_runs() -> None:
    result = subprocess.run([str(BIN / "nbs"), "data", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("check", "gsm-icot", "gsm-jsonl", "prontoqa", "stats"):
        assert command in result.stdout


def test_check_and_train_agree_on_an_empty_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from noblankslate.data.schema import DataError, load_examples

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    assert main(["data", "check", str(empty)]) == 2
    assert f"{empty}: no records" in capsys.readouterr().out
    with pytest.raises(DataError, match="no records"):
        load_examples(empty)
