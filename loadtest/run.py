"""Run the endless-chat load test and write its report.

    python -m loadtest.run --users 1000 --spawn-rate 10 --duration 600 --replicas 2 --slots 256 --model tiny
    python -m loadtest.run --users 4,8,16,32 --duration 120 --model smollm2 --name smollm2-sweep
    python -m loadtest.run --target gateway.example:50051 --api-key KEY --users 200 --duration 300

Without --target it starts the local stack on 127.0.0.1 (a private redis-server, then ``sinkserve up``:
local Ray, the Serve app with the chosen model preset, the gRPC gateway), creates a tenant, runs Locust
headless as a subprocess, samples the replicas' memory, and stops everything it started. Several
comma-separated --users values run one after another against the same stack (a sweep). Output:
raw files in loadtest/results/<name>/, plots in docs/img/loadtest_<name>*.png, the run's entry in
docs/loadtest.json and docs/loadtest.md re-rendered from all entries.

With the local stack, once it has stopped, the engine also runs on its own in this process at the batch
each step reached (loadtest/baseline.py), so the report gives the stack's served rate as a share of the
engine's, measured in the same run on the same machine (--no-engine-baseline skips it). --profile-users N
samples the replica process with py-spy during the N-chat step. --kill-replica-every S and --restart-redis-at T
inject faults into the local stack during each step (loadtest/faults.py): the report then gives the lost
acknowledged turns, the failed turns by status, the recovery time of each fault and a plot with the faults marked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from loadtest import faults, report
from loadtest.stack import LocalStack, MemorySampler, cpu_info, describe_cpu, prepare_model, process_threads

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILES = {  # the Locust users of each protocol: the same endless chat, the same metrics
    "grpc": Path(__file__).resolve().parent / "locustfile.py",
    "http": Path(__file__).resolve().parent / "locustfile_http.py",
}


def _user_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--users takes positive integers separated by commas, not {text!r}")
    if not counts or any(n < 1 for n in counts):
        raise argparse.ArgumentTypeError("--users takes positive integers separated by commas")
    return counts


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=_user_counts, default=[100], help="concurrent chats; a,b,c sweeps (default 100)")
    parser.add_argument("--spawn-rate", type=float, default=10, help="users started per second (default 10)")
    parser.add_argument("--duration", type=float, default=120, help="seconds per Locust run, ramp included (default 120)")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas of the local stack (default 2)")
    parser.add_argument("--slots", type=int, default=64, help="KV slots per replica (default 64)")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                        help="tiny random-weight Llama (load only) or the bundled SmolLM2-135M (default tiny)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="engine dtype of the local stack (default float32; bfloat16 is faster on CPUs with "
                             "AVX512-BF16 or AMX)")
    parser.add_argument("--weights", choices=("dense", "int4"), default="dense",
                        help="engine weight format of the local stack (default dense; int4 needs --dtype bfloat16)")
    parser.add_argument("--sinks", type=int, default=4, help="attention-sink entries per session (default 4)")
    parser.add_argument("--window", type=int, default=252, help="window entries per session (default 252)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn (default 16)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sampling temperature (default 0: greedy, the cheapest sampler; see docs/loadtest.md)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    parser.add_argument("--think-min", type=float, default=5, help="shortest think time between turns, s (default 5)")
    parser.add_argument("--think-max", type=float, default=15, help="longest think time between turns, s (default 15)")
    parser.add_argument("--turn-timeout", type=float, default=60, help="deadline of one turn, s (default 60)")
    parser.add_argument("--protocol", choices=("grpc", "http"), default="grpc",
                        help="how the users chat: grpc (SendMessage) or http (the OpenAI-compatible Responses API "
                        "with the conversation kept, SSE streaming; the local stack then starts its HTTP API too)")
    parser.add_argument("--target", help="a running gateway instead of starting the local stack: host:port "
                        "(grpc) or http://host:port (http)")
    parser.add_argument("--api-key", default=os.environ.get("SINKSERVE_API_KEY"),
                        help="tenant API key for --target (default: $SINKSERVE_API_KEY)")
    parser.add_argument("--name", help="run name in the report (default: <model>-<users>u)")
    parser.add_argument("--title", help="section heading in docs/loadtest.md")
    parser.add_argument("--note", default="", help="a sentence or two printed above the run's figures")
    parser.add_argument("--results-dir", type=Path, help="raw output (default: loadtest/results/<name>)")
    parser.add_argument("--docs-dir", type=Path, default=ROOT / "docs", help="where loadtest.md/.json and img/ go")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-engine-baseline", dest="engine_baseline", action="store_false",
                        help="skip the engine-alone baseline that runs after the local stack stops")
    parser.add_argument("--baseline-rounds", type=int, default=2,
                        help="rounds of turns per batch in the engine-alone baseline, the first one warm-up (default 2)")
    parser.add_argument("--replica-cpus", type=float, default=1,
                        help="CPUs Ray reserves per replica (default 1; Ray sets the replica's OMP_NUM_THREADS to it, "
                             "at least 1, unless the environment sets it)")
    parser.add_argument("--baseline-threads", type=int,
                        help="torch threads of the engine-alone baseline (default: torch's, all cores: the replica's "
                             "matrix products run on all cores too, see docs/loadtest.md); the largest batch is also "
                             "measured with the replica's OMP_NUM_THREADS")
    parser.add_argument("--profile-users", type=int,
                        help="profile the replica with py-spy during the step with this many chats (local stack)")
    parser.add_argument("--kill-replica-every", type=float, metavar="S",
                        help="local stack: kill -9 one replica every S seconds of each step (in turn)")
    parser.add_argument("--restart-redis-at", type=float, metavar="T",
                        help="local stack: kill -9 redis-server T seconds into each step (its supervisor restarts it)")
    parser.add_argument("--profile-seconds", type=float, default=30,
                        help="py-spy sampling time, twice: all busy threads, then only the GIL holder (default 30)")
    args = parser.parse_args(argv)
    if args.target and not args.api_key:
        parser.error("--target needs --api-key (or SINKSERVE_API_KEY)")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        parser.error("--temperature must be >= 0 and --top-p in (0, 1]")
    if args.weights == "int4" and args.dtype == "float32":
        parser.error("--weights int4 needs --dtype bfloat16")
    if args.baseline_rounds < 2:
        parser.error("--baseline-rounds must be >= 2 (the first round is warm-up)")
    if args.profile_users is not None and args.profile_users not in args.users:
        parser.error(f"--profile-users {args.profile_users} is not one of --users {args.users}")
    if (args.kill_replica_every is not None or args.restart_redis_at is not None) and args.target:
        parser.error("--kill-replica-every/--restart-redis-at need the local stack (not --target)")
    if args.kill_replica_every is not None and args.kill_replica_every <= 0:
        parser.error("--kill-replica-every must be > 0")
    if args.restart_redis_at is not None and not 0 <= args.restart_redis_at < args.duration:
        parser.error("--restart-redis-at must fall inside the step (0 <= T < --duration)")
    if args.think_max < args.think_min:
        parser.error("--think-max must be >= --think-min")
    for flag in ("spawn_rate", "duration", "replicas", "slots", "window", "max_tokens", "turn_timeout"):
        if getattr(args, flag) <= 0:
            parser.error(f"--{flag.replace('_', '-')} must be > 0")
    if args.target and args.protocol == "http" and not args.target.startswith(("http://", "https://")):
        parser.error("--protocol http: --target is the HTTP API's URL (http://host:port)")
    args.name = args.name or (f"{args.model if not args.target else 'remote'}-{'-'.join(map(str, args.users))}u"
                              + ("-http" if args.protocol == "http" else ""))
    if not all(c.isalnum() or c in "-_." for c in args.name):
        parser.error("--name may hold letters, digits, '-', '_' and '.' only")
    args.results_dir = args.results_dir or ROOT / "loadtest" / "results" / args.name
    return args


_PATH_OPTIONS = ("--results-dir", "--docs-dir")


def repo_relative(path: Path | str) -> str:
    """A path as the docs may record it: relative to the repository, or a placeholder for one outside it."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(ROOT.resolve()))
    except ValueError:
        return "<outside the repository>"


