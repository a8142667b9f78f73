"""The fetch wait that lengthens while a consumer reads nothing (plumbing.fetch_wait),
checked on the fetch requests a real consumer sends to the embedded broker."""

from __future__ import annotations

import time

from aiokafka import AIOKafkaConsumer
from aiokafka.protocol.fetch import FetchRequest

from plumbing.fetch_wait import FetchWait
from plumbing.kafka import ensure_topics, make_consumer, make_producer
from plumbing.settings import Settings


def record_fetch_waits(consumer: AIOKafkaConsumer) -> list[tuple[float, int]]:
    """(monotonic time, wait in ms) of each fetch request ``consumer`` sends from now on,
    as handed to aiokafka's connection layer."""
    sent: list[tuple[float, int]] = []
    client = consumer._client
    send = client.send

    async def recording(node_id: int, request: object, *args: object, **kwargs: object) -> object:
        if isinstance(request, FetchRequest):
            sent.append((time.monotonic(), request._max_wait_ms))
        return await send(node_id, request, *args, **kwargs)

    client.send = recording  # type: ignore[method-assign]
    return sent


async def test_an_idle_consumer_fetches_with_the_long_wait_until_a_record_comes(
    settings: Settings,
) -> None:
    settings = settings.model_copy(
        update={
            "kafka_fetch_max_wait_ms": 25,
            "kafka_fetch_idle_wait_ms": 200,
            "kafka_fetch_idle_after_ms": 300,
        }
    )
    await ensure_topics(settings, partitions=1)
    topic = settings.topics.assets
    consumer = make_consumer(settings, topic, auto_offset_reset="latest", enable_auto_commit=False)
    await consumer.start()
    try:
        wait = FetchWait.from_settings(consumer, settings)
        sent = record_fetch_waits(consumer)
        started = time.monotonic()
        assert await wait.getmany(timeout_ms=1500) == {}
        assert wait.idle and wait.wait_ms == 200
        # Before idle_after nothing may lengthen; well after it, every fetch waits long.
        early = [ms for t, ms in sent if t - started < 0.2]
        late = [ms for t, ms in sent if t - started > 0.7]
        assert early and set(early) == {25}, sent
        assert late and set(late) == {200}, sent
        assert len(late) <= 6, f"{len(late)} fetches in 0.8 s at a 200 ms wait"

        producer = make_producer(settings)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b"x")
        finally:
            await producer.stop()
        batches = await wait.getmany(timeout_ms=5000)
        assert sum(len(records) for records in batches.values()) == 1
        assert not wait.idle
        before = len(sent)
        assert await wait.getmany(timeout_ms=150) == {}  # quiet, but not yet for 300 ms
        assert sent[before:] and {ms for _, ms in sent[before:]} == {25}, sent[before:]
    finally:
        await consumer.stop()


async def test_an_idle_wait_at_or_under_the_short_one_never_lengthens_it(
    settings: Settings,
) -> None:
    now = [0.0]
    consumer = make_consumer(settings)  # not started: its wait is only noted
    wait = FetchWait(consumer, busy_ms=25, idle_ms=10, idle_after_ms=100, clock=lambda: now[0])
    now[0] = 5.0
    wait.observe(0)
    assert not wait.idle and wait.wait_ms == 25

    lengthening = FetchWait(
        consumer, busy_ms=25, idle_ms=200, idle_after_ms=100, clock=lambda: now[0]
    )
    now[0] += 0.05
    lengthening.observe(0)
    assert lengthening.wait_ms == 25  # 50 ms of nothing: not yet
    now[0] += 0.06
    lengthening.observe(0)
    assert lengthening.wait_ms == 200
    lengthening.observe(3)
    assert lengthening.wait_ms == 25
