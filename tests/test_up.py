"""``genseg up``: the whole local stack in one command, as a real process on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from plumbing.broker import free_port


def test_up_serves_the_gallery_runs_a_request_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "COLUMNS": "200", "GENSEG_BLOB_URL": str(tmp_path / "blobs")}
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "GENSEG_WEBHOOK_SECRET"):
        env.pop(name, None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "genseg.cli", "up", "--listen", f"127.0.0.1:{port}",
         "--models", "tiny", "--db", str(tmp_path / "view.sqlite3")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        while not any("gallery on" in line for line in lines):
            line = proc.stdout.readline()  # blocks until the stack said something
            assert line, "genseg up exited:\n" + "".join(lines)
            lines.append(line)
        url = f"http://127.0.0.1:{port}"
        assert f"gallery on {url}" in lines[-1]
        assert any("secret made for this run" in line for line in lines)
        with httpx.Client(base_url=url, timeout=120) as client:
            assert "<form" in client.get("/").text
            body = {"prompt": "a red cup", "targets": ["cup"], "width": 64, "height": 64,
                    "steps": 2}  # fmt: skip
            answer = client.post("/v1/requests", params={"wait": 90}, json=body)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == "done"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "Traceback" not in output and "stopped" in output


def test_up_refuses_a_bad_listen_address() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "genseg.cli", "up", "--listen", "nonsense"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
