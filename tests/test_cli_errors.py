"""Expected failures of the command line, as a newcomer meets them: one or two lines on
stderr saying what failed and what to do, a non-zero exit, no traceback (``--debug``
shows it). Real processes; every address is on loopback or cannot resolve."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from plumbing.broker import free_port, port_in_use
from plumbing.settings import Settings

ROOT = Path(__file__).resolve().parents[1]

#: Commands that talk to a broker (the target is in the prompt: no warning line).
BROKER_COMMANDS = [
    ["submit", "a red circle", "--target", "red circle"],
    ["tail", "prompts"],
    ["topics", "create"],
    ["dlq", "replay"],
]


def genseg(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """``python -m genseg.cli ARGS`` with ``env`` over a clean environment."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GENSEG_"))}
    return subprocess.run(
        [sys.executable, "-m", "genseg.cli", *args],
        env={**clean, "COLUMNS": "80", **env},  # narrow: a long message must not wrap
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_said_in_words(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for text in expected:
        assert text in done.stderr, done.stderr


def no_broker_port() -> int:
    return free_port()  # a loopback port nothing listens on


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: c[0])
@pytest.mark.parametrize(
    ("servers", "expected"),
    [
        (None, "no broker at 127.0.0.1:"),
        ("nohost.invalid:9092", "cannot resolve nohost.invalid"),
        ("127.0.0.1:notaport", "is not HOST:PORT"),
    ],
    ids=["no-broker", "unknown-host", "bad-port"],
)
def test_broker_commands_say_what_is_wrong(
    command: list[str], servers: str | None, expected: str
) -> None:
    servers = servers or f"127.0.0.1:{no_broker_port()}"
    done = genseg(*command, env={"KAFKA_BOOTSTRAP_SERVERS": servers})
    assert_said_in_words(done, expected, "KAFKA_BOOTSTRAP_SERVERS")


@pytest.mark.parametrize("command", BROKER_COMMANDS, ids=lambda c: c[0])
def test_a_host_without_port_means_9092(command: list[str]) -> None:
    if port_in_use("127.0.0.1", 9092):
        pytest.skip("something listens on localhost:9092 here")
    done = genseg(*command, env={"KAFKA_BOOTSTRAP_SERVERS": "localhost"})
    assert_said_in_words(done, "no broker at localhost:9092", "genseg broker")


@pytest.mark.parametrize("debug", [["--debug"], []], ids=["flag", "env"])
def test_debug_shows_the_traceback(debug: list[str]) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{no_broker_port()}"}
    if not debug:
        env["GENSEG_DEBUG"] = "1"
    done = genseg(*debug, "topics", "create", env=env)
    assert done.returncode != 0
    assert "Traceback" in done.stderr
    assert "no broker at" in done.stderr


@pytest.fixture
def silent_broker() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_silent_broker_is_given_up_on_in_seconds(silent_broker: int) -> None:
    started = time.monotonic()
    done = genseg("topics", "create", env={"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{silent_broker}"})
    assert time.monotonic() - started < 20, "aiokafka's own timeouts are 40 s"
    assert_said_in_words(done, f"127.0.0.1:{silent_broker} did not answer")


def weightless_env(settings: Settings, tmp_path: Path) -> dict[str, str]:
    """The pretrained profile with nothing cached and downloads off: no traffic leaves
    this machine, whatever it can reach."""
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
        "GENSEG_MODELS": "pretrained",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_OFFLINE": "1",
    }


def test_a_worker_without_weights_says_which_setting(settings: Settings, tmp_path: Path) -> None:
    env = weightless_env(settings, tmp_path)
    done = genseg("worker", "gen", "--log-level", "WARNING", env=env, timeout=300)
    assert_said_in_words(
        done, "could not load SD_MODEL stable-diffusion-v1-5/", "set SD_MODEL to a local"
    )


def test_the_pretrained_demo_without_weights_says_which_setting(
    settings: Settings, tmp_path: Path
) -> None:
    env = weightless_env(settings, tmp_path)
    done = genseg(
        "demo", "a red cup", "--target", "cup", "--models", "pretrained",
        "--out", str(tmp_path / "out"), env=env, timeout=300,
    )  # fmt: skip
    assert_said_in_words(done, "could not load SD_MODEL", "set SD_MODEL to a local")


def test_a_missing_sam_checkpoint_is_named(settings: Settings, tmp_path: Path) -> None:
    env = {**weightless_env(settings, tmp_path), "SAM_CHECKPOINT": str(tmp_path / "no.pth")}
    done = genseg("worker", "seg", "--log-level", "WARNING", env=env, timeout=300)
    assert_said_in_words(done, f"could not load SAM_CHECKPOINT {tmp_path / 'no.pth'}")


def test_worker_options_a_stage_cannot_take_are_refused(settings: Settings) -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers}
    done = genseg("worker", "scene", "--concurrency", "2", env=env)
    assert done.returncode == 2
    assert_said_in_words(done, "one record at a time")
