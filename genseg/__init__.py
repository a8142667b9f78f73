"""genseg: prompt events in, images, masks and transparent assets out.

This package holds the plumbing every part uses (settings, blob store, telemetry,
the embedded broker launcher) and the command line. The contract lives in
``schemas``, publishing in ``producers``, the stage runtime in ``consumers``, and
the model stages in ``gen_worker`` and ``seg_worker``.
"""

__version__ = "0.1.0"
