"""What the producer and the worker agree on: settings, schemas, codec, key names, connection, errors.

Nothing here imports vLLM, torch, the producer or the worker: a client that only enqueues work must stay light.
"""
