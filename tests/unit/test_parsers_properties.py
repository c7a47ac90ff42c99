"""Any JSON in, a clear error or a bounded value out, never another exception: the parsers of
what crosses into Meterlane (an upstream's usage and stream, a client's body, Anthropic's
messages, Stripe's numbers), driven by Hypothesis."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import DomainError
from gateway import anthropic
from gateway.protocol import MAX_TOKENS_PER_CALL, joined_texts, read_usage, texts_of_choices
from gateway.wire import choices_of, requested_output
from metering.service import ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**80), 2**80),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
JSON = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)),
    max_leaves=20)
NAMES = st.sampled_from(["prompt_tokens", "completion_tokens", "total_tokens", "input_tokens",
                         "output_tokens", "prompt_tokens_details",
                         "completion_tokens_details", "cached_tokens", "reasoning_tokens"])
# usage-shaped documents: the names an upstream uses, with any values at all
USAGE = st.recursive(SCALARS, lambda inner: st.dictionaries(NAMES, inner, max_size=6),
                     max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(doc=st.one_of(JSON, st.fixed_dictionaries({"usage": USAGE})))
def test_usage_is_whole_counts_in_range_or_a_reason(doc: Any) -> None:
    reading = read_usage(doc)
    if reading.usage is not None:
        u = reading.usage
        for n in (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens):
            assert type(n) is int and 0 <= n <= MAX_TOKENS_PER_CALL
        assert u.cached_input_tokens <= u.input_tokens
        assert u.reasoning_tokens <= u.output_tokens
    if reading.total is not None:
        assert type(reading.total) is int and 0 < reading.total <= MAX_TOKENS_PER_CALL


@settings(max_examples=300, deadline=None)
@given(docs=st.lists(JSON, max_size=6))
def test_stream_and_answer_texts_are_strings_whatever_the_chunks(docs: list[Any]) -> None:
    assert all(isinstance(t, str) for t in joined_texts(docs))
    for doc in docs:
        assert all(isinstance(t, str) for t in texts_of_choices(doc))


@settings(max_examples=500, deadline=None)
@given(body=st.dictionaries(st.sampled_from(["max_tokens", "max_completion_tokens",
                                             "max_output_tokens", "n", "best_of"]),
                            SCALARS, max_size=5),
       endpoint=st.sampled_from([ENDPOINT_CHAT, ENDPOINT_COMPLETIONS, ENDPOINT_EMBEDDINGS]))
def test_output_caps_are_in_range_or_a_400(body: dict[str, Any], endpoint: str) -> None:
    try:
        _name, cap = requested_output(endpoint, body, "max_tokens")
        choices = choices_of(endpoint, body)
    except DomainError as exc:
        assert exc.status == 400
        return
    assert cap is None or 1 <= cap <= 10**9
    assert 1 <= choices <= 128


@settings(max_examples=300, deadline=None)
@given(body=st.one_of(st.dictionaries(st.text(max_size=12), JSON, max_size=6),
                      st.fixed_dictionaries(
    {"model": st.text(max_size=10), "max_tokens": SCALARS},
    optional={"messages": JSON, "system": JSON, "tools": JSON, "tool_choice": JSON,
              "stop_sequences": JSON, "metadata": JSON, "output_config": JSON,
              "stream": SCALARS})))
def test_anthropic_bodies_translate_or_are_a_clear_error(body: Any) -> None:
    """(The body is a JSON object: a non-object is refused before, by _parse_body.)"""
    try:
        chat = anthropic.to_chat(body)
    except DomainError as exc:
        assert 400 <= exc.status < 500
        return
    assert isinstance(chat, dict) and isinstance(chat.get("messages"), list)


@settings(max_examples=300, deadline=None)
@given(value=SCALARS)
def test_stripe_numbers_are_minor_units_in_range_or_refused(value: Any) -> None:
    from plans.billing import _amount, _at

    try:
        amount = _amount({"amount_paid": value}, "amount_paid")
    except ValueError:
        pass
    else:
        assert type(amount) is int and 0 <= amount <= 10**12
    try:
        at = _at(value)
    except DomainError:
        pass
    else:
        assert at is None or 1970 <= at.year <= 3000


@settings(max_examples=300, deadline=None)
@given(doc=JSON)
def test_request_bodies_are_checked_without_an_exception(doc: Any) -> None:
    from core.web import json_problem

    problem = json_problem(doc)
    assert problem is None or isinstance(problem, str)
