#!/usr/bin/env python
"""Where the real training step's time goes, on every rank: kernels by category, GPU idle time, exposed communication.

For each accelerate config, runs train_cosmos_lora.py under `accelerate launch` on the reference-clip cache,
profiles --profile_steps optimizer steps after --warmup steps with torch.profiler on every rank, and writes
profile_<config>.json (one summary per rank) plus each rank's Chrome trace in the workdir. Per step, a summary gives:
- wall time, and kernel time by category (attention, matmul, communication, elementwise and other);
- GPU busy time (some kernel on some stream) and idle time (none at all);
- exposed communication: time when only communication kernels run, which includes waiting for a slower rank;
- the largest idle gaps, each with the innermost CPU work running during it (data loading, a host sync, launching);
- host time spent in Python's garbage collector.

    python benchmarks/profile_train.py --workdir /tmp/bench --out results/ --configs single_gpu.yaml fsdp3.yaml
"""

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402

CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "sm90")),
    ("communication", ("nccl",)),
]
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")


def category(name):
    lower = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lower for k in keys):
            return label
    return "elementwise and other"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the model, cache, runs and traces go.")
    parser.add_argument("--out", required=True, help="Where profile_<config>.json goes.")
    parser.add_argument("--model", default=None, help="Checkpoint to train. Default: build the random 2B one.")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["single_gpu.yaml", "fsdp3.yaml"],
        help="Files in accelerate_configs/ to profile, one run each.",
    )
    parser.add_argument("--warmup", type=int, default=8, help="Optimizer steps before profiling (compile, autotune).")
    parser.add_argument("--profile_steps", type=int, default=4, help="Optimizer steps to profile.")
    parser.add_argument(
        "--script",
        default=os.path.join(bench_train.REPO, "train_cosmos_lora.py"),
        help="Training script to profile (a copy being tuned, say).",
    )
    parser.add_argument(
        "--train_args",
        nargs=argparse.REMAINDER,
        default=bench_train.FAST,
        help="Training-script flags (last on the command line; default: %(default)s).",
    )
    return parser.parse_args()


def merge_intervals(intervals):
    """Sorted, disjoint (start, end) intervals covering the same time as the given ones."""
    merged = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def host_work_at(cpu_events, threads, times):
    """For each time, the name of the shortest CPU event running then on a kernel-launching thread (what the host
    was doing), else on another thread ('other thread: ...'), else 'nothing traced'."""
    starts = np.array([e["ts"] for e in cpu_events], dtype=np.float64)
    durations = np.array([e["dur"] for e in cpu_events], dtype=np.float64)
    launching = np.array([e["tid"] in threads for e in cpu_events], dtype=bool)
    names = []
    for when in times:
        running = (starts <= when) & (starts + durations >= when)
        for mask, prefix in ((running & launching, ""), (running & ~launching, "other thread: ")):
            if mask.any():
                index = np.flatnonzero(mask)
                names.append(prefix + cpu_events[index[np.argmin(durations[index])]]["name"])
                break
        else:
            names.append("nothing traced")
    return names


def launching_threads(events):
    """Threads that launch kernels (the main thread, autograd's backward thread), not the pin-memory thread."""
    counts = {}
    for e in events:
        if e.get("cat") == "cuda_runtime":
            counts[e["tid"]] = counts.get(e["tid"], 0) + 1
    return {tid for tid, n in counts.items() if n >= 0.05 * sum(counts.values())}


