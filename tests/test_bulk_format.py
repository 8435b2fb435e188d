"""Bulk job lines: both input formats parsed to request parameters, bad lines explained, and output records
in the simple shape and in the shape of `vllm run-batch` / the OpenAI Batch API."""

from __future__ import annotations

import json

import pytest

from inferq.producer.bulk.formats import (
    OPENAI,
    SIMPLE,
    BulkLine,
    LineError,
    error_record,
    file_kind,
    make_tag,
    output_record,
    parse_line,
    read_tag,
)


def chat_line(custom_id: str = "a", **body: object) -> str:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body})


def test_simple_lines_take_the_line_number_without_a_custom_id() -> None:
    line = parse_line(3, '{"prompt": "Hello", "max_tokens": 5, "temperature": 0}', "smollm2")
    assert line == BulkLine(3, "line-3", SIMPLE, "text", {"prompt": "Hello", "max_tokens": 5, "temperature": 0,
                                                          "model": "smollm2"})  # fmt: skip
    chat = parse_line(4, '{"custom_id": "x", "messages": [{"role": "user", "content": "Hi"}]}', "tiny")
    assert isinstance(chat, BulkLine) and (chat.custom_id, chat.endpoint) == ("x", "chat")


def test_openai_chat_and_completion_lines() -> None:
    line = parse_line(1, chat_line(stop="END", max_completion_tokens=4, seed=1), "smollm2")
    assert isinstance(line, BulkLine) and (line.kind, line.endpoint) == (OPENAI, "chat")
    assert line.params == {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stop": ["END"],
                           "seed": 1, "model": "tiny"}  # fmt: skip
    parts = chat_line(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert parse_line(2, parts, "m").params["messages"] == [{"role": "user", "content": "ab"}]  # type: ignore[union-attr]
    text = json.dumps({"custom_id": "t", "method": "POST", "url": "/v1/completions", "body": {"prompt": "Once"}})
    completion = parse_line(5, text, "tiny")
    assert isinstance(completion, BulkLine) and completion.params == {"prompt": "Once", "model": "tiny"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", "line 7 is not JSON"),
        ("[1, 2]", "is a JSON list, not an object"),
        ('{"prompt": "x", "colour": "red"}', "unknown field(s) colour"),
        ('{"custom_id": "", "prompt": "x"}', "custom_id must be a non-empty string"),
        (json.dumps({"custom_id": "e", "url": "/v1/embeddings", "body": {}}), "url '/v1/embeddings' is not supported"),
        (chat_line(n=3), "body.n=3 is not supported"),
        (chat_line(stream=True), "body.stream=True is not supported"),
        (chat_line(messages="hi"), "body.messages must be a list"),
        (
            json.dumps({"custom_id": "p", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}}),
            "one prompt per line",
        ),
    ],
)
def test_bad_lines_say_what_is_wrong(text: str, message: str) -> None:
    error = parse_line(7, text, "tiny")
    assert isinstance(error, LineError) and message in error.message and "line 7" in error.message


def test_output_records_in_both_shapes() -> None:
    done = {"id": "r1", "status": "done", "text": "Paris.", "finish_reason": "stop", "prompt_tokens": 9,
            "completion_tokens": 3, "finished_at": "1795000000.5"}  # fmt: skip
    simple = parse_line(1, '{"custom_id": "q1", "prompt": "Capital?"}', "tiny")
    assert output_record(simple, "tiny", done) == {  # type: ignore[arg-type]
        "custom_id": "q1", "text": "Paris.", "finish_reason": "stop",
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}, "error": None,
    }  # fmt: skip
    chat = output_record(parse_line(1, chat_line("c1"), "tiny"), "tiny", done)  # type: ignore[arg-type]
    assert (chat["custom_id"], chat["error"], chat["response"]["status_code"]) == ("c1", None, 200)
    body = chat["response"]["body"]
    assert (body["object"], body["model"], body["created"]) == ("chat.completion", "tiny", 1795000000)
    assert body["choices"] == [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                "message": {"role": "assistant", "content": "Paris."}}]  # fmt: skip
    failed = output_record(
        parse_line(1, chat_line("c2"), "tiny"), "tiny", {"id": "r2", "status": "failed", "error": "too long"}
    )  # type: ignore[arg-type]
    assert failed["response"]["body"] is None and failed["error"] == {"code": "failed", "message": "too long"}
    bad = error_record(parse_line(4, chat_line("c3", n=2), "tiny"))  # type: ignore[arg-type]
    assert bad["custom_id"] == "c3" and bad["response"]["status_code"] == 400
    assert "body.n=2" in bad["error"]["message"]


def test_lines_that_are_not_json_take_the_files_format() -> None:
    batch = [(1, "{broken"), (2, json.dumps({"custom_id": "a", "url": "/v1/completions", "body": {}}))]
    assert file_kind(batch) == OPENAI
    assert file_kind([(1, "{broken"), (2, '{"prompt": "x"}')]) == SIMPLE
    assert file_kind([(1, "nothing"), (2, "[]")]) == SIMPLE
    error = parse_line(1, "{broken", "m", OPENAI)
    assert isinstance(error, LineError) and error.kind == OPENAI
    assert set(error_record(error)) == {"id", "custom_id", "response", "error"}


def test_a_tag_leaves_out_the_jobs_format_and_model_and_reads_back_whole() -> None:
    """Every byte of a tag is held in Redis for each queued line: a line of the job's format and model says
    neither. A line of another model (or a tag written before this form) says all five."""
    job = (OPENAI, "meta-llama/Llama-3.1-8B-Instruct")
    short = make_tag(7, OPENAI, "chat", job[1], "req-7", job)
    assert short == '[7,"chat","req-7"]'
    assert read_tag(short, job) == (7, OPENAI, "chat", job[1], "req-7")
    other = make_tag(8, OPENAI, "text", "tiny", "req-8", job)
    assert json.loads(other) == [8, OPENAI, "text", "tiny", "req-8"]
    assert read_tag(other, job) == (8, OPENAI, "text", "tiny", "req-8")
    assert read_tag('[9, "simple", "text", "tiny", "x"]', job) == (9, SIMPLE, "text", "tiny", "x")  # an older tag
