"""Log lines in one format per process (MLANE_LOG_FORMAT), the operations settings, and the
/metrics key check."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import orjson
import pytest

from core import logs
from core.config import Config, ConfigError, otel_traces_endpoint
from core.metrics import scrape_allowed


@pytest.fixture()
def captured() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    out = io.StringIO()
    yield out
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_their_fields_and_never_stack_handlers(captured: io.StringIO) -> None:
    logs.configure("json", stream=io.StringIO())
    logs.configure("json", stream=captured)  # a second set-up replaces the first
    log = logging.getLogger("meterlane.request")
    logs.event(log, "request", {"request_id": "req_1", "tokens": {"input": 3, "output": 4},
                                "cost_pico_usd": 12_345_678_901_234_567, "ts": "spoofed"})
    logging.getLogger("gateway.service").warning("upstream %s failed", "cloud")
    first, second = (orjson.loads(line) for line in captured.getvalue().splitlines())
    assert first["msg"] == "request" and first["level"] == "info"
    assert first["logger"] == "meterlane.request" and first["ts"].endswith("Z")
    assert first["ts"] != "spoofed"  # a field never overwrites the line's own
    assert first["tokens"] == {"input": 3, "output": 4}
    assert first["cost_pico_usd"] == 12_345_678_901_234_567  # an integer, exactly
    assert second["msg"] == "upstream cloud failed" and second["level"] == "warning"
    assert not any(isinstance(h, logging.StreamHandler) and h.stream is not captured
                   and getattr(h, "_meterlane", False) for h in logging.getLogger().handlers)


def test_text_lines_are_key_value_with_nested_fields_flattened(captured: io.StringIO) -> None:
    logs.configure("text", stream=captured)
    logs.event(logging.getLogger("meterlane.request"), "request",
               {"route": "/v1/chat/completions", "limit": {"outcome": "refused",
                                                           "kind": "rate_limited"},
                "error": 'said "no" twice', "ttft_ms": None, "stream": True, "cached": False,
                "note": "", "pair": "a=b", "tokens": {"input": 7, "reasoning": None}})
    text = captured.getvalue().strip()
    assert " INFO " in text and "meterlane.request: request" in text
    assert "route=/v1/chat/completions" in text
    assert "limit.outcome=refused limit.kind=rate_limited" in text
    assert 'error="said \\"no\\" twice"' in text
    assert "stream=true" in text and "ttft_ms" not in text
    assert 'cached=false note="" pair="a=b" tokens.input=7' in text and "reasoning" not in text


@pytest.mark.parametrize("created", [0.0, 1_780_000_000.0005, 1_780_000_000.9994999,
                                     1_780_000_000.9999996, 1_780_000_001.25])
def test_a_line_is_stamped_in_utc_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
    assert logs._timestamp(created) == expected.replace("+00:00", "Z")
    assert logs._timestamp(created + 3600) != logs._timestamp(created)  # not a stale second


def test_an_exception_goes_into_the_json_line(captured: io.StringIO) -> None:
    logs.configure("json", stream=captured)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("core.web").exception("unhandled error in request %s", "req_2")
    doc = orjson.loads(captured.getvalue())
    assert doc["level"] == "error" and "ValueError: boom" in doc["exc"]


def test_a_start_up_line_is_json_with_its_level() -> None:
    doc = orjson.loads(logs.json_line("meterlane.serve", "serving http://x", "warning",
                                      event="startup"))
    assert (doc["msg"], doc["level"], doc["event"]) == ("serving http://x", "warning", "startup")


def test_operations_settings_are_read_from_the_environment() -> None:
    config = Config.from_env({"MLANE_LOG_FORMAT": "JSON", "MLANE_METRICS_KEY": "k",
                              "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    assert (config.log_format, config.metrics_key) == ("json", "k")
    assert config.tracing and config.otel_endpoint == "http://collector:4318/v1/traces"
    quiet = Config.from_env({})
    assert (quiet.log_format, quiet.metrics_key, quiet.tracing) == ("text", None, False)
    with pytest.raises(ConfigError, match="MLANE_LOG_FORMAT"):
        Config.from_env({"MLANE_LOG_FORMAT": "xml"})


def test_the_traces_endpoint_follows_opentelemetry_variables() -> None:
    assert otel_traces_endpoint({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
                                 "OTEL_EXPORTER_OTLP_ENDPOINT": "http://b"}) == "http://t/x"
    assert otel_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b",
                                 "OTEL_SDK_DISABLED": "true"}) is None
    assert otel_traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://b",
                                 "OTEL_TRACES_EXPORTER": "none"}) is None


def test_the_metrics_key_is_a_bearer_key_when_set() -> None:
    assert scrape_allowed(None, None)
    assert scrape_allowed("s3cret", "Bearer s3cret")
    assert scrape_allowed("s3cret", "bearer  s3cret ")
    assert not scrape_allowed("s3cret", None)
    assert not scrape_allowed("s3cret", "Bearer s3cre")
    assert not scrape_allowed("s3cret", "Basic s3cret")
