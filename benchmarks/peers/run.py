"""`make bench-peers`: sinkserve, llama.cpp and vLLM's CPU build side by side, interleaved, on the same token ids.

    python -m benchmarks.peers.run [--rounds 3] [--quick] [--docs-dir docs]

Each round runs every system once, one after another (A B C A B C ...), each in a fresh process: the peers in their
own virtualenvs under `.peers/` (`make peers-setup`). Every figure is the median over rounds with its range, and
the ratio sinkserve/peer is of the medians. A peer that is not installed is reported as such, with the reason.
Writes docs/peers.md, docs/peers.json and docs/img/peers_concurrency.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO_ROOT, default_text, load_average, log, machine_description
from benchmarks.peers.workload import Spec, median, parse

PEERS_DIR = REPO_ROOT / ".peers"
# system -> (virtualenv under .peers/ or None for this interpreter, worker module)
SYSTEMS = {
    "sinkserve": (None, "benchmarks.peers.worker_sinkserve"),
    "llama.cpp": ("llamacpp", "benchmarks.peers.worker_llamacpp"),
    "vllm": ("vllm", "benchmarks.peers.worker_vllm"),
}
MESSAGE = "Please go on."
WORKER_TIMEOUT_S = 1800


def build_spec(caches: list[int], concurrency: list[int], decode_tokens: int, threads: int,
               ttft_tokens: int) -> Spec:
    from transformers import AutoTokenizer

    from sinkserve.engine.chat_format import ChatFormat
    from sinkserve.engine.weights import bundled_gguf_path, prepare_bundled_model

    checkpoint = prepare_bundled_model(progress=False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    message_ids = ChatFormat(tokenizer).user_ids(MESSAGE)
    text, _ = default_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    context = max(*caches, ttft_tokens) + 64  # the peers' context: the largest prompt and its decode fit
    need = context + 64 + 64 * 97 + 64
    if len(ids) < need:
        raise SystemExit(f"the benchmark text has {len(ids)} tokens, {need} needed")
    room = decode_tokens + 8 + len(message_ids)  # each single-session prompt + its decode ends just inside `cache`
    return Spec(
        threads=threads, decode_tokens=decode_tokens, message=MESSAGE, message_ids=message_ids,
        single={str(c): ids[: c - room] for c in caches},
        concurrent_prompts=[ids[i * 97: i * 97 + 64] for i in range(max(concurrency))],
        concurrency=concurrency,
        ttft_prompt=ids[1000: 1000 + ttft_tokens - len(message_ids)],
        overflow_prompt=ids[: context + 64],
        context=context,
        sinkserve={"dtype": "auto", "weights": "auto"},
        checkpoint=str(checkpoint),
        gguf=str(bundled_gguf_path()),
    )


def _python_for(system: str) -> tuple[str | None, str]:
    """The interpreter that runs `system`'s worker, or None and why it cannot run."""
    venv, _ = SYSTEMS[system]
    if venv is None:
        return sys.executable, ""
    python = PEERS_DIR / venv / "bin" / "python"
    failed = PEERS_DIR / f"{venv}.failed"
    if failed.is_file():
        return None, failed.read_text().strip()
    ready = PEERS_DIR / f"{venv}.ready"
    if not ready.is_file() or not python.is_file():
        return None, f"not installed (run `make peers-setup`; it installs into .peers/{venv})"
    if ready.read_text().strip() != cpu_key():
        return None, "installed for another CPU (llama.cpp is compiled for the CPU it is built on): run `make peers-setup`"
    return str(python), ""


