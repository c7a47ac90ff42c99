"""Reading OpenAI usage and text, and mapping upstream errors to the client's status."""

import pytest

from gateway.protocol import texts_of_choices, usage_from
from gateway.upstream import error_from_response


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


def test_garbage_numbers_count_as_zero_not_crash() -> None:
    usage = usage_from({"usage": {"prompt_tokens": "7", "completion_tokens": True,
                                  "total_tokens": 3, "prompt_tokens_details": []}})
    assert usage is not None and usage.input_tokens == 0 and usage.output_tokens == 0


def test_texts_of_message_refusal_and_legacy_text() -> None:
    doc = {"choices": [{"message": {"content": "a", "refusal": "b"}}, {"text": "c"}, "junk"]}
    assert texts_of_choices(doc) == ["a", "b", "c"]


@pytest.mark.parametrize(("status", "expected"), [
    (400, 400), (404, 404), (422, 422), (429, 429), (401, 502), (403, 502), (500, 502),
    (503, 502), (504, 504), (418, 502)])
def test_upstream_status_maps_to_a_fitting_client_status(status: int, expected: int) -> None:
    err = error_from_response("cloud", status, b'{"error": {"message": "nope"}}', {})
    assert err.status == expected
    assert "cloud" in err.detail and "nope" in err.detail


def test_non_json_upstream_error_body_is_quoted_briefly() -> None:
    err = error_from_response("local", 500, b"<html>" + b"x" * 1000, {})
    assert "local" in err.detail and len(err.detail) < 400
