"""The ``genseg`` command line: real processes and a real broker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genseg.cli import app
from plumbing.broker import free_port, kafka_api_versions_ok
from plumbing.settings import Settings
from schemas.export import CONTRACT_MODELS
from tests.kafka_utils import TopicReader

runner = CliRunner()


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap_servers,
        "GENSEG_TOPIC_PREFIX": settings.topic_prefix,
        "GENSEG_BLOB_URL": settings.blob_url,
    }


def test_help_lists_every_contract_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("demo", "broker", "worker", "submit", "tail", "topics", "dlq", "schema"):
        assert command in result.output


def test_schema_prints_every_contract_schema_and_asyncapi() -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.output)
    assert set(document["schemas"]) == set(CONTRACT_MODELS)
    assert document["asyncapi"]["asyncapi"] == "3.0.0"
    only = json.loads(runner.invoke(app, ["schema", "--asyncapi"]).output)
    assert only["channels"]["prompts"]["address"] == "genseg.prompts"


def test_topics_create_is_idempotent(settings: Settings) -> None:
    env = env_for(settings)
    first = runner.invoke(app, ["topics", "create", "--partitions", "2"], env=env)
    assert first.exit_code == 0, first.output
    assert f"{settings.topics.prompts}: created" in first.output
    second = runner.invoke(app, ["topics", "create", "--partitions", "2"], env=env)
    assert f"{settings.topics.prompts}: exists" in second.output
    assert "created" not in second.output


async def read_topic(settings: Settings, topic: str, count: int) -> TopicReader:
    async with TopicReader(settings, topic) as reader:
        await reader.until(lambda: len(reader.keys(topic)) >= count)
    return reader


def test_submit_publishes_a_valid_prompt_event(settings: Settings) -> None:
    # The CLI runs its own event loop (asyncio.run), so this test is synchronous.
    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    result = runner.invoke(
        app, ["submit", "a red cup", "--target", "cup", "--id", "cli-1", "--steps", "10"], env=env
    )
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "cli-1"
    reader = asyncio.run(read_topic(settings, "prompts", 1))
    assert reader.keys("prompts") == ["cli-1"]
    event = reader.values("prompts")[0]
    assert event["schema"] == "genseg.prompt/v1"
    assert event["targets"] == ["cup"] and event["steps"] == 10
    headers = dict(reader.records[settings.topics.prompts][0].headers)
    assert headers["traceparent"].startswith(b"00-")


def test_submit_refuses_bad_input_before_publishing() -> None:
    env = {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:1"}  # nothing listens: must not be reached
    result = runner.invoke(app, ["submit", "x", "--width", "65", "--steps", "0"], env=env)
    assert result.exit_code == 2
    assert "width" in result.output and "steps" in result.output


def test_submit_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from genseg import cli\n"
        "import producers.client, consumers.subscriber\n"
        "heavy = [m for m in ('torch', 'diffusers', 'segment_anything') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_invalid_settings_are_reported_clearly() -> None:
    result = runner.invoke(app, ["topics", "create"], env={"GENSEG_TOPIC_PREFIX": "bad prefix!"})
    assert result.exit_code == 2
    assert "invalid settings" in result.output


def test_tail_prints_records(settings: Settings) -> None:
    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    assert runner.invoke(app, ["submit", "a cup", "--id", "tail-1"], env=env).exit_code == 0
    result = runner.invoke(app, ["tail", "prompts", "--from-beginning", "--limit", "1"], env=env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[0])["id"] == "tail-1"
    assert runner.invoke(app, ["tail", "nope"], env=env).exit_code == 2


def test_broker_command_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "genseg.cli", "broker", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()  # blocks until the broker answers
        assert f"broker ready on 127.0.0.1:{port}" in line
        assert kafka_api_versions_ok("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert not kafka_api_versions_ok("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("listen", ["9092", "host:", "nonsense"])
def test_broker_command_refuses_a_bad_address(listen: str) -> None:
    result = runner.invoke(app, ["broker", "--listen", listen])
    assert result.exit_code == 2
