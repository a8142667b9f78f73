"""The webhook dispatcher: each image's terminal outcome POSTed to its ``callback_url``.

- :mod:`webhook_worker.targets`: which destinations may be called (the SSRF rules).
"""
