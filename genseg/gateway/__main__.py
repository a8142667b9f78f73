"""``python -m genseg.gateway [--listen HOST:PORT] [--db PATH]``: one gateway in the
foreground, configured from the environment like every genseg process (``genseg serve``
is the same from the CLI)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from genseg.gateway.server import DEFAULT_HOST, DEFAULT_PORT, GatewayStartError, parse_listen, serve
from genseg.gateway.state import DEFAULT_DB, GatewayConfig
from plumbing.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m genseg.gateway", description=__doc__)
    parser.add_argument("--listen", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", help="HOST:PORT")
    parser.add_argument("--db", type=Path, default=DEFAULT_DB, help="the view's SQLite file")
    args = parser.parse_args(argv)
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    config = GatewayConfig(db_path=args.db)

    def ready(gateway: object) -> None:
        # One line on stdout that a supervising process (or a test) can wait for.
        print(f"genseg gateway listening on {gateway.url}", flush=True)  # type: ignore[attr-defined]

    try:
        asyncio.run(serve(Settings(), host, port, config=config, on_ready=ready))
    except GatewayStartError as exc:
        logging.getLogger("genseg.gateway").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
