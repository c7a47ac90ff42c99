"""OpenTelemetry traces. A process sets up its tracer provider once, and only when spans have
somewhere to go (OTEL_EXPORTER_OTLP_ENDPOINT: OTLP over HTTP, OpenTelemetry's other OTEL_*
variables as the SDK reads them). With tracing off the Tracing part has no tracer: no span is
made at all, so the hot path pays nothing. W3C trace context comes in from the client (the
request's span continues its trace) and goes out to the upstream."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import ProxyTracerProvider, Span, SpanKind, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from core.config import Config

log = logging.getLogger(__name__)
SERVICE_NAME = "meterlane"
_PROPAGATOR = TraceContextTextMapPropagator()


class Tracing:
    """The tracer spans are made with; None when tracing is off."""

    def __init__(self, tracer: Tracer | None) -> None:
        self.tracer = tracer

    @classmethod
    def from_config(cls, config: Config) -> Tracing:
        if not config.tracing:
            return cls(None)
        if config.otel_endpoint:
            install_provider(config.otel_endpoint)
        return cls(trace.get_tracer("meterlane"))

    def start_request(self, method: str, route: str | None,
                      headers: Mapping[str, str]) -> Span | None:
        """The request's SERVER span, child of the client's trace when it sent one."""
        if self.tracer is None:
            return None
        name = f"{method} {route}" if route else method
        attributes: dict[str, str] = {"http.request.method": method}
        if route:
            attributes["http.route"] = route
        return self.tracer.start_span(name, context=_PROPAGATOR.extract(headers),
                                      kind=SpanKind.SERVER, attributes=attributes)


def child_context(span: Span | None) -> Context | None:
    """The context that makes new spans children of `span`."""
    return trace.set_span_in_context(span) if span is not None else None


def trace_headers(span: Span) -> dict[str, str]:
    """`traceparent` (and `tracestate`) naming the span, for an outgoing request."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier


@functools.cache
def install_provider(endpoint: str) -> None:
    """This process's tracer provider, exporting in batches over OTLP/HTTP; once per process
    (a gunicorn worker, after the fork: the exporter's thread is the worker's own). A
    provider the process set itself is kept."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if not isinstance(trace.get_tracer_provider(), ProxyTracerProvider):
        return
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    trace.set_tracer_provider(provider)
    log.info("tracing: spans go to %s over OTLP/HTTP", endpoint)