def summarize_trace(events, steps, wall_s, top_gaps=8, min_gap_us=100):
    """Per-step summary (milliseconds) of one rank's Chrome-trace events over `steps` optimizer steps."""
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("dur", 0) > 0]
    threads = launching_threads(events)
    cpu_events = [e for e in events if e.get("cat") in CPU_CATEGORIES and e.get("dur", 0) > 0]
    per_step = 1e3 * steps  # microseconds in the trace -> milliseconds per step
    by_category = {}
    for e in kernels:
        by_category[category(e["name"])] = by_category.get(category(e["name"]), 0) + e["dur"]
    everything = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    compute = [(e["ts"], e["ts"] + e["dur"]) for e in kernels if category(e["name"]) != "communication"]
    merged = merge_intervals(everything)
    busy = sum(end - start for start, end in merged)
    busy_compute = sum(end - start for start, end in merge_intervals(compute))
    gaps = [
        (nxt[0] - prev[1], prev[1], nxt[0])
        for prev, nxt in itertools.pairwise(merged)
        if nxt[0] - prev[1] >= min_gap_us
    ]
    hosts = host_work_at(cpu_events, threads, [(start + end) / 2 for _, start, end in gaps])
    first = merged[0][0] if merged else 0
    idle_by_host_work = {}
    for (length, _, _), name in zip(gaps, hosts, strict=True):
        idle_by_host_work[name] = idle_by_host_work.get(name, 0) + length
    return {
        "steps": steps,
        "step_ms": round(1e3 * wall_s / steps, 1),
        "kernel_ms": {k: round(v / per_step, 1) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "gpu_busy_ms": round(busy / per_step, 1),
        "gpu_idle_ms": round(1e3 * wall_s / steps - busy / per_step, 1),
        "exposed_communication_ms": round((busy - busy_compute) / per_step, 1),
        "idle_gaps_over_100us_ms": round(sum(g[0] for g in gaps) / per_step, 1),
        "idle_by_host_work_ms": {
            k: round(v / per_step, 2) for k, v in sorted(idle_by_host_work.items(), key=lambda kv: -kv[1])[:top_gaps]
        },
        "largest_gaps": [
            {"ms": round(gap[0] / 1e3, 2), "at_ms": round((gap[1] - first) / 1e3, 2), "host": name}
            for gap, name in sorted(zip(gaps, hosts, strict=True), reverse=True)[:top_gaps]
        ],
    }


def probe(report_path, warmup, steps, train_argv):
    """Run the training script's main() and profile optimizer steps warmup+1 .. warmup+steps on this rank."""
    import importlib.util

    script = train_argv.pop(0)
    spec = importlib.util.spec_from_file_location("train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    )
    state = {"calls": 0, "gc_s": 0.0, "collections": 0}
    step_logs = module.step_logs

    def time_garbage_collection(phase, info):
        if phase == "start":
            state["gc_start"] = time.perf_counter()
        elif "gc_start" in state and state["calls"] >= warmup:
            state["gc_s"] += time.perf_counter() - state["gc_start"]
            state["collections"] += 1

    gc.callbacks.append(time_garbage_collection)

    def step_logs_with_profiler(*args, **kwargs):  # main() calls it once per optimizer step
        logs = step_logs(*args, **kwargs)
        state["calls"] += 1
        if state["calls"] == warmup:
            state["start"] = time.perf_counter()
            profiler.start()
        elif state["calls"] == warmup + steps:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall = time.perf_counter() - state["start"]
            profiler.stop()
            rank = int(os.environ.get("RANK", 0))
            trace = os.path.join(os.path.dirname(report_path), f"trace_rank{rank}.json")
            profiler.export_chrome_trace(trace)
            events = json.load(open(trace))["traceEvents"]
            summary = {
                "rank": rank,
                **summarize_trace(events, steps, wall),
                "python_gc_ms": round(1e3 * state["gc_s"] / steps, 1),
                "python_gc_runs": state["collections"],
            }
            with open(f"{report_path}.rank{rank}.json", "w") as f:
                json.dump(summary, f, indent=2)
        return logs

    module.step_logs = step_logs_with_profiler
    assert module.main(module.parse_args(train_argv)) == 0


def profile_config(args, model, cache, config_file):
    name = os.path.splitext(config_file)[0]
    output = os.path.join(args.workdir, "profile_runs", name)
    subprocess.run(["rm", "-rf", output], check=True)
    os.makedirs(output)
    train_argv = [
        *bench_train.training_flags(model, cache, output, args.warmup + args.profile_steps),
        "--train_batch_size",
        "2",
        *args.train_args,
    ]
    command = bench_train.launch_command(
        os.path.join(bench_train.REPO, "accelerate_configs", config_file),
        os.path.abspath(__file__),
        "--probe",
        os.path.join(output, "profile"),
        str(args.warmup),
        str(args.profile_steps),
        os.path.abspath(args.script),
        *train_argv,
    )
    log = subprocess.run(command, capture_output=True, text=True)
    if log.returncode:
        return {"error": (log.stdout + log.stderr)[-3000:]}
    return {
        "config_file": config_file,
        "ranks": [
            json.load(open(os.path.join(output, f)))
            for f in sorted(os.listdir(output))
            if f.startswith("profile.rank")
        ],
    }


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
        return
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = args.model or bench_train.random_2b_checkpoint(args.workdir)
    cache = bench_train.synthetic_cache_for(model, args.workdir)
    for config_file in args.configs:
        result = profile_config(args, model, cache, config_file)
        with open(os.path.join(args.out, f"profile_{os.path.splitext(config_file)[0]}.json"), "w") as f:
            json.dump(result, f, indent=2)
        print(json.dumps(result, indent=1), flush=True)


if __name__ == "__main__":
    main()
