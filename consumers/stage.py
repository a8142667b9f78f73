"""What a worker is: a :class:`Stage`, a typed handler from input events to output events.

The stage runtime (:mod:`consumers.runtime`) owns everything about Kafka: commits,
retries, batching, tracing, metrics. A stage only parses a record value and maps
a batch of events to their outputs, in a worker thread, off the event loop.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Literal, Protocol, TypeVar

from plumbing.errors import PermanentError, StageError, TransientError
from schemas import Event, Topics

if TYPE_CHECKING:
    from plumbing.blobstore import BlobStore
    from plumbing.settings import Settings

In = TypeVar("In", bound=Event)

# Handlers raise these; they live with the rest of the taxonomy in plumbing.errors.
__all__ = [
    "ItemResult",
    "Output",
    "PermanentError",
    "Phase",
    "Stage",
    "StageContext",
    "StageError",
    "TopicLog",
    "TransientError",
]


@dataclass
class Output:
    """One record to publish: ``event`` to the full topic name ``topic``, keyed by its id.

    ``terminal``: the record's terminal outcome (an asset-ready event). The runtime
    sends it only after the broker acknowledged the record's other outputs, so one
    image never ends in both an asset-ready event and a dead letter.
    """

    topic: str
    event: Event
    key: str | None = None
    terminal: bool = False

    @property
    def record_key(self) -> str:
        return self.key if self.key is not None else str(getattr(self.event, "id", ""))


#: What a handler returns for each input event: its outputs, or the error it met.
ItemResult = list[Output] | BaseException


@dataclass
class Phase:
    """A timed phase of handler work, replayed as a span under each record it served."""

    name: str
    start_ns: int
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    item: int | None = None  # None: served every item of the batch
    parent: int | None = None  # index of the enclosing phase in StageContext.phases


class TopicLog(Protocol):
    """Read access to a topic, for a stage that must know what it already published.

    Provided by the runtime (``StageContext.topic_log``); blocking, called from the
    handler's thread. Raises :class:`TransientError` when the broker cannot answer.
    """

    def end_offsets(self, topic: str) -> dict[int, int]:
        """Partition -> offset of the next record to be written to ``topic``."""
        ...

    def find(self, topic: str, key: str, since: Mapping[int, int]) -> tuple[int, int] | None:
        """(partition, offset) of the first record keyed ``key`` at or after ``since``
        (partitions missing from ``since`` are read from their start), or None."""
        ...


_STACK_LOCK = threading.Lock()


class StageContext:
    """Services a handler may use while it works on one batch (in a worker thread).

    - ``blob``: the blob store for inputs and outputs;
    - ``emit(output, item=i)``: publish a side record now (progress), fire-and-forget;
    - ``phase(name, item=None)``: time a phase; it becomes a span under the record(s)
      it served and an entry of :meth:`timings_ms`;
    - ``topic_log``: read what is on a topic (:class:`TopicLog`), when the runtime
      provides it.
    """

    def __init__(
        self,
        *,
        blob: BlobStore,
        topics: Topics,
        settings: Settings | None = None,
        emit: Callable[[Output, int | None], None] | None = None,
        attempt: int = 1,
        topic_log: TopicLog | None = None,
    ) -> None:
        self.blob = blob
        self.topics = topics
        self.settings = settings
        self.attempt = attempt
        self.topic_log = topic_log
        self.phases: list[Phase] = []
        self._emit = emit
        self._stack: threading.local | None = None  # made on the first phase: it is costly

    def emit(self, output: Output, item: int | None = None) -> None:
        """Publish ``output`` without waiting (for progress events)."""
        if self._emit is not None:
            self._emit(output, item)

    @contextmanager
    def phase(self, name: str, item: int | None = None, **attributes: Any) -> Iterator[Phase]:
        """Time the enclosed work as phase ``name`` (for record ``item``, or all)."""
        if self._stack is None:
            with _STACK_LOCK:  # phases may be opened from several threads of one handler
                if self._stack is None:
                    self._stack = threading.local()
        stack: list[int] = self._stack.__dict__.setdefault("open", [])
        record = Phase(
            name=name,
            start_ns=time.time_ns(),
            attributes=dict(attributes),
            item=item,
            parent=stack[-1] if stack else None,
        )
        self.phases.append(record)
        stack.append(len(self.phases) - 1)
        try:
            yield record
        finally:
            stack.pop()
            record.end_ns = time.time_ns()

    def timings_ms(self, item: int) -> dict[str, float]:
        """Milliseconds per top-level phase that served ``item`` (summed by name)."""
        out: dict[str, float] = {}
        for p in self.phases:
            if p.parent is None and p.end_ns and p.item in (None, item):
                out[p.name] = out.get(p.name, 0.0) + (p.end_ns - p.start_ns) / 1e6
        return {k: round(v, 3) for k, v in out.items()}


class Stage(ABC, Generic[In]):
    """A worker's logic. Subclasses set ``name`` and ``input_topic`` and implement
    :meth:`parse` and :meth:`handle`."""

    #: Stage name: the ``stage`` of dead-letter events, a metrics label, the group suffix.
    name: str = "stage"
    #: Short name of the topic consumed (see :class:`schemas.Topics`).
    input_topic: str = "prompts"
    #: One record at a time: batches of one, one handler call at a time, and a record's
    #: outputs acknowledged before the next record's handler starts. The runtime
    #: enforces it (a configuration that asks for more is refused).
    sequential: ClassVar[bool] = False
    #: Short name of the topic this stage's dead letters go to. The contract's ``dlq``
    #: holds the terminal event of a failed request; a stage whose failures do not end a
    #: request (the webhook dispatcher's given-up deliveries) sends them elsewhere.
    dead_letter_topic: ClassVar[str] = "dlq"
    #: Each input event is one image of its request (it has ``image_index``): a record
    #: that fails to parse is dead-lettered with the ``image_index`` of its JSON, so that
    #: only that image ends, not every image of the request.
    per_image: ClassVar[bool] = False
    #: This stage's own defaults for :class:`consumers.config.RuntimeConfig` fields
    #: (e.g. a batch size its models like), under any explicit setting.
    runtime_defaults: ClassVar[dict[str, Any]] = {}
    #: What the runtime does with a record whose request was deleted (it has a tombstone,
    #: :mod:`plumbing.erasure`) when its handler returns: it erases the request's blobs
    #: (what the handler wrote among them) and then ``"dead_letter"``s the record (error
    #: type ``deleted``: the request's terminal outcome) or ``"drop"``s its outputs (its
    #: request ended before); None: no check (a stage that writes no blob of a request).
    on_deleted: ClassVar[Literal["dead_letter", "drop"] | None] = None

    def setup(self) -> None:
        """Load models; called once in the worker thread before consuming."""

    @abstractmethod
    def parse(self, raw: bytes) -> In:
        """Decode one record value; raise :class:`schemas.InvalidEvent` on bad input."""

    def batch_key(self, event: In) -> Hashable | None:
        """Events with equal non-None keys may share a batch; None: always alone."""
        return None

    @abstractmethod
    def handle(self, events: list[In], ctx: StageContext) -> list[ItemResult]:
        """Map a batch to one result per event, in order. Runs in a worker thread.

        Raise (or return) :class:`PermanentError` for failures retrying cannot fix;
        any other exception is retried with backoff, then dead-lettered.
        """

    def request_id(self, event: In) -> str | None:
        return getattr(event, "id", None)

    def forget_request(self, request_id: str) -> None:
        """Drop what this stage holds in memory of ``request_id``: it was deleted.

        Called from a worker thread (by the runtime's tombstone check, and by the
        broadcast of deletion events, see :mod:`consumers.tombstones`)."""

    def image_index(self, event: In) -> int | None:
        """The image a failure of this event covers (None: the whole request)."""
        return getattr(event, "image_index", None)
