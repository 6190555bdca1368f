"""Converters against the published files (byte for byte), their rules on hand-made lines, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from noblankslate.data.convert import (
    ConversionError,
    convert_gsm_icot_file,
    convert_gsm_jsonl_file,
    convert_prontoqa_file,
    gsm8k_to_icot_line,
    gsm_icot_to_records,
    gsm_jsonl_to_records,
    parse_icot_line,
    read_prontoqa,
    split_prontoqa,
    write_json_atomic,
)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_gsm_icot_valid_gives_published_bytes(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "gsm_valid.json"
    assert convert_gsm_icot_file(shared_data / "raw" / "icot_gsm8k_valid.txt", out) == 500
    assert out.read_bytes() == (shared_data / "gsm_valid.json").read_bytes()


def test_gsm_jsonl_minus_valid_gives_published_train_noaug(shared_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "gsm_train_noaug.json"
    written, excluded = convert_gsm_jsonl_file(
        shared_data / "raw" / "gsm8k_original_train.jsonl", out, exclude_questions_of=shared_data / "gsm_valid.json"
    )
    assert (written, excluded) == (6973, 500)
    assert out.read_bytes() == (shared_data / "gsm_train_noaug.json").read_bytes()


def test_prontoqa_gives_published_train_and_valid(shared_data: Path, tmp_path: Path) -> None:
    written = convert_prontoqa_file(shared_data / "raw" / "prontoqa_5hop_0shot_random.first9200.json", tmp_path)
    assert [(name, n) for name, (_, n) in written.items()] == [("train", 9000), ("valid", 200), ("test", 0)]
    assert (tmp_path / "prontoqa_train.json").read_bytes() == (shared_data / "prontoqa_train.json").read_bytes()
    assert (tmp_path / "prontoqa_valid.json").read_bytes() == (shared_data / "prontoqa_valid.json").read_bytes()
    assert (tmp_path / "prontoqa_test.json").read_bytes() == b"[]"


def test_icot_rule_on_hand_made_lines() -> None:
    # The question keeps its spacing; steps split on single spaces; the answer is stripped.
    assert parse_icot_line("Q  one?||<<1+1=2>> <<2*3=6>> #### 6\n") == {
        "question": "Q  one?",
        "steps": ["<<1+1=2>>", "<<2*3=6>>"],
        "answer": "6",
    }
    # No equation: Coconut's rule gives one empty step.
    assert parse_icot_line("Q?|| #### 1,080") == {"question": "Q?", "steps": [""], "answer": "1,080"}
    assert gsm_icot_to_records("a?||<<1=1>> #### 1\r\nb?|| #### 2\r\n") == [
        {"question": "a?", "steps": ["<<1=1>>"], "answer": "1"},
        {"question": "b?", "steps": [""], "answer": "2"},
    ]


def test_original_gsm8k_answer_to_icot_line() -> None:
    answer = "She sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    assert gsm8k_to_icot_line("How many?", answer) == "How many?||<<48/2=24>> <<48+24=72>> #### 72"
    assert gsm8k_to_icot_line("Q?", "No sums here.\n#### 5") == "Q?|| #### 5"


def test_exclusion_matches_questions_up_to_whitespace() -> None:
    lines = [
        json.dumps({"question": "Keep  me?", "answer": "<<1+1=2>>\n#### 2"}),
        json.dumps({"question": "Drop me?", "answer": "#### 3"}),
    ]
    records, excluded = gsm_jsonl_to_records("\n".join(lines) + "\n", exclude_questions=["Drop\tme? "])
    assert excluded == 1
    assert records == [{"question": "Keep  me?", "steps": ["<<1+1=2>>"], "answer": "2"}]


def _prontoqa_raw(n: int) -> dict:
    return {
        f"example{i}": {
            "test_example": {
                "question": f"Fact {i}.",
                "query": "True or false: x.",
                "chain_of_thought": ["a.", "b.", "c."],
                "answer": "True",
            }
        }
        for i in range(1, n + 1)
    }


def test_prontoqa_rule_and_split(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(_prontoqa_raw(5)))
    records = read_prontoqa(path)
    assert records[0] == {"question": "Fact 1. True or false: x.", "steps": ["a. b.", "c."], "answer": "True"}
    splits = split_prontoqa(records, train_size=2, valid_size=2)
    assert [len(v) for v in splits.values()] == [2, 2, 1]
    assert splits["test"][0]["question"].startswith("Fact 5.")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a?||<<1=1>> #### 1\nno separator #### 2\n", "in.txt: line 2: expected one '||'"),
        ("a?||b||<<1=1>> #### 1\n", "in.txt: line 1: expected one '||' between question and equations, found 2"),
        ("a?||<<1=1>> 1\n", "in.txt: line 1, field 'answer': expected one '####'"),
        ("a?||<<1=1>> #### \n", "in.txt: line 1, field 'answer': empty"),
        ("  ||<<1=1>> #### 1\n", "in.txt: line 1, field 'question': empty"),
        ("a?||<<1=1>> #### 1\n\nb?|| #### 2\n", "in.txt: line 2: empty line"),
        ("a?||<<1##1>> #### 1\n", "in.txt: line 1, field 'steps': contains '##'"),
        ("", "in.txt: no lines"),
    ],
)
def test_gsm_icot_errors_name_file_line_and_field(text: str, expected: str) -> None:
    with pytest.raises(ConversionError) as error:
        gsm_icot_to_records(text, "in.txt")
    assert str(error.value).startswith(expected), str(error.value)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("{not json", "in.jsonl: line 2: not valid JSON"),
        ("[1, 2]", "in.jsonl: line 2: expected an object, got list"),
        ('{"question": "q?"}', "in.jsonl: line 2, field 'answer': missing"),
        ('{"question": 3, "answer": "#### 1"}', "in.jsonl: line 2, field 'question': expected a string, got int"),
        ('{"question": "q?", "answer": "no final answer"}', "in.jsonl: line 2, field 'answer': expected one '#### N'"),
        ('{"question": "a||b?", "answer": "#### 1"}', "in.jsonl: line 2, field 'question': contains '||'"),
        ('{"question": "a\\nb?", "answer": "#### 1"}', "in.jsonl: line 2, field 'question': contains a line break"),
    ],
)
def test_gsm_jsonl_errors_name_file_line_and_field(line: str, expected: str) -> None:
    good = json.dumps({"question": "ok?", "answer": "<<1+1=2>>\n#### 2"})
    with pytest.raises(ConversionError) as error:
        gsm_jsonl_to_records(good + "\n" + line + "\n", "in.jsonl")
    assert str(error.value).startswith(expected), str(error.value)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda raw: raw["example2"].pop("test_example"), "record 'example2', field 'test_example': missing"),
        (lambda raw: raw["example2"]["test_example"].pop("query"), "record 'example2', field 'test_example.query': missing"),
        (
            lambda raw: raw["example1"]["test_example"].update(chain_of_thought="a. b."),
            "record 'example1', field 'test_example.chain_of_thought': expected list, got str",
        ),
        (
            lambda raw: raw["example1"]["test_example"].update(chain_of_thought=["a.", 7]),
            "record 'example1', field 'test_example.chain_of_thought[1]': expected a string, got int",
        ),
        (
            lambda raw: raw["example2"]["test_example"].update(answer=True),
            "record 'example2', field 'test_example.answer': expected str, got bool",
        ),
    ],
)
def test_prontoqa_errors_name_file_record_and_field(tmp_path: Path, edit, expected: str) -> None:
    raw = _prontoqa_raw(2)
    edit(raw)
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConversionError) as error:
        read_prontoqa(path)
    assert str(error.value) == f"{path}: {expected}"


def test_prontoqa_file_level_errors(tmp_path: Path) -> None:
    path = tmp_path / "raw.json"
    path.write_text('{"example1": {}, "example1": {}}')
    with pytest.raises(ConversionError, match="duplicate key 'example1'"):
        read_prontoqa(path)
    path.write_text("[]")
    with pytest.raises(ConversionError, match="expected a JSON object of examples, got list"):
        read_prontoqa(path)
    path.write_text('{"example1": ')
    with pytest.raises(ConversionError, match="not valid JSON"):
        read_prontoqa(path)
    with pytest.raises(ConversionError, match="file not found"):
        read_prontoqa(tmp_path / "missing.json")


def test_bad_input_writes_nothing(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a?||<<1=1>> #### 1\nbroken\n")
    out = tmp_path / "out.json"
    with pytest.raises(ConversionError, match="line 2"):
        convert_gsm_icot_file(source, out)
    assert not out.exists()


def test_write_is_atomic_and_never_over_an_input(tmp_path: Path) -> None:
    source = tmp_path / "in.txt"
    source.write_text("a?||<<1=1>> #### 1\n")
    with pytest.raises(ConversionError, match="refusing to overwrite the input file"):
        convert_gsm_icot_file(source, tmp_path / "." / "in.txt")
    assert source.read_text() == "a?||<<1=1>> #### 1\n"
    out = tmp_path / "sub" / "out.json"
    write_json_atomic([{"q": "é"}], out)
    write_json_atomic([{"q": "x"}], out)  # replaces an existing output
    assert out.read_bytes() == b'[{"q": "x"}]'
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.json"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


def test_prontoqa_script_converts_data_folder(shared_data: Path, tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "5hop_0shot_random.json").symlink_to(
        shared_data / "raw" / "prontoqa_5hop_0shot_random.first9200.json"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "preprocessing" / "prontoqa.py")], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    for split in ("train", "valid"):
        produced = (tmp_path / "data" / f"prontoqa_{split}.json").read_bytes()
        assert produced == (shared_data / f"prontoqa_{split}.json").read_bytes()
    assert (tmp_path / "data" / "prontoqa_test.json").read_bytes() == b"[]"


FAKE_CURL = """#!/usr/bin/env bash
# Stands in for curl: logs the URL and copies $FAKE_FILES/<basename of the URL> to the -o file.
out=""; url=""
while [ $# -gt 0 ]; do
    case "$1" in
        -o) out="$2"; shift 2 ;;
        -*) shift ;;
        *) url="$1"; shift ;;
    esac
