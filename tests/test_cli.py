"""The ``genseg`` command line: real processes and a real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from consumers.config import RuntimeConfig
from genseg.cli import app
from genseg.demo import QUICK_JOIN
from genseg.workers import InvalidWorkerOptions, build_runtimes, running
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


def test_submit_without_target_says_nothing_will_be_cut_out(settings: Settings) -> None:
    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    result = runner.invoke(app, ["submit", "a red cup", "--id", "warn-1"], env=env)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "warn-1", "published all the same"
    [warning] = result.stderr.strip().splitlines()
    assert "nothing will be cut out" in warning and "--target NAME" in warning
    assert "--mode auto" in warning
    auto = runner.invoke(app, ["submit", "a red cup", "--mode", "auto"], env=env)
    assert auto.exit_code == 0 and auto.stderr == "", "auto mode cuts out every object"


def test_submit_warns_of_a_target_the_prompt_does_not_name(settings: Settings) -> None:
    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    args = ["submit", "a red teacup", "--target", "cup", "--target", "red", "--id", "warn-2"]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    [warning] = result.stderr.strip().splitlines()
    assert "'cup' not in the prompt" in warning and "'red'" not in warning


@pytest.mark.parametrize(("models", "side"), [("toy", 64), ("tiny", 512)])
def test_submit_takes_the_profiles_size(settings: Settings, models: str, side: int) -> None:
    env = {**env_for(settings), "GENSEG_MODELS": models}
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    result = runner.invoke(app, ["submit", "a red circle", "-t", "red circle"], env=env)
    assert result.exit_code == 0, result.output
    event = asyncio.run(read_topic(settings, "prompts", 1)).values("prompts")[0]
    assert (event["width"], event["height"]) == (side, side)


def test_dlq_replay_names_topic_partition_and_offset(settings: Settings) -> None:
    from producers.publisher import Publisher
    from schemas import DeadLetterEvent, ErrorInfo, SourceInfo

    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create"], env=env).exit_code == 0
    dead = DeadLetterEvent(
        id="dead-1", stage="gen", error=ErrorInfo(type="transient", message="store down"),
        attempts=3, source=SourceInfo(topic=settings.topics.prompts, partition=2, offset=17),
        value='{"id": "dead-1", "prompt": "a cup"}',
    )  # fmt: skip

    async def publish() -> None:
        async with Publisher(settings) as publisher:
            await publisher.publish(settings.topics.dlq, dead)

    asyncio.run(publish())
    result = runner.invoke(app, ["dlq", "replay", "--dry-run"], env=env)
    assert result.exit_code == 0, result.output
    assert f"from {settings.topics.prompts}[2]@17" in result.stdout


def test_worker_flags_default_to_not_given() -> None:
    """Every ``genseg worker`` tuning flag is None unless given: RuntimeConfig decides."""
    command = typer.main.get_command(app).commands["worker"]  # type: ignore[attr-defined]
    tuning = {
        p.name: p.default for p in command.params if p.name in RuntimeConfig.__dataclass_fields__
    }
    assert {"concurrency", "max_batch", "max_wait_ms", "max_in_flight", "partitions"} <= set(tuning)
    assert set(tuning.values()) == {None}, tuning
    others = {p.name: p.default for p in command.params}
    assert others["drain_timeout"] is others["job_timeout"] is others["create_topics"] is None


def test_a_worker_built_without_overrides_has_runtimeconfigs_defaults(settings: Settings) -> None:
    [gen] = build_runtimes("gen", settings, max_batch=None, concurrency=None)
    assert gen.config == RuntimeConfig(max_batch=4), "the generator's own batch of four"
    seg, scene = build_runtimes("seg", settings, instance_id="seg-a", metrics_port=None)
    assert (seg.stage.name, scene.stage.name) == ("seg", "scene")
    assert seg.config == RuntimeConfig(instance_id="seg-a")
    assert scene.config == RuntimeConfig(instance_id="seg-a-scene")
    [alone] = build_runtimes("seg", settings, scenes=False, max_batch=2, partitions=8)
    assert (alone.config.max_batch, alone.config.partitions) == (2, 8)
    with pytest.raises(InvalidWorkerOptions, match="one record at a time"):
        build_runtimes("scene", settings, concurrency=2)


@contextlib.contextmanager
def pipeline_in_a_thread(settings: Settings) -> Iterator[None]:
    """A generator and a segmenter runtime (tiny models) served by a thread of this process,
    wired as ``genseg demo`` wires them."""
    started, stop = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    async def serve() -> None:
        runtimes = [
            *build_runtimes("gen", settings, **QUICK_JOIN),
            *build_runtimes("seg", settings, scenes=False, **QUICK_JOIN),
        ]
        async with running(runtimes):
            started.set()
            await asyncio.to_thread(stop.wait)

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:
            failed.append(exc)
            started.set()

    thread = threading.Thread(target=main, name="pipeline")
    thread.start()
    try:
        assert started.wait(300) and not failed, failed
        yield
    finally:
        stop.set()
        thread.join(120)


def test_submit_wait_says_which_targets_the_tokenizer_did_not_find(settings: Settings) -> None:
    env = env_for(settings)
    assert runner.invoke(app, ["topics", "create", "--partitions", "1"], env=env).exit_code == 0
    # The tiny profile's tokenizer reads 77 tokens; an unknown word costs one per letter.
    prompt = "a red cup next to " + "xylophone " * 10 + "and a green apple"
    args = ["submit", prompt, "-t", "cup", "-t", "apple", "--wait", "--steps", "2",
            "--width", "64", "--height", "64", "--timeout", "300"]  # fmt: skip
    with pipeline_in_a_thread(settings):
        result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    assert "image 0:" in result.stdout
    [note] = result.stderr.strip().splitlines()
    assert "did not find 'apple'" in note and "'cup'" not in note


def test_the_local_stack_of_the_readme(tmp_path: Path) -> None:
    """README "A local stack by hand": ``genseg broker``, a gen and a seg worker on the toy
    profile, and ``genseg submit --wait`` at the toy's size, each its own process, all in
    one directory (the blob store ``./genseg-blobs`` they share)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KAFKA_", "GENSEG_", "OTEL_"))}
    env |= {"KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "COLUMNS": "240"}
    toy = {**env, "GENSEG_MODELS": "toy", "PYTHONUNBUFFERED": "1"}
    cli = [sys.executable, "-m", "genseg.cli"]
    procs: list[subprocess.Popen[str]] = []

    def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [*cli, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        procs.append(proc)
        return proc

    def wait_for_line(proc: subprocess.Popen[str], text: str) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the process does
            if text in line:
                return
        raise AssertionError(f"{proc.args} ended (status {proc.wait()}) before {text!r}")

    try:
        wait_for_line(start(["broker", "--listen", f"127.0.0.1:{port}"], env), "broker ready")
        gen = start(["worker", "gen", "--torch-threads", "1"], toy)
        seg = start(["worker", "seg", "--torch-threads", "1"], toy)
        wait_for_line(gen, "stage gen assigned")
        wait_for_line(seg, "stage seg assigned")
        done = subprocess.run(
            [*cli, "submit", "a red circle next to a blue square", "--target", "red circle",
             "--wait", "--timeout", "300", "--seed", "7"],  # a seed: the same image each run
            env=toy, cwd=tmp_path, capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "image 0: ok" in done.stdout and "red circle (" in done.stdout
        assert done.stderr == "", "no warning: the target is in the prompt"
        [image] = (tmp_path / "genseg-blobs").glob("*/0/gen/image.png")
        assert Image.open(image).size == (64, 64)
        for proc in reversed(procs):  # Ctrl-C, as a person would
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_each_invalid_setting_is_one_line_naming_its_variable() -> None:
    env = {"GENSEG_SD_ARCH": "sdxx", "GENSEG_SEGMENTER": "sam9"}
    result = subprocess.run(
        [sys.executable, "-m", "genseg.cli", "topics", "create"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr
    assert any(line.startswith("invalid settings: GENSEG_SD_ARCH='sdxx'") for line in lines)
    assert any(line.startswith("invalid settings: GENSEG_SEGMENTER='sam9'") for line in lines)