def cpu_key() -> str:
    """What benchmarks/peers/setup.sh writes in a peer's .ready file: the CPU's flags line, hashed."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return hashlib.md5((line + "\n").encode()).hexdigest()[:12]
    return "unknown"


def run_worker(system: str, spec: Spec, spec_path: Path) -> dict:
    python, why = _python_for(system)
    if python is None:
        return {"system": system, "unavailable": why}
    _, module = SYSTEMS[system]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS=str(spec.threads),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_HOST_IP="127.0.0.1",
               VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    load_before = load_average()
    started = time.perf_counter()
    try:
        proc = subprocess.run([python, "-m", module, str(spec_path)], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"system": system, "error": f"timed out after {WORKER_TIMEOUT_S} s"}
    sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines() if line.startswith("[peers")))
    try:
        result = parse(proc.stdout)
    except ValueError:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-8:]
        return {"system": system, "error": f"exit {proc.returncode}: " + " | ".join(tail)}
    result.update(wall_s=time.perf_counter() - started, load_avg_before=load_before, load_avg_after=load_average())
    return result


# (key, label, getter, higher_is_better)
def _metrics(spec: Spec) -> list[tuple[str, str, object, bool]]:
    out = []
    for cache in spec.single:
        out.append((f"single_{cache}_ms", f"one session, cache {cache}: ms per token",
                    lambda r, c=cache: r["single"][c]["decode_ms_per_token"], False))
    for cache in spec.single:
        out.append((f"single_{cache}_prefill", f"one session, {cache}-token prompt: prefill tok/s",
                    lambda r, c=cache: r["single"][c]["prefill_tokens_per_s"], True))
    for n in spec.concurrency:
        out.append((f"concurrent_{n}", f"{n} sessions: decode tok/s",
                    lambda r, n=n: r["concurrent"][str(n)]["tokens_per_s"], True))
        out.append((f"concurrent_{n}_prefill", f"{n} sessions x 64-token prompts: prefill tok/s",
                    lambda r, n=n: r["concurrent"][str(n)]["prefill_tokens_per_s"], True))
    out.append(("ttft", f"TTFT of a {len(spec.ttft_prompt) + len(spec.message_ids):,}-token message: s",
                lambda r: r["ttft"]["ttft_s"], False))
    return out


def summarise(spec: Spec, runs: dict[str, list[dict]]) -> dict:
    def values(system: str, getter) -> list[float]:
        got = []
        for r in runs[system]:
            try:
                got.append(float(getter(r)))
            except (KeyError, TypeError):
                pass
        return got

    rows = []
    for key, label, getter, higher in _metrics(spec):
        row = {"key": key, "label": label, "higher_is_better": higher, "systems": {}}
        for system in runs:
            got = sorted(values(system, getter))
            if got:
                row["systems"][system] = {"median": median(got), "min": got[0], "max": got[-1], "rounds": len(got)}
        ours = row["systems"].get("sinkserve")
        row["speedup"] = {}  # > 1: sinkserve is faster
        for system, stat in row["systems"].items():
            if system != "sinkserve" and ours:
                row["speedup"][system] = (ours["median"] / stat["median"] if higher
                                          else stat["median"] / ours["median"])
        rows.append(row)
    notes = {}
    for system, results in runs.items():
        good = [r for r in results if "error" not in r and "unavailable" not in r]
        bad = [r.get("error") or r.get("unavailable") for r in results if r not in good]
        notes[system] = {
            "rounds_ok": len(good), "problems": sorted(set(bad)),
            "settings": good[0].get("settings") if good else None,
            "version": good[0].get("version") if good else None,
            "overflow": good[0].get("overflow") if good else None,
            "load_s": [round(r["load_s"], 1) for r in good if "load_s" in r],
        }
    return {"rows": rows, "systems": notes}


def _fmt(stat: dict | None, digits: int) -> str:
    if not stat:
        return "—"
    m, lo, hi = stat["median"], stat["min"], stat["max"]
    return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})" if stat["rounds"] > 1 else f"{m:,.{digits}f}"


def spec_summary(spec: Spec) -> dict:
    """The spec as the JSON keeps it: id lists by their lengths, files by their names (not this machine's paths)."""
    return {"threads": spec.threads, "decode_tokens": spec.decode_tokens, "message": spec.message,
            "message_ids": len(spec.message_ids), "single": {c: len(p) for c, p in spec.single.items()},
            "concurrent_prompts": len(spec.concurrent_prompts), "concurrency": spec.concurrency,
            "ttft_prompt": len(spec.ttft_prompt), "overflow_prompt": len(spec.overflow_prompt),
            "context": spec.context, "sinkserve": spec.sinkserve, "checkpoint": Path(spec.checkpoint).name,
            "gguf": Path(spec.gguf).name}


def write_markdown(result: dict, spec: Spec, path: Path, plot_name: str | None) -> None:
    summary, machine = result["summary"], result["machine"]
    systems = list(summary["systems"])
    peers = [s for s in systems if s != "sinkserve"]
    lines = ["# sinkserve beside llama.cpp and vLLM (CPU)", "",
             f"Written by `python -m benchmarks.peers.run` ({result['rounds']} rounds, systems interleaved in each "
             f"round) on {result['date']}. Each cell: median over rounds (range). Ratios: sinkserve's speed over the "
             "peer's, from the medians (> 1: sinkserve is faster).", "",
             f"- Machine: {machine['cpu']}, {machine['affinity_cpus']} CPUs, torch CPU capability "
             f"`{machine['torch_cpu_capability']}`; flags: {', '.join(machine['cpu_flags'])}.",
             f"- Threads: {spec.threads} for every system. Load average before/after each worker run is in "
             "docs/peers.json.",
             f"- Same token ids for everyone: a transcript from the stdlib's pydoc topics followed by one chat "
             f"message ({len(spec.message_ids)} ids); greedy decoding, end-of-sequence ignored, "
             f"{spec.decode_tokens} timed decode tokens per measurement. Concurrent sessions: 64-token "
             "transcripts, a context of 256 per session. Prefix caching is off in every peer, so no prompt is "
             "served from an earlier round's cache.", ""]
    for system in systems:
        note = summary["systems"][system]
        if note["rounds_ok"] == 0:
            lines.append(f"- **{system}**: no result: {'; '.join(note['problems'])}")
        else:
            extra = f"; problems in some rounds: {'; '.join(note['problems'])}" if note["problems"] else ""
            lines.append(f"- **{system}** {note['version'] or ''}: {json.dumps(note['settings'])}; start "
                         f"{note['load_s']} s{extra}")
    lines += ["", "| workload | " + " | ".join(systems) + " | " +
              " | ".join(f"sinkserve / {p}" for p in peers) + " |",
              "|---" * (1 + len(systems) + len(peers)) + "|"]
    for row in summary["rows"]:
        digits = 1 if row["key"].endswith("_ms") else (2 if row["key"] == "ttft" else 0)
        cells = [_fmt(row["systems"].get(s), digits) for s in systems]
        ratios = [f"{row['speedup'][p]:.2f}x" if p in row["speedup"] else "—" for p in peers]
        lines.append(f"| {row['label']} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    lines += ["", f"## Past the peers' context ({spec.context:,} tokens)", "",
              f"One prompt of {len(spec.overflow_prompt) + len(spec.message_ids):,} ids, each system started "
              f"with a context of {spec.context:,}:", ""]
    for system in systems:
        overflow = summary["systems"][system]["overflow"]
        if overflow:
            lines.append(f"- **{system}**: {overflow['outcome']}: {overflow['detail']}")
    if plot_name:
        lines += ["", f"![decode tokens/s against concurrency](img/{plot_name})"]
    path.write_text("\n".join(lines) + "\n")


def plot(result: dict, spec: Spec, path: Path) -> str | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["key"]: r for r in result["summary"]["rows"]}
    smallest = min(spec.single, key=int)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for system in result["summary"]["systems"]:
        xs, ys, lo, hi = [], [], [], []
        single = rows[f"single_{smallest}_ms"]["systems"].get(system)
        if single:
            xs.append(1)
            ys.append(1e3 / single["median"])
            lo.append(1e3 / single["max"])
            hi.append(1e3 / single["min"])
        for n in spec.concurrency:
            stat = rows[f"concurrent_{n}"]["systems"].get(system)
            if stat:
                xs.append(n)
                ys.append(stat["median"])
                lo.append(stat["min"])
                hi.append(stat["max"])
        if xs:
            drawn = True
            ax.errorbar(xs, ys, yerr=[[y - a for y, a in zip(ys, lo)], [b - y for y, b in zip(ys, hi)]],
                        marker="o", capsize=3, label=system)
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent sessions (1: one session at cache " + smallest + ")")
    ax.set_ylabel("decode tokens/s (all sessions)")
    ax.set_title(f"SmolLM2-135M, {spec.threads} threads, {result['machine']['cpu']}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (A B C, A B C, ...)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: " + ", ".join(SYSTEMS))
    parser.add_argument("--quick", action="store_true", help="cache 256 only, 8 sessions, 2 rounds")
    parser.add_argument("--docs-dir", type=Path, default=REPO_ROOT / "docs")
    args = parser.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown system(s) {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be at least 1")
    caches, concurrency, rounds = ([256], [8], min(args.rounds, 2)) if args.quick else ([256, 1024, 4096], [8, 64],
                                                                                       args.rounds)
    spec = build_spec(caches, concurrency, decode_tokens=32, threads=args.threads, ttft_tokens=1000)
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec.dump(spec_path)
        for round_no in range(rounds):
            for system in systems:
                log(f"round {round_no + 1}/{rounds}: {system}")
                result = run_worker(system, spec, spec_path)
                if "error" in result or "unavailable" in result:
                    log(f"{system}: {result.get('error') or result.get('unavailable')}")
                runs[system].append(result)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rounds": rounds,
              "machine": machine_description(), "spec": spec_summary(spec), "runs": runs,
              "summary": summarise(spec, runs)}
    docs = args.docs_dir
    docs.mkdir(parents=True, exist_ok=True)
    stem = "peers-quick" if args.quick else "peers"
    plot_name = plot(result, spec, docs / "img" / f"{stem}_concurrency.png")
    (docs / f"{stem}.json").write_text(json.dumps(result, indent=1))
    write_markdown(result, spec, docs / f"{stem}.md", plot_name)
    log(f"wrote {docs / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
