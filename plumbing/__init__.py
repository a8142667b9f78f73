"""The plumbing every layer above uses: settings, errors, blob store, images,
telemetry, Kafka client construction and the embedded broker launcher.

Imports nothing of genseg's but :mod:`schemas` (the layer below it).
"""
