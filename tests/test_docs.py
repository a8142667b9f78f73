"""Every code block in README.md and docs/ that is meant to run is run here, or names the
test that runs it.

The blocks, by fence language:

- ``python``: run as a script in a subprocess, against the test broker with a tiny
  generator and segmenter running (a block is a complete program, as a reader would
  paste it);
- ``json``: a contract event, decoded with the registry (a prompt event unless its
  ``schema`` says otherwise);
- ``toml``: parsed; a request policy (a document with ``version``, ``rules``,
  ``rate_limit``, ``tenants`` or ``safety``) is loaded by the generator's policy parser;
- ``bash``, ``sh``: shell sessions for a person, with background services and
  waits; each is preceded by ``<!-- run by tests/FILE.py::TEST -->`` naming the test
  that runs what it shows (checked to exist), or ``<!-- not run: REASON -->``.

``<!-- not run: REASON -->`` before any block excludes it (e.g. commands that need a
GPU, Docker or the internet); other languages (``mermaid``, ``yaml``, none) are not code.
"""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from plumbing.kafka import ensure_topics
from plumbing.settings import Settings
from schemas import decode_record
from tests import forkserver
from tests.rel_utils import WorkerProcess, worker_env

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
NOTE = re.compile(r"<!--\s*(not run:|run by)\s*(.*?)\s*-->\s*$", re.S)
CODE = {"python", "json", "toml", "bash", "sh"}


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    body: str
    note: tuple[str, str] | None  # ("not run:" | "run by", text) of the comment before it

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> Iterator[Block]:
    for path in DOCUMENTS:
        text = path.read_text()
        for match in FENCE.finditer(text):
            lang = match.group(1)
            if lang not in CODE:
                continue
            before = text[: match.start()].rstrip().rsplit("\n", 1)[-1]
            note = NOTE.search(before)
            yield Block(
                path,
                text.count("\n", 0, match.start()) + 1,
                lang,
                match.group(2),
                (note.group(1), note.group(2)) if note else None,
            )


def of(*langs: str) -> list[Block]:
    return [b for b in blocks() if b.lang in langs and (b.note is None or b.note[0] != "not run:")]


def ids(items: list[Block]) -> list[str]:
    return [b.name for b in items]


@pytest.fixture(scope="module")
def pipeline(broker: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A tiny generator and segmenter (real worker processes) and their environment."""
    from plumbing.broker import EmbeddedBroker

    assert isinstance(broker, EmbeddedBroker)
    tmp = tmp_path_factory.mktemp("docs")
    settings = Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix="docs",
        blob_url=str(tmp / "blobs"),
        models="tiny",
    )
    # As the README's shell session does with `genseg topics create`: a block's Subscriber
    # looks its topics up for 10 s, and the workers (which would create them) may take
    # longer than that to import torch on a slow machine.
    asyncio.run(ensure_topics(settings))
    env = worker_env(settings)
    workers = [WorkerProcess(kind, env, tmp) for kind in ("gen", "seg")]
    for worker in workers:
        worker.start()
    try:
        asyncio.run(_all_assigned(workers))
        yield env
    finally:
        for worker in workers:
            worker.stop()


async def _all_assigned(workers: list[WorkerProcess]) -> None:
    await asyncio.gather(*(worker.wait_assigned(timeout=240) for worker in workers))


@pytest.mark.parametrize("block", of("python"), ids=ids(of("python")))
def test_python_blocks_run(block: Block, pipeline: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(block.body)
    done = forkserver.run(
        [sys.executable, str(script)],
        env=pipeline,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{block.name} failed:\n{done.stdout}\n{done.stderr[-3000:]}"


@pytest.mark.parametrize("block", of("json"), ids=ids(of("json")))
def test_json_blocks_are_contract_events(block: Block) -> None:
    decode_record("prompts", block.body.encode())


@pytest.mark.parametrize("block", of("toml"), ids=ids(of("toml")))
def test_toml_blocks_parse(block: Block) -> None:
    data = tomllib.loads(block.body)
    if {"version", "rules", "rate_limit", "tenants", "safety"} & set(data):
        from gen_worker.policy import Policy

        Policy.from_toml(block.body)


@pytest.mark.parametrize("block", of("bash", "sh"), ids=ids(of("bash", "sh")))
def test_shell_blocks_name_the_test_that_runs_them(block: Block) -> None:
    assert block.note is not None, (
        f"{block.name}: a shell block needs <!-- run by tests/FILE.py::TEST --> "
        "or <!-- not run: REASON --> before it"
    )
    target = block.note[1]
    file, _, test = target.partition("::")
    path = ROOT / file
    assert path.is_file(), f"{block.name}: {file} does not exist"
    assert re.search(rf"^(async )?def {re.escape(test)}\(", path.read_text(), re.M), (
        f"{block.name}: {target} does not exist"
    )


def test_every_excluded_block_says_why() -> None:
    for block in blocks():
        if block.note is not None and block.note[0] == "not run:":
            assert len(block.note[1]) > 10, f"{block.name}: say why it is not run"
