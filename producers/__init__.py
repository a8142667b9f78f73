"""Publishing: the event publisher and the upstream client API."""
