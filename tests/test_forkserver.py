"""The fork server the tests start worker processes from (tests/forkserver.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests import forkserver

# A child reports what a program can see of its process.
REPORT = """
import json, os, random, sys
print(json.dumps({
    "pid": os.getpid(),
    "name": __name__,
    "argv": sys.argv,
    "cwd": os.getcwd(),
    "variable": os.environ.get("GENSEG_PROBE"),
    "preloaded": "diffusers" in sys.modules,
    "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
    "random": random.random(),
}))
"""


def report(tmp_path: Path, **env: str) -> dict[str, object]:
    done = forkserver.run(
        [sys.executable, "-c", REPORT, "an-argument"],
        env={**os.environ, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_a_child_is_its_own_process_with_the_asked_environment(tmp_path: Path) -> None:
    first = report(tmp_path, GENSEG_PROBE="one")
    second = report(tmp_path, GENSEG_PROBE="two")
    assert first["preloaded"], "forked from the server, which imported diffusers"
    assert first["pid"] != os.getpid() and first["pid"] != second["pid"]
    assert first["name"] == "__main__" and first["argv"] == ["-c", "an-argument"]
    assert first["cwd"] == str(tmp_path)
    assert (first["variable"], second["variable"]) == ("one", "two")
    # Only its standard streams (and the descriptor listing them): nothing of the server's.
    assert len(first["fds"]) == 4 and first["fds"][:3] == [0, 1, 2]  # type: ignore[index]
    assert first["random"] != second["random"], "each child seeds its own random state"


def test_a_variable_read_at_import_gets_a_fresh_interpreter(tmp_path: Path) -> None:
    fresh = report(tmp_path, HF_HOME=str(tmp_path / "hf"))
    assert not fresh["preloaded"]
    proc = forkserver.popen([sys.executable, "-c", "pass"], env={**os.environ, "HF_HOME": "x"})
    assert isinstance(proc, subprocess.Popen)
    assert proc.wait(300) == 0


def test_exit_statuses_are_the_interpreters(tmp_path: Path) -> None:
    def status(code: str) -> subprocess.CompletedProcess[str]:
        return forkserver.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )

    assert status("import sys; sys.exit(3)").returncode == 3
    failed = status("raise ValueError('boom')")
    assert failed.returncode == 1 and "ValueError: boom" in failed.stderr
    marker = tmp_path / "atexit"
    code = f"import atexit, pathlib; atexit.register(pathlib.Path({str(marker)!r}).touch)"
    assert status(code).returncode == 0 and marker.exists(), "atexit handlers run"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_signals_reach_the_child_and_its_status_says_so(sig: int) -> None:
    proc = forkserver.popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE,
    )
    assert isinstance(proc, forkserver.ForkedProcess)
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    assert proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(0.1)
    proc.send_signal(sig)
    assert proc.wait(60) == -sig
    proc.kill()  # after the exit: nothing to signal, no error


def test_a_module_writes_to_the_given_file_as_it_would_alone(tmp_path: Path) -> None:
    log_path = tmp_path / "out.log"
    with log_path.open("wb") as log:
        proc = forkserver.popen(
            [sys.executable, "-m", "genseg.cli", "--no-such-option"],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    assert isinstance(proc, forkserver.ForkedProcess)
    assert proc.wait(300) == 2  # click's status for a usage error
    assert "No such option" in log_path.read_text()


def test_off_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GENSEG_TEST_FORKSERVER", "0")
    assert forkserver.forkable([sys.executable, "-c", "pass"], dict(os.environ)) is None
