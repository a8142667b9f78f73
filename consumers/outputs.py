"""Publishing a record's outputs, with its trace context, in the order the contract needs.

Outputs are enqueued on the producer in order; a future per record resolves when the
broker acknowledges it. An output marked ``terminal`` (an image's asset-ready event)
is sent only once the record's other outputs are acknowledged (see :meth:`settle`),
so a refused mask-ready record can never leave an image with both an asset-ready
event and, after the retries, a dead letter.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from consumers.batching import Job
from consumers.stage import ItemResult, Output
from consumers.tracing import RecordTracing
from producers.publisher import Publisher

log = logging.getLogger(__name__)

Futures = list[asyncio.Future[Any]]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a future's exception as seen (its record already failed on an earlier one)."""
    if not future.cancelled():
        future.exception()


async def _acknowledged(futures: Futures) -> None:
    """Wait for every ack in order; on the first failure, let the rest go unwatched."""
    for number, future in enumerate(futures):
        try:
            await future
        except BaseException:
            for rest in futures[number + 1 :]:
                rest.add_done_callback(_retrieve)
            raise


class OutputSender:
    """Sends records' outputs through ``publisher`` with their trace headers."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def send(self, job: Job, outputs: list[Output]) -> Futures:
        """Enqueue ``outputs`` with the record's trace context; futures resolve on ack."""
        headers = job.headers if job.headers is not None else RecordTracing.output_headers(job)
        send = self.publisher.producer.send  # Publisher.send, one coroutine less per record
        futures = []
        for out in outputs:  # a loop, not an async comprehension (a coroutine of its own)
            futures.append(
                await send(
                    out.topic,
                    value=out.event.to_json_bytes(),
                    key=out.record_key.encode("utf-8"),
                    headers=headers,
                )
            )
        return futures

    async def publish(self, job: Job, outputs: list[Output]) -> None:
        """Send ``outputs`` and wait until the broker acknowledged them all."""
        await asyncio.gather(*await self.send(job, outputs))

    async def settle(
        self,
        jobs: list[Job],
        results: list[ItemResult],
        failed: Callable[[Job, BaseException], Awaitable[None]],
    ) -> list[Job]:
        """Publish a finished batch's outputs; return the jobs whose outputs were all
        acknowledged. Failures (the handler's, or the broker refusing a record) go to
        ``failed``. Two rounds: every record's other outputs, then its terminal ones."""
        first: list[tuple[Job, Futures, list[Output]]] = []
        send = self.publisher.producer.send
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                await failed(job, result)
                continue
            now = [out for out in result if not out.terminal]
            last = [out for out in result if out.terminal] if len(now) < len(result) else []
            headers = job.headers if job.headers is not None else RecordTracing.output_headers(job)
            futures: Futures = []
            try:
                for out in now:  # what send() does, without a coroutine per record
                    futures.append(
                        await send(
                            out.topic,
                            value=out.event.to_json_bytes(),
                            key=out.record_key.encode("utf-8"),
                            headers=headers,
                        )
                    )
            except Exception as exc:  # broker trouble: retried, outputs overwrite
                for future in futures:
                    future.add_done_callback(_retrieve)
                await failed(job, exc)
                continue
            first.append((job, futures, last))
        done: list[Job] = []
        second: list[tuple[Job, Futures]] = []
        for job, futures, last in first:
            try:
                if len(futures) == 1 and futures[0].done():  # the usual case: no coroutine
                    futures[0].result()
                else:
                    await _acknowledged(futures)
                if last:
                    second.append((job, await self.send(job, last)))
                else:
                    done.append(job)
            except Exception as exc:
                await failed(job, exc)
        for job, futures in second:
            try:
                await _acknowledged(futures)
            except Exception as exc:
                await failed(job, exc)
                continue
            done.append(job)
        return done

    def side_record(self, job: Job, output: Output) -> Awaitable[None]:
        """Send a side record (progress) for ``job``, best effort: failures are logged."""

        async def send() -> None:
            try:
                future = await self.publisher.send(
                    output.topic,
                    output.event.to_json_bytes(),
                    key=output.record_key,
                    headers=RecordTracing.output_headers(job),
                )
                await future
            except Exception as exc:  # progress is best effort
                log.debug("side record to %s not sent: %s", output.topic, exc)

        return send()
