"""The webhook dispatcher: each image's terminal outcome POSTed to its ``callback_url``.

- :mod:`webhook_worker.targets`: which destinations may be called (the SSRF rules);
- :mod:`webhook_worker.signing`: ``X-Genseg-Signature`` and ``X-Genseg-Delivery``, and
  :func:`~webhook_worker.signing.verify` for receivers;
- :mod:`webhook_worker.delivery`: one bounded POST to a checked address, classified;
- :mod:`webhook_worker.stage`: the stage, and :func:`dispatcher_stages`, the two stages
  one dispatcher process runs (``genseg worker webhook``).

See docs/webhooks.md.
"""

from webhook_worker.stage import WEBHOOK_RUNTIME_DEFAULTS, WebhookStage, dispatcher_stages

__all__ = ["WEBHOOK_RUNTIME_DEFAULTS", "WebhookStage", "dispatcher_stages"]
