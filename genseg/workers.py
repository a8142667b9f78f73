"""A worker process's wiring, written once: the runtimes a worker kind runs, their
configuration, and serving them until SIGTERM.

``genseg worker``, both demos and the benches build their runtimes here. An override
of None means "not given", so :class:`~consumers.config.RuntimeConfig`, under a
stage's own ``runtime_defaults`` (the generator's batch of four), is the one source of
runtime defaults. The runtime and the stages are imported when used: the command line
imports this module to name the worker kinds, and ``genseg submit`` must start fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from consumers.config import RuntimeConfig
from consumers.stage import Stage
from plumbing.settings import Settings

if TYPE_CHECKING:
    from opentelemetry import trace

    from consumers.runtime import StageRuntime


class WorkerKind(StrEnum):
    gen = "gen"
    seg = "seg"
    scene = "scene"
    webhook = "webhook"


class InvalidWorkerOptions(ValueError):
    """The options make no valid runtime (e.g. a batch asked of a one-at-a-time stage)."""


class StageStartError(RuntimeError):
    """A runtime failed to start because its stage's ``setup`` (loading the models)
    failed. The cause is chained; ``stage`` and ``settings`` say which models were asked
    for."""

    def __init__(self, stage: str, settings: Settings) -> None:
        super().__init__(f"the {stage} stage did not start")
        self.stage = stage
        self.settings = settings


#: RuntimeConfig fields that belong to one runtime: the scene stage that a seg worker
#: runs beside it does not inherit them (it takes one record at a time, a metrics port
#: serves one runtime, a group or instance id names one member).
_OWN_FIELDS = frozenset(
    {"max_batch", "max_wait_ms", "concurrency", "max_in_flight", "metrics_port", "group_id",
     "instance_id"}
)  # fmt: skip


def runtime_config(stage: Stage[Any], **overrides: Any) -> RuntimeConfig:
    """RuntimeConfig's defaults, under ``stage.runtime_defaults``, under the overrides
    given (None: not given)."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return RuntimeConfig(**{**stage.runtime_defaults, **given})
    except ValueError as exc:
        raise InvalidWorkerOptions(f"{stage.name} worker: {exc}") from exc


def make_stages(kind: WorkerKind | str, settings: Settings) -> list[Stage[Any]]:
    """The stages one worker process of ``kind`` runs (each its own runtime and group):
    one, but for the webhook dispatcher (asset-ready and dead-letter outcomes)."""
    if WorkerKind(kind) is WorkerKind.webhook:
        from webhook_worker import dispatcher_stages
        from webhook_worker.stage import require_secret

        try:
            require_secret(settings)  # said now, not as a failed stage start
        except ValueError as exc:
            raise InvalidWorkerOptions(str(exc)) from None
        return list(dispatcher_stages(settings))
    return [make_stage(kind, settings)]


def make_stage(kind: WorkerKind | str, settings: Settings) -> Stage[Any]:
    """The stage of ``kind``. Its models load when its runtime starts; the stage
    modules (and torch) are imported only here."""
    kind = WorkerKind(kind)
    if kind is WorkerKind.webhook:
        raise ValueError("the webhook dispatcher runs two stages: use make_stages")
    if kind is WorkerKind.gen:
        from gen_worker.handler import GenStage

        return GenStage(settings)
    if kind is WorkerKind.seg:
        from seg_worker.handler import SegStage

        return SegStage(settings)
    from scene_worker import SceneStage

    return SceneStage(settings)


def build_runtimes(
    kind: WorkerKind | str,
    settings: Settings,
    *,
    scenes: bool = True,
    forget_deleted: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
    **overrides: Any,
) -> list[StageRuntime]:
    """The runtimes of one worker process of ``kind``: its stage's, and for ``seg`` the
    scene stage's too unless ``scenes`` is False (each its own consumer group), and with
    ``forget_deleted`` (``genseg worker seg``) the listener that drops deleted requests'
    embeddings (:class:`seg_worker.handler.ForgetDeleted`, a group of its own per process).

    ``overrides`` are RuntimeConfig fields; None means not given. The scene stage
    beside a seg stage shares the process-wide ones (topics, timeouts, group timing),
    not the batching, the metrics port or the member ids (its instance id gets
    ``-scene`` appended).
    """
    kind = WorkerKind(kind)
    stages = make_stages(kind, settings)
    runtimes = [_runtime(stages[0], settings, overrides, tracer_provider)]
    for extra in stages[1:]:  # the dispatcher's second group: the first has the metrics port
        shared = {k: v for k, v in overrides.items() if k not in ("metrics_port", "group_id")}
        if instance_id := overrides.get("instance_id"):
            shared["instance_id"] = f"{instance_id}-{extra.name}"
        runtimes.append(_runtime(extra, settings, shared, tracer_provider))
    if kind is WorkerKind.seg and scenes:
        shared = {k: v for k, v in overrides.items() if k not in _OWN_FIELDS}
        if instance_id := overrides.get("instance_id"):
            shared["instance_id"] = f"{instance_id}-scene"
        scene = make_stage(WorkerKind.scene, settings)
        runtimes.append(_runtime(scene, settings, shared, tracer_provider))
    if kind is WorkerKind.seg and forget_deleted:
        from seg_worker.handler import ForgetDeleted, SegStage

        assert isinstance(stages[0], SegStage)
        shared = {k: v for k, v in overrides.items() if k not in _OWN_FIELDS}
        # A group per process (a broadcast): each member sees every deletion.
        shared["group_id"] = f"{settings.topic_prefix}.seg-forget.{_process_id()}"
        runtimes.append(_runtime(ForgetDeleted(stages[0]), settings, shared, tracer_provider))
    return runtimes


