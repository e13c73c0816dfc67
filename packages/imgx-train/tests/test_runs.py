"""Run directories: unique creation under a race, and the run lock."""

import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from imgx_train import config as config_lib
from imgx_train import runs

# A stand-in for another process: it takes the lock as `runs.locked` does, says so, and
# holds it until it is killed.
_HOLDER = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
print("locked", flush=True)
sys.stdin.read()
"""


def test_racing_new_run_dirs_get_distinct_folders(tmp_path, monkeypatch):
    class FrozenClock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(datetime, "datetime", FrozenClock)
    cfg = config_lib.Config()
    start = threading.Barrier(8)
    made = []

    def make():
        start.wait()
        made.append(runs.new_run_dir(cfg, tmp_path))

    threads = [threading.Thread(target=make) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(made)) == 8
    assert all(path.is_dir() for path in made)
    assert sorted(p.name for p in made)[0] == "20260102-030405-phantom-diffusion"


def test_second_holder_of_a_run_gets_the_holders_pid_and_host(tmp_path):
    with runs.locked(tmp_path):
        with pytest.raises(runs.RunError) as info:
            with runs.locked(tmp_path):
                pass
    message = str(info.value)
    assert f"in use by pid {os.getpid()} on host {socket.gethostname()}" in message
    assert str(tmp_path / ".lock") in message and "\n" not in message
    with runs.locked(tmp_path):  # released on the way out
        pass


def test_lock_held_by_another_process_then_left_stale_by_kill_9(tmp_path):
    lock = tmp_path / ".lock"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(runs.RunError, match=f"pid {child.pid} on host "):
            with runs.locked(tmp_path):
                pass
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert json.loads(lock.read_text())["pid"] == child.pid  # the stale file stays ...
    with runs.locked(tmp_path):  # ... and does not block
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_lock_is_released_on_an_exception(tmp_path):
    with pytest.raises(ValueError), runs.locked(tmp_path):
        raise ValueError("boom")
    with runs.locked(tmp_path):
        pass
