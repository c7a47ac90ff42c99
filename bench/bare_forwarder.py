"""The bench's baseline: a bare forwarder, Meterlane's serving stack without Meterlane.

POST /v1/chat/completions is sent to the upstream as it came and its answer relayed as it
comes (a stream chunk by chunk), with nothing else: no key, no parsing, no plan, no limits,
no ledger. It runs under the very gunicorn `meterlane serve` runs (core.server.run: gevent
workers, the same worker connections, keep-alive and timeouts) and forwards with the very
client the gateway uses (gateway.upstream.UpstreamClient: one keep-alive pool per upstream),
so that what bench/hotpath.py measures between it and Meterlane is Meterlane's own work.

    python -m bench.bare_forwarder --upstream http://127.0.0.1:PORT/v1 --port 8001
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Run as a script, sys.path[0] is bench/: the repository root makes `core` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

UPSTREAM_ENV = "BENCH_BARE_UPSTREAM"


def create_app() -> Any:
    """The Flask app (gunicorn's factory, imported in the worker after gevent has patched:
    Flask and the client are imported here, not at the top, as app.py does)."""
    from flask import Flask, Response, request

    from core.config import UpstreamConfig
    from gateway.upstream import UpstreamClient

    upstream = UpstreamClient(UpstreamConfig(name="bare", base_url=os.environ[UPSTREAM_ENV]))
    app = Flask("bare_forwarder")

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = request.get_data(cache=False)
        stream = b'"stream":true' in body  # the bench's bodies are compact JSON
        resp = upstream.post("/chat/completions", body, stream=stream)
        headers = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
        if not stream:
            return Response(resp.data, status=resp.status, headers=headers)

        def relay() -> Iterator[bytes]:
            try:
                yield from upstream.chunks(resp)
            finally:
                resp.release()

        headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return Response(relay(), status=resp.status, headers=headers, direct_passthrough=True)

    @app.get("/healthz")
    def healthz() -> Response:
        return Response(b'{"status":"ok"}', headers={"Content-Type": "application/json"})

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://host:port/v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args(argv)
    os.environ[UPSTREAM_ENV] = args.upstream
    from core.server import run

    run("bench.bare_forwarder:create_app", host=args.host, port=args.port,
        workers=args.workers, timeout=args.timeout)


if __name__ == "__main__":
    main()
