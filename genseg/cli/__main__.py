"""``python -m genseg.cli``: the ``genseg`` command."""

from genseg.cli import app

app()