def recorded_command(argv: list[str], api_key: str | None) -> str:
    """The command line for the report: no API key, and no machine-specific path outside the repository."""
    words: list[str] = []
    expect_path = False
    for word in argv:
        if api_key and word == api_key:
            continue
        if expect_path:
            words.append(repo_relative(word))
            expect_path = False
            continue
        option, eq, value = word.partition("=")
        if option in _PATH_OPTIONS and eq:
            words.append(f"{option}={repo_relative(value)}")
        else:
            words.append(word)
            expect_path = word in _PATH_OPTIONS
    return "python -m loadtest.run " + " ".join(shlex.quote(w) for w in words)


def run_locust(args: argparse.Namespace, users: int, address: str, api_key: str, out_dir: Path) -> Path:
    """One headless Locust run; returns the CSV prefix. Locust stops itself after --duration."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "locust"
    stop_timeout = args.turn_timeout + 5  # a user mid-turn at the end may finish it
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILES[args.protocol]),
        "--headless", "--only-summary",
        "-u", str(users), "-r", str(args.spawn_rate), "-t", f"{int(args.duration)}s",
        "--stop-timeout", str(int(stop_timeout)),
        "--host", address,
        "--csv", str(prefix), "--csv-full-history",
        "--json-file", f"{prefix}_final",  # Locust appends .json
        "--html", str(out_dir / "locust_report.html"),
        "--logfile", str(out_dir / "locust.log"), "--loglevel", "INFO",
        "--exit-code-on-error", "0",  # failures are counted in the report, not by the exit code
        "--max-tokens", str(args.max_tokens),
        "--think-min", str(args.think_min), "--think-max", str(args.think_max),
        "--turn-timeout", str(args.turn_timeout),
        "--temperature", str(args.temperature), "--top-p", str(args.top_p),
        "--channels", str(max(1, min(64, users // 25))),
        "--summary-json", str(out_dir / "tally.json"),
        "--seed", str(args.seed),
    ]  # fmt: skip
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "SINKSERVE_API_KEY": api_key, "PYTHONPATH": pythonpath}
    env.pop("LOCUST_API_KEY", None)
    with (out_dir / "locust.out").open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            process.wait(timeout=args.duration + stop_timeout + 180)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"locust did not stop after {args.duration:.0f}s (see {out_dir}/locust.out)")
        except BaseException:  # interrupted: Locust must not outlive the run (or the stack it talks to)
            process.terminate()
            process.wait(30)
            raise
    if process.returncode != 0:
        tail = (out_dir / "locust.out").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"locust exited with {process.returncode}:\n{tail}")
    return prefix


def _print(message: str) -> None:
    print(f"[loadtest] {message}", flush=True)


def _sigterm(*_) -> None:
    raise KeyboardInterrupt  # so `timeout` or a kill by pid still stops the stack this run started


class ReplicaProfiler(threading.Thread):
    """py-spy on the (first) replica's pid, `delay_s` into a step, for `seconds`; the pid comes from the
    load reports the sampler has read by then."""

    def __init__(self, sampler: MemorySampler, delay_s: float, seconds: float, out_path: Path, users: int):
        super().__init__(name="replica-profiler", daemon=True)
        self.sampler, self.delay_s, self.seconds, self.out_path, self.users = sampler, delay_s, seconds, out_path, users
        self.result: dict = {"ok": False, "error": "the step ended before the profile started"}
        self._halt = threading.Event()

    def run(self) -> None:
        from loadtest import profile

        if self._halt.wait(self.delay_s):
            return
        pids = [int(r["pid"]) for r in self.sampler.rows if r.get("pid")]
        if not pids:
            self.result = {"ok": False, "error": "no load report carried the replica's pid"}
            return
        pid = pids[-1]
        result: dict = {"ok": False, "users": self.users, "pid": pid, "started_after_s": self.delay_s}
        for kind, gil in (("all", False), ("gil", True)):
            _print(f"profiling replica pid {pid} with py-spy{' --gil' if gil else ''} for {self.seconds:.0f}s ...")
            raw = self.out_path.with_name(f"{self.out_path.stem}-{kind}.raw")
            recorded = profile.record(pid, self.seconds, raw, gil=gil)
            if recorded.get("ok"):
                recorded["summary"] = profile.summarise(raw, self.seconds, recorded["rate"])
                recorded["raw"] = os.path.relpath(raw, ROOT)
            result[kind] = recorded
            if kind == "all":
                result["ok"], result["error"] = recorded.get("ok", False), recorded.get("error")
            if self._halt.is_set() or not recorded.get("ok"):
                break
        self.result = result

    def stop(self) -> dict:
        self._halt.set()
        self.join(2 * self.seconds + 120)
        return self.result


def run_engine_alone(args: argparse.Namespace, checkpoint: Path, steps: list[dict], threads: int | None,
                     replica_omp: int | None) -> dict:
    """The engine on its own at the batch each step reached (see loadtest/baseline.py), with `threads` torch
    threads (None: torch's default, all cores), and at the largest batch also with the replica's OMP_NUM_THREADS."""
    from loadtest.baseline import EngineSetup, engine_alone

    batches = [b for b in (report.batch_reached(s) for s in steps) if b]
    if not batches:
        return {"skipped": "no step reported its batch (load reports without step counters)"}
    setup = EngineSetup(model=str(checkpoint), dtype=args.dtype, weights=args.weights, sinks=args.sinks,
                        window=args.window, slots=args.slots, threads=threads)
    started = time.perf_counter()
    others = (replica_omp,) if replica_omp else ()
    result = engine_alone(setup, batches, args.max_tokens, args.baseline_rounds, progress=_print, other_threads=others)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    for step in steps:
        report.attach_engine_alone(step, result)
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.results_dir.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    stack = None
    steps: list[dict] = []
    sample_sets: list[list[dict]] = []
    prefixes: list[Path] = []
    model_description = "(remote target: whatever it serves)"
    profile_result: dict | None = None
    plan = faults.FaultPlan(args.kill_replica_every, args.restart_redis_at)
    fault_images: list[str] = []
    fault_events: list[dict] = []
    replica_omp: int | None = None
    baseline: dict | None = None
    with tempfile.TemporaryDirectory(prefix="sinkserve-loadtest-model-") as work:
        try:
            if args.target:
                address, api_key = args.target, args.api_key
            else:
                preset = prepare_model(args.model, Path(work), args.dtype, args.weights)
                model_description = preset.description
                _print(f"starting the local stack: {args.replicas} replica(s) × {args.slots} slots of {args.model} "
                       f"({args.dtype}, {args.weights} weights)")
                stack = LocalStack(
                    model=preset,
                    replicas=args.replicas,
                    slots=args.slots,
                    sinks=args.sinks,
                    window=args.window,
                    log_path=args.results_dir / "stack.log",
                    max_ongoing_requests=max(256, 2 * max(args.users)),
                    dtype=args.dtype,
                    weights=args.weights,
                    replica_cpus=args.replica_cpus,
                    http=args.protocol == "http",
                )
                stack.start(tenant_sessions=sum(args.users) + 10)
                address, api_key = (stack.http_url if args.protocol == "http" else stack.address), stack.api_key
                _print(f"gateway {address} is serving")
            for users in args.users:
                step_dir = args.results_dir if len(args.users) == 1 else args.results_dir / f"u{users}"
                sampler = profiler = injector = None
                if stack is not None:
                    sampler = MemorySampler(stack.redis_url, stack.key_prefix, step_dir / "replicas.csv",
                                            password=stack.redis_password)
                    sampler.start()
                    if plan.any:
                        injector = faults.FaultInjector(plan, args.duration, lambda s=sampler: list(s.rows),
                                                        lambda: stack.redis_pid, stack.redis_ping)
                        injector.start()
                    if users == args.profile_users:
                        # Inside the measured window (after the ramp), ending before the step does.
                        ramp = users / args.spawn_rate
                        delay = max(ramp + 10, min(0.5 * args.duration, args.duration - 2 * args.profile_seconds - 10))
                        profiler = ReplicaProfiler(sampler, delay, args.profile_seconds, step_dir / "py-spy.raw", users)
                        profiler.start()
                _print(f"{users} endless chats for {args.duration:.0f}s ...")
                try:
                    prefix = run_locust(args, users, address, api_key, step_dir)
                finally:
                    if injector is not None:
                        fault_events = injector.stop()
                    if profiler is not None:
                        profile_result = profiler.stop()
                    samples = sampler.stop() if sampler is not None else []
                if replica_omp is None and stack is not None:
                    pids = [int(r["pid"]) for r in samples if r.get("pid")]
                    # Ray sets OMP_NUM_THREADS = floor(num_cpus) (at least 1) in the replica unless inherited.
                    replica_omp = (process_threads(pids[-1]) if pids else None) or max(1, int(args.replica_cpus))
                tally = json.loads((step_dir / "tally.json").read_text())
                step = report.step_summary(users, args.duration, args.spawn_rate, prefix, tally, samples)
                if sampler is not None:
                    step["replica_busy_threads"] = sampler.busy_threads()
                if injector is not None:
                    analysis = faults.analyse(fault_events, tally.get("turn_log", []), injector.started_unix,
                                              injector.started_unix + args.duration)
                    step["faults"] = analysis["faults"]
                    step["fault_series"] = analysis["series"]
                    png = faults.plot(analysis, f"{args.name}: {users} chats, turns/s with faults marked",
                                      args.docs_dir / "img" / f"loadtest_{args.name}_faults_u{users}.png")
                    fault_images.append(f"img/{png.name}")
                    _print(f"faults: " + "; ".join(
                        f"{f['kind']} {f.get('target', '')} at {f['at_s']}s recovered {f.get('recovered_s')}s"
                        for f in step["faults"]) + f"; lost acknowledged turns {step['lost_acknowledged_turns']}")
                steps.append(step)
                sample_sets.append(samples)
                prefixes.append(prefix)
                _print(
                    f"{users} chats: {step['turns']} turns, {step['failed_turns']} failed, "
                    f"{(step['window'] or {}).get('turns_per_s')} turns/s, TTFT p99 {step['ttft_p99_ms']} ms, "
                    f"ITL p50/p99 {step['itl_p50_ms']}/{step['itl_p99_ms']} ms, "
                    f"batch {(step['time'].get('per_step') or {}).get('decode_rows')}, load avg {step['machine_load_avg']}"
                )
        finally:
            if stack is not None:
                _print("stopping the local stack")
                stack.stop()
        if stack is not None:
            if args.engine_baseline:
                baseline = run_engine_alone(args, preset.checkpoint, steps, args.baseline_threads, replica_omp)
            else:
                baseline = {"skipped": "--no-engine-baseline"}

    passing = [s["users"] for s in steps if report.passes_itl_target(s)]
    largest = max(passing) if passing else None
    headline_index = report.headline_index(steps, largest)
    docs_dir = args.docs_dir
    images = []
    label = args.model if not args.target else "remote"
    timeline = report.plot_timeline(
        prefixes[headline_index],
        sample_sets[headline_index],
        f"{args.name}: {steps[headline_index]['users']} endless chats ({label})",
        docs_dir / "img" / f"loadtest_{args.name}.png",
    )
    images.append(f"img/{timeline.name}")
    if len(steps) > 1:
        sweep = report.plot_sweep(steps, f"{args.name}: against concurrent chats ({label})",
                                  docs_dir / "img" / f"loadtest_{args.name}_sweep.png", args.turn_timeout)
        images.insert(0, f"img/{sweep.name}")
    where = report.plot_time(steps, f"{args.name}: where the time goes (measured window of each step)",
                             docs_dir / "img" / f"loadtest_{args.name}_time.png")
    if where is not None:
        images.insert(1 if len(steps) > 1 else 0, f"img/{where.name}")
    images = fault_images + images
    cores = os.cpu_count()
    run_entry = {
        "title": args.title,
        "note": args.note,
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{cores} CPU cores, {platform.machine()}, Python {platform.python_version()}, no GPU"
        if not args.target
        else "remote target",
        "cpu": describe_cpu(cpu) + ("" if not args.target else " (the load generator's; the target's is not known)"),
        "cpu_info": cpu,
        "command": recorded_command(argv if argv is not None else sys.argv[1:], args.api_key),
        "config": {
            "target": "remote gateway " + args.target if args.target else "local stack on 127.0.0.1",
            "protocol": args.protocol,
            "model": model_description,
            "model_key": args.model if not args.target else None,
            "dtype": args.dtype if not args.target else None,
            "weights": args.weights if not args.target else None,
            "replica_cpus": args.replica_cpus if not args.target else None,
            "replica_omp_num_threads": replica_omp,
            "replicas": args.replicas if not args.target else None,
            "slots": args.slots if not args.target else None,
            "sinks": args.sinks if not args.target else None,
            "window": args.window if not args.target else None,
            "max_tokens": args.max_tokens,
            "sampling": "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, top-p {args.top_p:g}",
            "think_s": [args.think_min, args.think_max],
            "turn_timeout_s": args.turn_timeout,
            "spawn_rate": args.spawn_rate,
            "duration_s": args.duration,
            "kill_replica_every_s": args.kill_replica_every,
            "restart_redis_at_s": args.restart_redis_at,
        },
        "largest_passing_users": largest,
        "saturation": report.saturation(steps, args.turn_timeout),
        "engine_alone": baseline,
        "profile": profile_result,
        "headline": steps[headline_index],
        "steps": steps,
        "results_dir": repo_relative(args.results_dir),
        "images": images,
    }
    data = report.update_json(docs_dir / "loadtest.json", args.name, run_entry)
    report.render_markdown(data, docs_dir / "loadtest.md")
    _print(f"wrote {docs_dir / 'loadtest.md'}, {docs_dir / 'loadtest.json'} and {', '.join(images)}")
    return run_entry


if __name__ == "__main__":
    main()
