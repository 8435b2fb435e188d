"""The client library: submit requests to the queue, stream tokens back, read stored results.

Importing this never loads an engine: a service that enqueues work needs only Redis.
"""

from inferq.producer.client import InferenceClient, RequestHandle
from inferq.producer.sync import SyncInferenceClient

__all__ = ["InferenceClient", "RequestHandle", "SyncInferenceClient"]
