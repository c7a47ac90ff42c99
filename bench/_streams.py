"""Memory with many open streams: N streamed calls held open at once against one target,
while the RSS of its workers is read from /proc.

The upstream streams slowly (`chunk_delay_ms` between its chunks), so every call stays open
for seconds. The client (asyncio, raw sockets: one process holds thousands) opens the N
streams evenly over `ramp` seconds (0: all in the same instant), reads each until its first
content token, and keeps reading to the end; a sampler reads every worker's VmRSS every
100 ms. The figure is each worker's largest RSS while all N streams were open (and its RSS
before, idle), with the number of sockets each worker held then (a stream is two: the
client's and the upstream's)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from bench._load import Target

SAMPLE_S = 0.1


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sockets_of(pid: int) -> int:
    count = 0
    for fd in os.scandir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(fd.path).startswith("socket:"):
                count += 1
        except OSError:
            continue
    return count


async def _one(target: Target, body: bytes, state: dict[str, Any], delay: float) -> None:
    await asyncio.sleep(delay)
    head = [f"POST {target.path} HTTP/1.1", f"Host: {target.host}:{target.port}",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in target.headers.items()]
    request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    state["sent"] += 1
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port, limit=1 << 20)
    except OSError:
        state["failed"] += 1
        return
    try:
        writer.write(request)
        await writer.drain()
        buf = b""
        first = False
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
            if not first and b'"content":"' in buf.replace(b'"content":""', b""):
                first = True
                state["open"] += 1
        ok = buf.startswith(b"HTTP/1.1 200") and b"data: [DONE]" in buf
        state["ok" if ok else "failed"] += 1
        if not ok:
            status = buf.split(b"\r\n", 1)[0].decode(errors="replace") or "no answer"
            state["statuses"][status] = state["statuses"].get(status, 0) + 1
        if first:
            state["open"] -= 1
    finally:
        writer.close()


async def _run(target: Target, body: bytes, n: int, pids: list[int], timeout: float,
               ramp: float) -> dict[str, Any]:
    state: dict[str, Any] = {"sent": 0, "ok": 0, "failed": 0, "open": 0, "statuses": {}}
    idle = {pid: rss_mb(pid) for pid in pids}
    peak = {pid: 0.0 for pid in pids}
    at_all_open: dict[str, Any] | None = None
    most_open = 0
    started = time.monotonic()
    tasks = [asyncio.create_task(_one(target, body, state, ramp * i / n)) for i in range(n)]
    while not all(t.done() for t in tasks) and time.monotonic() - started < timeout:
        await asyncio.sleep(SAMPLE_S)
        now = {pid: rss_mb(pid) for pid in pids}
        most_open = max(most_open, state["open"])
        if state["open"] >= n * 0.99:  # (a sample taken while (nearly) all N are open)
            for pid, mb in now.items():
                peak[pid] = max(peak[pid], mb)
            if at_all_open is None:
                at_all_open = {"seconds_to_open": round(time.monotonic() - started, 2),
                               "sockets": {pid: sockets_of(pid) for pid in pids}}
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"streams": n, "ramp_seconds": ramp, "sent": state["sent"], "ok": state["ok"],
            "failed": state["failed"], "failed_statuses": state["statuses"],
            "most_open_at_once": most_open, "all_open": at_all_open is not None,
            "rss_idle_mb": {str(p): round(v, 1) for p, v in idle.items()},
            "rss_peak_mb": {str(p): round(v, 1) for p, v in peak.items()},
            "rss_peak_max_mb": round(max(peak.values(), default=0.0), 1),
            "sockets_at_all_open": {str(p): v for p, v in
                                    (at_all_open or {}).get("sockets", {}).items()},
            "seconds_to_open": (at_all_open or {}).get("seconds_to_open"),
            "seconds": round(time.monotonic() - started, 2)}


def hold_streams(target: Target, body: bytes, n: int, pids: list[int], *, ramp: float,
                 timeout: float = 120) -> dict[str, Any]:
    """Open n streams against target, spread over `ramp` seconds; RSS of pids while they
    are all open."""
    result = asyncio.run(_run(target, body, n, pids, timeout, ramp))
    # As the load generators report it, for the ledger check.
    result.update(tool="asyncio streams", ok_2xx=result["ok"], non_2xx=result["failed"],
                  abandoned_in_flight=0)
    return result
