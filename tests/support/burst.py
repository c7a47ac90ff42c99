"""A burst of parallel calls through the official openai SDK, run in a process of its own
(so tests drive a server from several processes at once)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai

MESSAGES = [{"role": "user", "content": "Tell me about the quick brown fox"}]


def one_call(base: str, key: str, user: str, i: int, max_tokens: int) -> tuple[int, int]:
    """(HTTP status, tokens the upstream reported) of one call; streams every other call."""
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
    try:
        if i % 2:
            stream = client.chat.completions.create(
                model="gpt-4o-mini", messages=MESSAGES, user=user, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True})
            total = 0
            for chunk in stream:
                if chunk.usage is not None:
                    total = chunk.usage.total_tokens
            return 200, total
        resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                              user=user, max_tokens=max_tokens)
        assert resp.usage is not None
        return 200, resp.usage.total_tokens
    except openai.APIStatusError as exc:
        return exc.status_code, 0
    finally:
        client.close()


def burst(args: tuple[str, str, str, int, int, int]) -> list[tuple[int, int]]:
    base, key, user, start, count, max_tokens = args
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(one_call, base, key, user, start + i, max_tokens)
                   for i in range(count)]
        return [f.result() for f in futures]


def run_bursts(base: str, key: str, user: str, *, processes: int, per_process: int,
               max_tokens: int) -> list[tuple[int, int]]:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(processes) as pool:
        parts: list[Any] = pool.map(burst, [(base, key, user, p * per_process, per_process,
                                             max_tokens) for p in range(processes)])
    return [r for part in parts for r in part]
