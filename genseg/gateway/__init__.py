"""The HTTP gateway and gallery (``genseg serve``): docs/gateway.md.

Application layer: it may use every layer below. Heavy parts (torch) are never imported.
"""

from genseg.gateway.server import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    Gateway,
    GatewayStartError,
    create_app,
    parse_listen,
    serve,
)
from genseg.gateway.state import DEFAULT_DB, GatewayConfig

__all__ = [
    "DEFAULT_DB",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "Gateway",
    "GatewayConfig",
    "GatewayStartError",
    "create_app",
    "parse_listen",
    "serve",
]
