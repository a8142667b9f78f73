"""A diagnostic: the generator in a process of its own, fed over a pipe.

The structural remedy that docs/benchmarks.md named for the gen worker's overhead on a
2-core machine ("Where the gen worker's extra time goes"): if the runtime's event loop
shares the GIL with the generating thread, a worker whose model runs in another
process never makes that thread wait for it. :class:`ModelProcess` is the smallest
version of that design that ``bench/gen.py --model-process`` can measure against the
worker as it is: a child forked before torch has computed anything (libgomp's thread
team does not survive a fork) builds its own generator of the same profile, and
:class:`ProcessGenerator` is a :class:`~gen_worker.generate.Generator` whose
``generate`` sends the batch to the child and waits, passing the child's step
callbacks on to the caller's ``on_step``.

It is not a product feature: the generator's phases (``phase``) are not timed in the
child, an exception from the child loses its traceback, and a child that dies leaves
``generate`` failing with :class:`EOFError`. The measurement it served is in
docs/benchmarks.md ("The model in a process of its own").
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
from collections.abc import Sequence
from typing import Any

from gen_worker.generate import BatchSpec, Generator, Sample, SampleResult, StepCallback
from gen_worker.profiles import GenModels
from plumbing.settings import Settings


def _serve(conn: multiprocessing.connection.Connection, settings: Settings) -> None:
    """The child: build the generator, then answer ``(spec, samples, low_memory)``
    requests with ``("step", done, total)`` messages and one ``("done", results)`` or
    ``("error", exception)``; None ends it."""
    generator = Generator(GenModels.from_settings(settings))
    conn.send("ready")
    while (request := conn.recv()) is not None:
        spec, samples, low_memory = request
        try:
            results = generator.generate(
                spec,
                samples,
                on_step=lambda done, total: conn.send(("step", done, total)),
                low_memory=low_memory,
            )
        except Exception as exc:
            conn.send(("error", exc))
        else:
            conn.send(("done", results))


class ModelProcess:
    """A forked child holding the generator of ``settings.models`` on ``settings.device``.

    Start it before this process runs any torch operation, and before it starts threads
    other than the main one. ``pid`` is the child's (for CPU accounting).
    """

    def __init__(self, settings: Settings, start_timeout_s: float = 600.0) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(child, settings), daemon=True)
        self._process.start()
        child.close()
        if not self._conn.poll(start_timeout_s) or self._conn.recv() != "ready":
            self.close()
            raise TimeoutError(f"the model process did not start in {start_timeout_s} s")

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        on_step: StepCallback | None = None,
        low_memory: bool = False,
    ) -> list[SampleResult]:
        """One batch in the child; blocks (without the GIL) until its results arrive."""
        self._conn.send((spec, list(samples), low_memory))
        while True:
            kind, *payload = self._conn.recv()
            if kind == "step":
                if on_step is not None:
                    on_step(*payload)
            elif kind == "done":
                return payload[0]
            else:
                raise payload[0]

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(None)
            self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


class ProcessGenerator(Generator):
    """``generator``'s models and settings for the stage (sizes, revisions, adapters),
    its generation done by ``process``."""

    def __init__(self, generator: Generator, process: ModelProcess) -> None:
        super().__init__(generator.models, batch_invariant=generator.batch_invariant)
        self.process = process

    def generate(
        self,
        spec: BatchSpec,
        samples: Sequence[Sample],
        *,
        on_step: StepCallback | None = None,
        phase: Any = None,
        low_memory: bool = False,
    ) -> list[SampleResult]:
        return self.process.generate(spec, samples, on_step=on_step, low_memory=low_memory)


__all__ = ["ModelProcess", "ProcessGenerator"]
