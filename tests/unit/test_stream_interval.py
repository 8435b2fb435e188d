"""Which requests the vLLM engine runs as streamed: those whose token events someone hears. A bulk line (no
reply channel) says nothing about streaming and still gets the unstreamed interval: the engine batches its
tokens instead of waking the worker for each few."""

from __future__ import annotations

from inferq.shared.schemas import GenerationRequest
from inferq.shared.settings import Settings
from inferq.worker.vllm_engine import VllmEngine


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(id="r1", model="tiny", prompt="hi", **fields)  # type: ignore[arg-type]


def test_only_a_request_with_a_channel_to_hear_it_is_run_streamed() -> None:
    engine = VllmEngine("unused", Settings(stream_interval=8))  # nothing is loaded until start()
    heard = request(reply_channel="inferq:t:abc")
    bulk_line = request(reply_stream="inferq:done:bj-1:{0}")
    assert heard.publishes and not bulk_line.publishes
    assert not request(reply_channel="inferq:t:abc", stream=False).publishes
    assert engine._stream_interval(heard) == 8
    assert engine._stream_interval(request(reply_channel="inferq:t:abc", stream_interval=2)) == 2
    assert engine._stream_interval(bulk_line) == engine._stream_interval(request(stream=False)) == 64
