"""genseg, the application: the command line, the demos, dead-letter replay and
contact sheets, on top of every other layer (see docs/design-notes.md).

The contract lives in ``schemas``, the plumbing (settings, blob store, telemetry,
Kafka clients) in ``plumbing``, publishing in ``producers``, the stage runtime in
``consumers``, and the stages in ``gen_worker``, ``seg_worker`` and ``scene_worker``.
"""

__version__ = "0.1.0"
