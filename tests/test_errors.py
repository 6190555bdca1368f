"""Expected errors end as one line and an exit status, caught once in ``nbs``; bugs keep their traceback."""

import ast
import errno
import inspect
from pathlib import Path

import pytest
import yaml
from helpers import tiny_config

import noblankslate.cli as cli
from noblankslate.errors import NbsError, describe_os_error

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "noblankslate"


class _Raising(NbsError):
    label = "thing broke"
    exit_code = 7


def _run_handler(monkeypatch, handler):
    """Run ``nbs data check x`` with its handler replaced, so only the error path of main is exercised."""
    monkeypatch.setattr("noblankslate.cli.data.check", lambda path: handler())
    return cli.main(["data", "check", "x.json"])


def test_an_expected_error_is_one_line_with_its_label_and_exit_status(monkeypatch, capsys):
    def handler():
        raise _Raising("the widget at w.json, record 3, field 'x'")

    assert _run_handler(monkeypatch, handler) == 7
    err = capsys.readouterr().err
    assert err == "thing broke: the widget at w.json, record 3, field 'x'\n"


@pytest.mark.parametrize(("error", "expected"), [
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/model.safetensors"),
     "file error: disk full while writing /runs/x/model.safetensors: free space"),
    (PermissionError(errno.EACCES, "Permission denied", "/runs/x"),
     "file error: permission denied: /runs/x (check the owner"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/train.json"),
     "file error: no such file or folder: /data/train.json"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), "file error: read-only file system: /ro/x"),
])
def test_file_system_errors_name_the_file(monkeypatch, capsys, error, expected):
    def handler():
        raise error

    assert _run_handler(monkeypatch, handler) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1


def test_a_rename_error_names_both_paths():
    error = OSError(errno.EXDEV, "Invalid cross-device link", "/a/tmp", None, "/b/final")
    assert describe_os_error(error) == "Invalid cross-device link: /a/tmp -> /b/final"


def test_bugs_keep_their_traceback(monkeypatch):
    def handler():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        _run_handler(monkeypatch, handler)

    def os_handler():
        raise OSError("no file involved")

    with pytest.raises(OSError):
        _run_handler(monkeypatch, os_handler)


def test_a_full_disk_during_a_checkpoint_stops_training_with_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=1)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))

    def full(state_dict, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("noblankslate.train.checkpoint.save_state_dict", full)
    assert cli.main(["train", str(config_file)]) == 2
    err = capsys.readouterr().err
    assert "file error: disk full while writing" in err and "model.safetensors" in err
    run_dir = tmp_path / "runs" / "tiny"
    assert not list(run_dir.glob("checkpoint_*")) and not list(run_dir.glob(".checkpoint_*"))  # nothing half-written


def test_every_exception_class_of_the_project_is_an_expected_error():
    """A new error class that forgot the base would reach the user as a traceback."""
    import importlib
    import pkgutil

    import noblankslate

    classes = {}
    for info in pkgutil.walk_packages(noblankslate.__path__, "noblankslate."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, BaseException) and value.__module__ == info.name:
                classes[f"{info.name}.{name}"] = value
    assert len(classes) >= 15  # the scan sees them
    outside = sorted(name for name, value in classes.items() if not issubclass(value, NbsError))
    assert not outside, f"exception classes that do not derive from NbsError: {outside}"


def test_no_cli_command_swallows_errors_itself():
    """Caught once, in main: a command's own except clause that prints and returns would give another format
    and exit status. A clause that turns a parse error into a project error (it raises) is fine."""
    offenders = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        if path.name == "__init__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler) and not any(isinstance(n, ast.Raise) for n in ast.walk(node)):
                offenders.append(f"{path.name}:{node.lineno} except {ast.unparse(node.type) if node.type else ''}")
    assert offenders == ["demo.py:23 except (OSError, ValueError, IndexError)"], offenders  # the /proc/stat fallback


def test_labels_are_set_on_every_subclass():
    from noblankslate.config import ConfigError
    from noblankslate.data.schema import DataError
    from noblankslate.train.checkpoint import CheckpointError
    from noblankslate.train.loop import TrainingDiverged, TrainingInterrupted

    assert (ConfigError.label, ConfigError.exit_code) == ("config error", 2)
    assert (DataError.label, DataError.exit_code) == ("data error", 2)
    assert CheckpointError.label == "checkpoint error"
    assert (TrainingDiverged.exit_code, TrainingInterrupted.exit_code) == (1, 130)
    assert all(inspect.isclass(c) and issubclass(c, NbsError)
               for c in (ConfigError, DataError, CheckpointError, TrainingDiverged, TrainingInterrupted))


def test_overrides_may_come_between_and_after_options_in_the_order_given(capsys):
    """``nbs memory build CONFIG --evaluate k=v`` and ``nbs analyze CONFIG --limit 3 k=v`` parse as one would
    expect; a mistyped option or a stray word is still refused, naming it."""
    from noblankslate.cli import build_parser, parse_arguments

    parser = build_parser()
    args = parse_arguments(parser, ["memory", "build", "c.yaml", "a=1", "--evaluate", "b=2", "--metrics-out", "m.json", "a=3"])
    assert (args.config, args.overrides, args.evaluate, args.metrics_out) == ("c.yaml", ["a=1", "b=2", "a=3"], True, "m.json")
    args = parse_arguments(parser, ["analyze", "c.yaml", "--limit", "3", "lr=1e-4"])
    assert (args.limit, args.overrides) == (3, ["lr=1e-4"])
    for bad, word in ((["memory", "build", "c.yaml", "--evalute"], "--evalute"),
                      (["analyze", "c.yaml", "--limit", "3", "stray"], "stray"),
                      (["data", "check", "f.json", "x=1"], "x=1")):
        with pytest.raises(SystemExit) as exit_info:
            parse_arguments(parser, bad)
        assert exit_info.value.code == 2
        assert f"unrecognized arguments: {word}" in capsys.readouterr().err
