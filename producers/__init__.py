"""Publishing: the event publisher and the upstream client API."""

from producers.client import DEFAULT_VIEWS, GensegClient, new_request_id, submit
from producers.publisher import Publisher

__all__ = ["DEFAULT_VIEWS", "GensegClient", "Publisher", "new_request_id", "submit"]
