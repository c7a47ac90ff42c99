"""OpenAPI document of the non-gateway API, built from the routes and their schemas."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from flask import Flask
from marshmallow import Schema

F = TypeVar("F", bound=Callable[..., Any])
_ATTR = "__openapi__"
IDEMPOTENCY_KEY = {
    "required": False, "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "A retry with the same key and request within 24 h gets the first "
                   "success again (`Idempotent-Replayed: true`) instead of running twice; "
                   "409 while the first runs, 422 if the key was used for another request."}


def documented(*, summary: str, response: type[Schema] | None = None, status: int = 200,
               query: type[Schema] | None = None, body: type[Schema] | None = None,
               tag: str = "meterlane", content_type: str = "application/json",
               body_types: tuple[str, ...] = ("application/json",),
               bodies: dict[str, Any] | None = None, statuses: dict[int, str] | None = None,
               errors: dict[int, str] | None = None) -> Callable[[F], F]:
    """Attach what the OpenAPI document says of a view; the document reads it from the route.
    `content_type` is the response's, `body_types` the request bodies it takes (each with
    `body`), or `bodies` each content type's own schema (a Schema class, or a schema object
    whose items may be one). `statuses` says what a success status means (more than
    `status`: each answered with `response`), `errors` the problem statuses worth naming
    (the rest are `default`)."""

    def wrap(view: F) -> F:
        setattr(view, _ATTR, {"summary": summary, "response": response, "status": status,
                              "query": query, "body": body, "tag": tag,
                              "content_type": content_type, "body_types": body_types,
                              "bodies": bodies, "statuses": statuses or {},
                              "errors": errors or {}})
        return view

    return wrap


def build_spec(app: Flask, *, title: str = "Meterlane API",
               version: str = "0.1.0") -> dict[str, Any]:
    spec = APISpec(title=title, version=version, openapi_version="3.1.0",
                   plugins=[MarshmallowPlugin()],
                   info={"description": "Meterlane's own API. The OpenAI-compatible gateway "
                                        "routes (/v1/chat/completions, ...) follow OpenAI's "
                                        "API reference, and /v1/messages Anthropic's; they "
                                        "are not repeated here."})
    spec.components.security_scheme("bearer", {"type": "http", "scheme": "bearer"})
    problem = {"description": "Error", "content": {"application/problem+json": {
        "schema": {"$ref": "#/components/schemas/Problem"}}}}
    from core.schemas import ProblemSchema

    spec.components.schema("Problem", schema=ProblemSchema)
    spec.components.parameter("IdempotencyKey", "header", IDEMPOTENCY_KEY)
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        meta = getattr(app.view_functions[rule.endpoint], _ATTR, None)
        if meta is None:
            continue
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op = _operation(rule, meta, problem)
            if method in ("POST", "PUT", "PATCH", "DELETE") and meta["tag"] != "ops":
                op["parameters"].append("IdempotencyKey")  # a reference to the component
            spec.path(path=path, operations={method.lower(): op})
    return spec.to_dict()


def _operation(rule: Any, meta: dict[str, Any], problem: dict[str, Any]) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": meta["summary"], "tags": [meta["tag"]],
                          "parameters": [{"in": "path", "name": arg, "required": True,
                                          "schema": {"type": "string"}}
                                         for arg in sorted(rule.arguments)]}
    if meta["tag"] != "ops":
        op["security"] = [{"bearer": []}]
    if meta["query"] is not None:
        op["parameters"].append({"in": "query", "schema": meta["query"]})
    if meta["bodies"] is not None:
        op["requestBody"] = {"required": True, "content": {
            t: {"schema": schema} for t, schema in meta["bodies"].items()}}
    elif meta["body"] is not None:
        op["requestBody"] = {"content": {t: {"schema": meta["body"]}
                                         for t in meta["body_types"]}}
    ok: dict[str, Any] = {"description": meta["statuses"].get(meta["status"], "OK")}
    if meta["response"] is not None:
        ok["content"] = {meta["content_type"]: {"schema": meta["response"]}}
    elif meta["content_type"] != "application/json":
        ok["content"] = {meta["content_type"]: {"schema": {"type": "string"}}}
    op["responses"] = {str(meta["status"]): ok}
    for status, why in meta["statuses"].items():
        op["responses"][str(status)] = {**ok, "description": why}
    for status, why in meta["errors"].items():
        op["responses"][str(status)] = {**problem, "description": why}
    op["responses"]["default"] = problem
    return op
