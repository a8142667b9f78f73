"""The ``genseg`` command line, assembled from its parts.

- :mod:`genseg.cli.common`: consoles, options, logging, settings, reaching the broker;
- :mod:`genseg.cli.errors`: expected failures said in one or two lines (``--debug``
  for the traceback);
- :mod:`genseg.cli.processes`: commands that run something here (demo, broker, worker,
  train-toy);
- :mod:`genseg.cli.blobs`: the data's lifecycle (``blobs gc``, ``blobs lifecycle``,
  ``delete``);
- :mod:`genseg.cli.client`: commands that talk to a running broker (submit, tail,
  topics, dlq) and ``schema``;
- :mod:`genseg.cli.stack`: the HTTP gateway (``serve``) and a whole local stack (``up``).

Heavy modules (torch, diffusers, segment-anything) are imported only inside the
commands that need them, so ``genseg submit`` starts in well under a second.
"""

from __future__ import annotations

import typer

from genseg.cli import blobs, client, processes, stack
from genseg.cli.common import global_options
from genseg.cli.errors import ExplainingGroup

app = typer.Typer(
    name="genseg",
    cls=ExplainingGroup,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)
app.callback()(global_options)
app.command()(processes.demo)
app.command("train-toy")(processes.train_toy)
app.command()(processes.broker)
app.command()(processes.worker)
app.command()(stack.serve)
app.command()(stack.up)
app.command()(client.submit)
app.command()(client.tail)

topics_app = typer.Typer(help="Manage the contract's topics.", no_args_is_help=True)
topics_app.command("create")(client.topics_create)
app.add_typer(topics_app, name="topics")

dlq_app = typer.Typer(help="Inspect and replay the dead-letter topic.", no_args_is_help=True)
dlq_app.command("replay")(client.dlq_replay)
app.add_typer(dlq_app, name="dlq")

app.command()(client.schema)

blobs_app = typer.Typer(help="Retention of the blob store.", no_args_is_help=True)
blobs_app.command("gc")(blobs.gc)
blobs_app.command("lifecycle")(blobs.lifecycle)
app.add_typer(blobs_app, name="blobs")
app.command()(blobs.delete)

__all__ = ["app"]
