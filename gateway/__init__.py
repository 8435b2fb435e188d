"""The HTTP front door: an OpenAI-compatible aiohttp server over the queue (`inferq gateway`).

It is a client like any other: it enqueues through the producer library and never loads an engine, and it
keeps no state of its own, so several can run behind a load balancer. It is where callers are
authenticated (API keys, each mapped to a tenant: `callers.py`); it sets tenant, request id and reply
routing itself and takes none of them from a request body.

Modules: `callers.py` (API keys), `openai_api.py` (OpenAI request bodies in, response bodies out),
`errors.py` (every error as OpenAI's error body, with the status a client library acts on), `models.py`
(which models have live workers), `app.py` (the routes), `server.py` (running it).
"""
