"""`meterlane serve`'s app with a stopwatch on each stage of the hot path (bench only).

gunicorn's factory `bench._stage_app:create_app` builds the service's own app
(app.serving_app) after wrapping the functions each stage runs, so that every call adds its
wall time to its stage. Times are exclusive: a stage's time excludes the stages it calls
(reserve excludes the plan lookup it makes). Under gevent a stage's time includes what it
waits for (Redis, the database, the upstream), which is what a call's latency is made of at
one connection. GET /_bench/stages answers the worker's totals; POST resets them. Nothing of
the service is changed: the wrappers call the very functions they wrap.

    python -m bench._stage_app --port 8002   # with the environment of `meterlane serve`
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (module, attribute path, stage). A module-level name that gateway code imported with
# `from x import name` is wrapped where it is used (gateway.service.parse_body).
STAGES: list[tuple[str, str, str]] = [
    ("core.auth", "AuthService.authenticate", "auth (key lookup, cached)"),
    ("gateway.api", "request_bytes", "read body"),  # a call that goes through Flask
    ("gateway.fastpath", "GatewayFastPath._body", "read body"),
    ("gateway.service", "parse_body", "parse JSON body"),
    ("gateway.service", "GatewayService._prepare", "validate call"),
    ("core.tenancy", "TenancyService.ensure_end_user", "end user lookup"),
    ("plans.service", "PlanService.plan_of", "plan lookup"),
    ("metering.service", "MeteringService.prompt_tokens", "count prompt tokens"),
    ("metering.limits", "LimitsService.reserve", "limits reserve"),
    ("metering.leases", "Unsettled.wait", "limits reserve: waits for the last settle"),
    ("metering.redislimits", "RedisLimitStore.reserve", "limits reserve: the Redis script"),
    ("metering.limits", "LimitsService.keep_alive", "limits heartbeat (start)"),
    ("metering.limits_text", "quota_headers", "quota headers"),  # QuotaHeaders calls it
    ("gateway.service", "upstream_payload", "upstream payload"),
    ("metering.intents", "IntentJournal.open", "intent journal (open, row, close)"),
    ("metering.intents", "IntentJournal.settled", "intent journal (open, row, close)"),
    ("metering.intents", "IntentJournal.close", "intent journal (open, row, close)"),
    ("gateway.upstream", "UpstreamClient.post", "upstream call (send + answer)"),
    ("gateway.service", "loads", "parse answer"),
    ("gateway.service", "read_usage", "parse answer"),
    ("gateway.wire", "Wire.response", "relay answer"),
    ("gateway.service", "GatewayService._relay", "relay stream"),
    ("metering.service", "MeteringService.settle", "price + ledger row"),
    ("metering.ledger", "LedgerWriter.record_row", "ledger write (group commit)"),
    ("core.metrics", "Metrics.observe_call", "metrics"),
    ("metering.limits", "LimitsService.settle_soon", "limits settle (queue)"),
    ("metering.limits", "LimitsService.settle", "limits settle (run)"),
    ("gateway.api", "_context", "call context (telemetry)"),
]

_local = threading.local()  # per greenlet once gevent has patched threading
_lock = threading.Lock()
_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # stage -> [seconds, calls]
_requests = [0]


def _stack() -> list[list[float]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stack = _stack()
        frame = [time.perf_counter(), 0.0]  # start, time spent in nested stages
        stack.append(frame)
        try:
            result = fn(*args, **kwargs)
        finally:
            stack.pop()
            elapsed = time.perf_counter() - frame[0]
            if stack:
                stack[-1][1] += elapsed
            name = stage if getattr(_local, "in_request", False) \
                else stage + " [outside a request]"
            with _lock:
                _totals[name][0] += elapsed - frame[1]
                _totals[name][1] += 1
        return result

    return wrapper


def _timed_generator(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A stream's relay: each step of the generator is timed (its time between yields)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        gen = fn(*args, **kwargs)
        step = _timed(stage, lambda: next(gen))
        while True:
            try:
                item = step()
            except StopIteration:
                return
            yield item

    return wrapper


def _install() -> None:
    for module_name, path, stage in STAGES:
        owner: Any = importlib.import_module(module_name)
        *outer, attr = path.split(".")
        for part in outer:
            owner = getattr(owner, part)
        fn = getattr(owner, attr)
        wrap = _timed_generator if attr == "_relay" else _timed
        setattr(owner, attr, wrap(stage, fn))


_requests_running: set[Any] = set()  # the greenlets serving a request now
_switches: Counter[str] = Counter()  # where a request gave the hub a turn -> how often


def _trace_switches() -> None:
    """Count where a request's greenlet hands control to another (BENCH_SWITCHES=1): each
    is a wait (a socket) or a yield, and a yield lets the other greenlets run inside it."""
    import greenlet

    def trace(event: str, args: Any) -> None:
        if event in ("switch", "throw") and args[0] in _requests_running:
            frame, where = sys._getframe(1), []
            while frame is not None and len(where) < 3:
                name = frame.f_code.co_filename
                if "site-packages" not in name and "/lib/python" not in name \
                        and "_stage_app" not in name:
                    where.append(f"{Path(name).name}:{frame.f_lineno} {frame.f_code.co_name}")
                frame = frame.f_back
            if not where:  # no frame of ours: the innermost three, whoever's
                frame = sys._getframe(1)
                while frame is not None and len(where) < 3:
                    where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} "
                                 f"{frame.f_code.co_name}")
                    frame = frame.f_back
            _switches[" <- ".join(where)] += 1

    greenlet.settrace(trace)


def greenlet_now() -> Any:
    import greenlet

    return greenlet.getcurrent()


def create_app() -> Any:
    _install()
    if os.environ.get("BENCH_SWITCHES"):
        _trace_switches()
    from flask import Response, request

    from app import serving_app

    app = serving_app()
    inner = app.wsgi_app

    def wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").startswith("/_bench/"):
            return inner(environ, start_response)
        _local.in_request = True
        _requests_running.add(greenlet_now())
        t0 = time.perf_counter()
        body = inner(environ, start_response)
        return _Closing(body, t0)

    app.wsgi_app = wsgi_app  # type: ignore[method-assign]

    def stages() -> Response:
        if request.method == "POST":
            with _lock:
                _totals.clear()
                _switches.clear()
                _requests[0] = 0
        with _lock:
            doc = {"requests": _requests[0], "switches": dict(_switches.most_common(40)),
                   "stages": {k: {"seconds": v[0], "calls": v[1]} for k, v in _totals.items()}}
        return Response(json.dumps(doc), mimetype="application/json")

    app.add_url_rule("/_bench/stages", "bench_stages", stages, methods=["GET", "POST"])
    return app


class _Closing:
    """The response body; the request's total is taken when the server closes it (after
    the last byte, and after the call_on_close work: the limits settle)."""

    def __init__(self, body: Any, t0: float) -> None:
        self.body, self.t0 = body, t0

    def __iter__(self) -> Any:
        return iter(self.body)

    def close(self) -> None:
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            _local.in_request = False
            _requests_running.discard(greenlet_now())
            with _lock:
                _totals["request total (in the worker)"][0] += time.perf_counter() - self.t0
                _totals["request total (in the worker)"][1] += 1
                _requests[0] += 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="meterlane-metrics-")
    from core.server import run

    run("bench._stage_app:create_app", host=args.host, port=args.port, workers=args.workers,
        timeout=900)


if __name__ == "__main__":
    main()