def _process_id() -> str:
    """This process, uniquely: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


def _runtime(
    stage: Stage[Any],
    settings: Settings,
    overrides: dict[str, Any],
    tracer_provider: trace.TracerProvider | None,
) -> StageRuntime:
    from consumers.runtime import StageRuntime

    config = runtime_config(stage, **overrides)
    try:
        return StageRuntime(stage, settings, config, tracer_provider=tracer_provider)
    except ValueError as exc:  # the runtime refuses a batch for a sequential stage
        raise InvalidWorkerOptions(f"{stage.name} worker: {exc}") from exc


@contextlib.asynccontextmanager
async def running(
    runtimes: Sequence[StageRuntime],
    *,
    while_starting: contextlib.AbstractContextManager[Any] | None = None,
) -> AsyncIterator[None]:
    """Start ``runtimes`` in order (inside ``while_starting``, e.g. a spinner), and stop
    those started however the block is left: one that fails to start must not leave
    the others running. A failure of a stage's ``setup`` (its models) is raised as a
    :class:`StageStartError`; any other (the broker's...) as it is.
    """
    started: list[StageRuntime] = []
    try:
        with while_starting or contextlib.nullcontext():
            for runtime in runtimes:
                try:
                    await runtime.start()
                except Exception as exc:
                    if _raised_in(exc, type(runtime.stage).setup):
                        raise StageStartError(runtime.stage.name, runtime.settings) from exc
                    raise
                started.append(runtime)
        yield
    finally:
        await asyncio.gather(*(runtime.stop() for runtime in reversed(started)))


def _raised_in(exc: BaseException, function: Callable[..., Any]) -> bool:
    """Whether ``exc`` was raised inside ``function`` (a frame of its code in its traceback)."""
    code = getattr(function, "__code__", None)
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code is code:
            return True
        frame = frame.tb_next
    return False


#: The cyclic garbage collector's young-generation threshold in a serving process
#: (CPython's default: 700 allocations net of frees).
SERVING_GC_THRESHOLD = 20_000


def settle_gc_for_serving() -> None:
    """Set this process's garbage collector up for serving, once its models are loaded.

    Everything alive now (modules, models, the runtimes) lives as long as the process:
    ``gc.freeze()`` moves it out of the collector's sight, so that no collection walks
    it again. And a stream worker's objects die young but in bursts (a fetch of
    hundreds of records, each with its event, job and outputs, all freed by reference
    counting once acknowledged): at CPython's threshold of 700 net allocations each
    burst set off young collections that walked every record in flight, about 7 us a
    record of a no-op stage (a third of its event-plane cost, docs/benchmarks.md).
    At :data:`SERVING_GC_THRESHOLD` a burst rarely sets one off; cyclic garbage
    (rare in these loops) waits that much longer for its collection.

    Process-wide, so only a process's entry point calls it (``genseg worker``,
    ``genseg up``, the benchmarks' worker processes); never a library class.
    """
    gc.collect()  # what loading left in cycles is garbage: frozen, it would never go
    gc.freeze()
    threshold, *older = gc.get_threshold()
    gc.set_threshold(max(threshold, SERVING_GC_THRESHOLD), *older)


async def serve(runtimes: Sequence[StageRuntime]) -> None:
    """Start ``runtimes``, run until SIGTERM or SIGINT, then stop them all (each drains
    its work in flight, commits and leaves its group)."""
    from consumers.runtime import until_signalled

    async with running(runtimes):
        settle_gc_for_serving()
        # Installed once started: a signal while the models load ends the process at once.
        await until_signalled()
