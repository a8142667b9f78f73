"""Shared fixtures: a real tansu broker per session, fresh topics and blob store per test."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from plumbing.broker import EmbeddedBroker
from plumbing.settings import Settings
from tests import forkserver

_prefixes = itertools.count()

# Worker processes the tests start (their environment copies this one) use the session
# the in-process runtimes of the tests use: tansu completes each group join only after
# half the session, so 6 s instead of the default 10 takes 2 s off every worker start and
# rebalance, and 4 s off every takeover of a killed worker's partitions. Tests that start
# processes as a user would (no KAFKA_* of this run) keep the default.
os.environ.setdefault("KAFKA_SESSION_TIMEOUT_MS", "6000")


@pytest.fixture(autouse=True)
def environment_restored() -> Iterator[None]:
    """Each test leaves the environment as it found it. A command run in-process (typer's
    CliRunner) sets variables that would otherwise stay for every later test, and the
    processes they start (tests/forkserver.py forks only for an unchanged environment)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """One embedded Kafka-protocol broker (tansu, memory storage) on a free loopback port."""
    log_path = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    path = tmp_path / "blobs"
    path.mkdir()
    return path


@pytest.fixture
def settings(broker: EmbeddedBroker, blob_dir: Path) -> Settings:
    """Settings pointing at the session broker, with a topic prefix no other test uses."""
    prefix = f"t{os.getpid()}-{next(_prefixes)}"
    return Settings(
        kafka_bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=prefix,
        blob_url=str(blob_dir),
        models="tiny",
    )


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Give torch back its thread count after a test that trains with its own."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_collection_finish(session: pytest.Session) -> None:
    """The fork server's environment: the session's, with every test module imported
    (toy's training modules set OMP_WAIT_POLICY when imported)."""
    forkserver.set_baseline(os.environ)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """How the test processes started (tests/forkserver.py): a run whose processes all
    start fresh has lost the fork server, which the summary makes visible."""
    if forkserver.counts:
        summary = ", ".join(f"{n} {how}" for how, n in forkserver.counts.most_common())
        terminalreporter.write_line(f"test processes: {summary}")
