"""Profile a replica process under load with py-spy and summarise where its Python time goes.

``record`` runs ``py-spy record --format raw --threads`` on the replica's pid (from its load report) for a
while; ``summarise`` reads the collapsed stacks: samples per thread (the engine loop's thread apart from the
rest), the rest by what they were doing (Ray Serve, Ray core, asyncio, Redis, gRPC, sinkserve's own replica
code, torch), and the top frames by own time and by time inclusive of their callees. Idle threads (blocked in
a wait) are not sampled, so the counts are time on a CPU, or waiting for the GIL.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ENGINE_THREAD = "sinkserve-engine-loop"
# The first category whose pattern a frame's file matches, searched from the innermost frame outwards.
CATEGORIES = (
    ("Redis client", ("redis/",)),
    ("gRPC", ("grpc/", "grpc_")),
    ("Ray Serve", ("ray/serve/",)),
    ("Ray core", ("ray/",)),
    ("torch", ("torch/",)),
    ("sinkserve", ("sinkserve/",)),
    ("asyncio", ("asyncio/", "selectors.py", "uvloop")),
    # a pool thread whose innermost Python frame runs its work item: the work is native (Ray core's Cython)
    ("thread pool, native work item", ("concurrent/futures/thread.py",)),
    ("thread with a native target", ("threading.py",)),
)


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, out_path: Path, rate: int = 100, gil: bool = False) -> dict:
    """Sample `pid` for `seconds` (with `gil`: only threads holding the GIL); returns {"ok", "raw", "error"}.
    Never raises for a failed profile."""
    binary = py_spy()
    if binary is None:
        return {"ok": False, "error": "py-spy is not installed (pip install py-spy)"}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", str(rate), "--threads",
               "--nonblocking", "--format", "raw", "-o", str(out_path)] + (["--gil"] if gil else [])
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"py-spy did not finish in {seconds + 60:.0f}s"}
    if result.returncode != 0 or not out_path.exists():
        return {"ok": False, "error": (result.stderr or result.stdout).strip()[-500:]}
    return {"ok": True, "raw": str(out_path), "command": " ".join(["py-spy"] + command[1:]),
            "seconds": seconds, "rate": rate, "gil_only": gil}


def _frames(line: str) -> tuple[str, list[str], int] | None:
    stack, _, count = line.rstrip().rpartition(" ")
    if not stack or not count.isdigit():
        return None
    parts = stack.split(";")
    thread = parts[0]
    if thread.startswith("thread ("):  # 'thread (1234): name' or 'thread (1234)' (the native thread id)
        tid, _, name = thread[len("thread ("):].partition(")")
        thread = f"{name.lstrip(': ') or '?'} [{tid}]"
        parts = parts[1:]
    else:
        thread = "?"
    return thread, parts, int(count)


def _file(frame: str) -> str:
    return frame.rpartition(" (")[2].rstrip(")")


def _function(frame: str) -> str:
    """'name (path/file.py:123)' -> 'name (path/file.py)': the function, whatever line it was on."""
    name, _, where = frame.rpartition(" (")
    return f"{name} ({where.rstrip(')').rpartition(':')[0] or where.rstrip(')')})"


def category(frames: list[str]) -> str:
    for frame in reversed(frames):
        path = _file(frame)
        for label, patterns in CATEGORIES:
            if any(p in path for p in patterns):
                return label
    return "other"


def summarise(raw_path: Path, seconds: float, rate: int, top: int = 12) -> dict:
    threads: Counter[str] = Counter()
    outside: Counter[str] = Counter()  # samples of threads other than the engine loop, by category
    engine_parts: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in Path(raw_path).read_text(errors="replace").splitlines():
        parsed = _frames(line)
        if parsed is None:
            continue
        thread, frames, count = parsed
        total += count
        threads[thread] += count
        if thread.startswith(ENGINE_THREAD):
            engine_parts[category(frames)] += count
        else:
            outside[category(frames)] += count
        if frames:
            own[f"[{'engine' if thread.startswith(ENGINE_THREAD) else 'other'}] {frames[-1]}"] += count
        for function in {_function(f) for f in frames if "threading.py" not in _file(f)}:
            inclusive[function] += count
    expected = seconds * rate  # samples one thread busy all the time would give

    def table(counter: Counter[str], n: int) -> list[dict]:
        return [{"what": k, "samples": v, "share": round(v / total, 3) if total else 0.0}
                for k, v in counter.most_common(n)]

    outside_total = sum(outside.values())
    return {
        "samples": total,
        "seconds": seconds,
        "rate_hz": rate,
        "cpu_s_sampled": round(total / rate, 1) if rate else None,
        "threads": [
            {"thread": k, "samples": v, "busy_share_of_wall": round(v / expected, 3) if expected else None}
            for k, v in threads.most_common(8)
        ],
        "engine_thread_share": round(sum(v for k, v in threads.items() if k.startswith(ENGINE_THREAD)) / total, 3)
        if total else None,
        "engine_thread_by_category": table(engine_parts, 8),
        "outside_engine_by_category": [
            {"what": k, "samples": v, "share_of_outside": round(v / outside_total, 3) if outside_total else 0.0,
             "busy_share_of_wall": round(v / expected, 3) if expected else None}
            for k, v in outside.most_common(10)
        ],
        "top_own": table(own, top),
        "top_inclusive": table(inclusive, top),
    }