done
echo "$url" >> "$FAKE_LOG"
cp "$FAKE_FILES/$(basename "$url")" "$out"
"""


def test_gsm_icot_bash_downloads_and_converts(shared_data: Path, tmp_path: Path) -> None:
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    files, fake_bin, work = tmp_path / "files", tmp_path / "bin", tmp_path / "work"
    for folder in (files, fake_bin, work):
        folder.mkdir()
    shutil.copy(shared_data / "raw" / "icot_gsm8k_valid.txt", files / "valid.txt")
    (files / "train.txt").write_text("Train q?||<<1+2=3>> #### 3\n")
    (files / "test.txt").write_text("Test q?|| #### 4\n")
    curl = fake_bin / "curl"
    curl.write_text(FAKE_CURL)
    curl.chmod(0o755)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(fake_bin), str(BIN), os.environ.get("PATH", "/usr/bin:/bin")]),
        "FAKE_FILES": str(files),
        "FAKE_LOG": str(tmp_path / "urls.log"),
    }
    result = subprocess.run(
        ["bash", str(ROOT / "preprocessing" / "gsm_icot.bash")], cwd=work, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    data = work / "data"
    assert (data / "gsm_valid.json").read_bytes() == (shared_data / "gsm_valid.json").read_bytes()
    assert json.loads((data / "gsm_train.json").read_text()) == [
        {"question": "Train q?", "steps": ["<<1+2=3>>"], "answer": "3"}
    ]
    assert json.loads((data / "gsm_test.json").read_text()) == [{"question": "Test q?", "steps": [""], "answer": "4"}]
    assert sorted(p.name for p in data.iterdir()) == ["gsm_test.json", "gsm_train.json", "gsm_valid.json"]
    commit = "e06a32ee5e4cd117171daeb4755d2a97ece62761"
    assert (tmp_path / "urls.log").read_text().split() == [
        f"https://media.githubusercontent.com/media/da03/Internalize_CoT_Step_by_Step/{commit}/data/gsm8k/train.txt",
        f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{commit}/data/gsm8k/valid.txt",
        f"https://raw.githubusercontent.com/da03/Internalize_CoT_Step_by_Step/{commit}/data/gsm8k/test.txt",
    ]
