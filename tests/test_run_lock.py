"""One run per folder: a second run is refused naming the first; a dead run's lock is replaced."""

import json
import socket
import subprocess

import pytest
import yaml
from helpers import tiny_config

from noblankslate.cli import main
from noblankslate.train.lock import LOCK_FILE, RunLock, RunLocked


def _write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "started": "then"}))


def test_a_second_run_is_refused_and_a_dead_runs_lock_is_replaced(tmp_path, tiny_data, capsys):
    raw = tiny_config(tmp_path, tiny_data, num_epochs=1)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    run_dir = tmp_path / "runs" / "tiny"
    other = subprocess.Popen(["sleep", "60"])  # a live process that "holds" the folder
    try:
        _write_lock(run_dir, other.pid)
        assert main(["train", str(config_file)]) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {other.pid} on host {socket.gethostname()}" in err
        assert not list(run_dir.glob("checkpoint_*"))  # nothing was done
    finally:
        other.kill()
        other.wait()
    assert main(["train", str(config_file)]) == 0  # the holder is gone: its lock is stale
    assert f"replacing a stale lock of pid {other.pid}" in capsys.readouterr().out
    assert (run_dir / "checkpoint_1").is_dir() and not (run_dir / LOCK_FILE).exists()  # released at the end


def test_a_lock_from_another_host_is_refused(tmp_path):
    _write_lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(RunLocked, match="pid 1 on host elsewhere"):
        RunLock(tmp_path).acquire()
    with RunLock(tmp_path / "free") as lock:
        assert lock.held and json.loads((tmp_path / "free" / LOCK_FILE).read_text())["host"] == socket.gethostname()
    assert not (tmp_path / "free" / LOCK_FILE).exists()
