"""Optional py-spy profile of the gateway workers under load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench._procs import PACKAGES, ROOT, BenchError, Processes


def profile_workers(worker_pids: list[int], seconds: int, rate: int, outdir: Path,
                    procs: Processes, idle: bool = False
                    ) -> list[tuple[int, Path, subprocess.Popen[bytes]]]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    started = []
    for pid in worker_pids:
        out = outdir / f"pyspy-worker-{pid}.txt"
        proc = procs.start(f"py-spy {pid}", [
            pyspy, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
            "--format", "raw", "--output", str(out), "--nonblocking",
            *(["--idle"] if idle else [])],
            stdout=subprocess.DEVNULL, stderr=(outdir / f"pyspy-{pid}.log").open("wb"))
        started.append((pid, out, proc))
    return started


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _area(path: str) -> str:
    short = _short(path)
    if short.split("/", 1)[0] in PACKAGES:
        return "/".join(short.split("/")[:2]).removesuffix(".py")
    return short.split("/", 1)[0].removesuffix(".py")


def read_stacks(files: list[Path]) -> Iterator[tuple[list[re.Match[str]], int]]:
    """The stacks of py-spy's raw output (root first, each frame matched by _FRAME) and
    their sample counts; stacks with no readable frame are left out."""
    for path in files:
        for line in path.read_text().splitlines():
            stack, _, count_s = line.rpartition(" ")
            if not stack or not count_s.isdigit():
                continue
            frames = [m for m in (_FRAME.match(raw) for raw in stack.split(";")) if m]
            if frames:
                yield frames, int(count_s)


def analyse_profile(files: list[Path], rate: int, seconds: int, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of the sampled (non-idle) stacks of every worker."""
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    area_self: Counter[str] = Counter()
    area_incl: Counter[str] = Counter()
    total = 0
    for matched, count in read_stacks(files):
        frames = [(f"{m['func']} ({_short(m['file'])})", _area(m["file"])) for m in matched]
        total += count
        self_t[frames[-1][0]] += count
        area_self[frames[-1][1]] += count
        for name in {f[0] for f in frames}:
            incl[name] += count
        for area in {f[1] for f in frames}:
            area_incl[area] += count

    def shares(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in counter.most_common(n)] if total else []

    possible = rate * seconds * len(files)
    return {"samples": total, "possible_samples": possible,
            "busy_share_pct": round(100 * total / possible, 1) if possible else None,
            "self_pct": shares(self_t, top), "inclusive_pct": shares(incl, top),
            "area_self_pct": shares(area_self, 30), "area_inclusive_pct": shares(area_incl, 30)}


def print_profile(profile: dict[str, Any]) -> None:
    if profile.get("idle_included"):
        print(f"\npy-spy --idle profile of the workers under c=32 ({profile['samples']} "
              "samples; shares are of wall time, idle included)")
    else:
        print(f"\npy-spy profile of the workers under c=32 ({profile['samples']} samples; "
              f"workers busy {profile['busy_share_pct']}% of the time; shares are of busy "
              "samples)")
    sections = [("by package/module (inclusive)", "area_inclusive_pct", 15),
                ("by package/module (self)", "area_self_pct", 15),
                ("functions (inclusive)", "inclusive_pct", 25),
                ("functions (self)", "self_pct", 20)]
    for title, key, top in sections:
        print(f"  {title}:")
        for name, pct in profile[key][:top]:
            print(f"    {pct:5.1f}%  {name}")
    print(f"  raw stacks: {', '.join(profile['raw_files'])}")
