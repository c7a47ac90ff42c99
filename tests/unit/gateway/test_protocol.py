"""Reading OpenAI usage and text, and mapping upstream errors to the client's status."""

import pytest

from gateway.protocol import read_usage, texts_of_choices, usage_from
from gateway.upstream import error_from_response
from metering.pricing import TokenUsage


def test_usage_with_details() -> None:
    usage = usage_from({"usage": {
        "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150,
        "prompt_tokens_details": {"cached_tokens": 40},
        "completion_tokens_details": {"reasoning_tokens": 30}}})
    assert usage is not None
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens,
            usage.reasoning_tokens) == (100, 40, 50, 30)


@pytest.mark.parametrize("doc", [None, [], {}, {"usage": None}, {"usage": "x"},
                                 {"usage": {"prompt_tokens": 0, "completion_tokens": 0}}])
def test_absent_or_empty_usage_is_none(doc: object) -> None:
    assert usage_from(doc) is None


@pytest.mark.parametrize(("usage", "named"), [
    ({"prompt_tokens": "7", "completion_tokens": 3}, "prompt_tokens"),
    ({"prompt_tokens": 7, "completion_tokens": True}, "completion_tokens"),
    ({"prompt_tokens": 10**17, "completion_tokens": 3}, "prompt_tokens"),
    ({"prompt_tokens": -1, "completion_tokens": 3}, "prompt_tokens"),
    ({"prompt_tokens": 7.5, "completion_tokens": 3}, "prompt_tokens"),
    ({"input_tokens": 7, "output_tokens": 1e300}, "output_tokens"),
    ({"prompt_tokens": 7, "completion_tokens": 3, "prompt_tokens_details": []}, "cached"),
    ({"prompt_tokens": 7, "completion_tokens": 3,
      "completion_tokens_details": {"reasoning_tokens": 2**70}}, "reasoning_tokens"),
])
def test_usage_that_cannot_be_trusted_is_refused_with_the_reason(
        usage: dict[str, object], named: str) -> None:
    reading = read_usage({"usage": usage})
    assert reading.usage is None and reading.problem is not None and named in reading.problem


def test_integral_floats_are_the_integers_they_are() -> None:
    reading = read_usage({"usage": {"prompt_tokens": 12.0, "completion_tokens": 4.0,
                                    "total_tokens": 16.0}})
    assert reading.usage == TokenUsage(input_tokens=12, output_tokens=4)


def test_a_total_alone_is_kept_for_splitting_by_counting() -> None:
    reading = read_usage({"usage": {"total_tokens": 42}})
    assert reading.usage is None and reading.problem is None and reading.total == 42


def test_texts_of_message_refusal_and_legacy_text() -> None:
    doc = {"choices": [{"message": {"content": "a", "refusal": "b"}}, {"text": "c"}, "junk"]}
    assert texts_of_choices(doc) == ["a", "b", "c"]


@pytest.mark.parametrize(("status", "expected"), [
    (400, 400), (404, 404), (422, 422), (429, 429), (401, 502), (403, 502), (500, 502),
    (503, 502), (504, 504), (418, 502)])
def test_upstream_status_maps_to_a_fitting_client_status(status: int, expected: int) -> None:
    err = error_from_response("cloud", status, b'{"error": {"message": "nope"}}', {}, "req_1")
    assert err.status == expected
    assert "cloud" in err.detail and f"HTTP {status}" in err.detail and "req_1" in err.detail
    assert "nope" not in err.detail  # the upstream's words are the operator's


@pytest.mark.parametrize("body", [
    b'{"error": {"message": "Incorrect API key provided: sk-proj-abc123XYZ789"}}',
    b'{"error": "upstream http://10.0.0.7:8000/v1/chat timed out"}',
    b"<html>" + b"x" * 1000 + b"</html>",
])
def test_what_an_upstream_says_in_an_error_never_reaches_the_tenant(body: bytes) -> None:
    err = error_from_response("local", 401, body, {}, "req_2")
    assert "sk-proj" not in err.detail and "10.0.0.7" not in err.detail
    assert "html" not in err.detail and len(err.detail) < 200


@pytest.mark.parametrize(("usage", "expected", "count_output"), [
    ({"prompt_tokens": 10, "total_tokens": 60}, (10, 50), False),
    ({"completion_tokens": 30, "total_tokens": 40}, (10, 30), False),
    ({"prompt_tokens": 10}, (10, 0), True),  # the output is counted
])
def test_a_side_missing_is_derived_from_the_total_or_counted(
        usage: dict[str, object], expected: tuple[int, int], count_output: bool) -> None:
    reading = read_usage({"usage": usage})
    assert reading.usage is not None and reading.count_output is count_output
    assert (reading.usage.input_tokens, reading.usage.output_tokens) == expected


def test_output_alone_without_a_total_is_counted_whole() -> None:
    reading = read_usage({"usage": {"completion_tokens": 30}})
    assert reading.usage is None and "prompt_tokens" in (reading.problem or "")


def test_cached_above_the_prompt_is_capped_with_a_note() -> None:
    reading = read_usage({"usage": {"prompt_tokens": 10, "completion_tokens": 2,
                                    "prompt_tokens_details": {"cached_tokens": 50}}})
    assert reading.usage is not None and reading.usage.cached_input_tokens == 10
    assert reading.note is not None and "cached_tokens" in reading.note
