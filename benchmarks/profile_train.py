#!/usr/bin/env python
"""Where the real training step's time goes, on every rank: kernels by category, GPU idle time, exposed communication.

For each accelerate config (and each --recipes entry), runs train_cosmos_lora.py under `accelerate launch` on the
reference-clip cache, profiles --profile_steps optimizer steps after --warmup steps with torch.profiler (shapes
recorded) on every rank, and writes profile_<config>[_<recipe>].json (one summary per rank) and the run's log,
profile_<config>[_<recipe>].log, to --out (the log as the run goes, so a run that fails or is stopped leaves it
there), plus each rank's Chrome trace in the workdir. A run that fails is a result too: its summary holds the exit
code, the run's `error: ...` line and out_of_memory (true when it ran out of GPU memory), and the next run goes on.
Per step, a summary gives:
- wall time, and kernel time by category, in ms and as a share of GPU-busy time (kernels of two streams that overlap
  both count, so shares can sum past 1):
    attention            attention kernels (cuDNN, flash, fmha) by name;
    base matmul          GEMMs of the frozen weights, bf16 or FP8 (`_scaled_mm`), and the other full-width linears
                         (embeddings, proj_out);
    LoRA matmul          GEMMs whose launching aten op has a dimension equal to the LoRA rank;
    adapter              the temporal adapters: GEMMs with a dimension equal to their bottleneck width
                         (hidden size / --adapter_reduction_factor) and their depthwise convolution;
    norm and AdaLN       layer and RMS norms with the AdaLN modulation inductor fuses into them (kernel or launching
                         op named layer_norm, rms_norm, rsqrt or var_mean) and AdaLN's own GEMMs (a dimension equal to
                         the transformer's adaln_lora_dim, one row per latent frame: no dimension above 3 x hidden);
    optimizer            kernels launched inside torch's `Optimizer.step#...` annotation, foreach / multi_tensor /
                         fused Adam kernels elsewhere (gradient clipping), and the EMA update (aten::lerp_);
    data                 host-to-device copies (the batch);
    communication        NCCL kernels;
    elementwise and other  the rest (RoPE, GELU, residual adds, FP8 casts and scales, layout copies, memsets).
  Each GPU kernel is tied to the CPU op that launched it through the trace's `correlation` ids (kernel -> CUDA
  runtime or driver launch -> innermost `cpu_op` around the launch on that thread), whose "Input Dims" give a GEMM's
  dimensions; inductor's fused Triton kernels (triton_poi/red/per_fused_<aten ops>) are named after the aten ops they
  fuse, never counted as attention or matmul, and a norm by those names. A fused kernel counts whole: a LayerNorm
  kernel holds the AdaLN modulation (fused_add_mul_native_layer_norm), a q/k RMSNorm one may hold RoPE. LayerNorm's
  backward is named native_layer_norm_backward; RMSNorm's is named after pow/sum/mul only and counts as other.
- GPU busy time (some kernel on some stream) and idle time (none at all);
- exposed communication: time when only communication kernels run, which includes waiting for a slower rank;
- the five kernels with the most time in each category (`top_kernels_ms`), by name;
- the largest idle gaps, each with the innermost CPU work running during it (data loading, a host sync, launching);
- host time spent in Python's garbage collector;
- the run's own rate before the profiler starts (`unprofiled`): samples/s, step time and peak memory averaged over the
  warm-up steps after the first two (which compile), from its losses.jsonl, since the profiler lengthens a step, and
  the allocator's retries by then (above 0: memory was full, and the steps ran slower for it).
The widths that sort the GEMMs (LoRA rank, adapter bottleneck, AdaLN width, hidden size) come from the run's own
resolved flags (its --recipe) and its transformer config, and are written into the summary (`matmul_widths`).

    python benchmarks/profile_train.py --workdir /tmp/bench --out results/ --configs single_gpu.yaml fsdp3.yaml
    python benchmarks/profile_train.py --workdir /tmp/b --out results/ --configs single_gpu.yaml --batch_size 4
        --recipes default nvidia --warmup 6 --profile_steps 2
        --train_args --compile --attention_backend _native_cudnn --fp8
"""

import argparse
import gc
import itertools
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402

from cosmos_cli import HelpFormatter
from cosmos_process import file_written_whole, run_main, stage  # noqa: E402

CATEGORIES = [
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "sm90")),
    ("communication", ("nccl",)),
]
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
CPU_CATEGORIES = ("cpu_op", "user_annotation", "cuda_runtime", "cuda_driver", "python_function")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
# aten ops whose kernels are one GEMM (cuBLAS's, and its split-K reduction or gemv when it picks one)
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::matmul")
MATMUL_OPS += ("aten::linear", "aten::_addmm_activation")
FUSED_TRITON = ("triton_poi_", "triton_red_", "triton_per_")  # inductor's fused pointwise/reduction kernels
NORM_KEYS = ("layer_norm", "rms_norm", "rmsnorm", "rsqrt", "var_mean")
OPTIMIZER_KEYS = ("foreach", "multi_tensor", "fused_adam", "fusedadam")
OPTIMIZER_ANNOTATION = "Optimizer.step#"
OPTIMIZER_OPS = ("aten::_foreach", "aten::lerp_")  # gradient clipping's norms; the EMA update (lerp_ per weight)


def category(name):
    """A kernel's coarse category from its name alone (attention, matmul, communication, elementwise and other)."""
    lower = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lower for k in keys):
            return label
    return "elementwise and other"


@dataclass
class MatmulWidths:
    """The GEMM dimensions that tell fine-tuning's matmuls from the base model's."""

    lora_ranks: tuple = ()  # --lora_rank of the run
    adapter_width: int | None = None  # the temporal adapters' bottleneck (None: no adapters)
    adaln_width: int | None = None  # the transformer's adaln_lora_dim
    hidden: int = 0  # the transformer's hidden size (heads x head dim)


@dataclass
class Launch:
    """What the host was running when it launched a kernel."""

    op: str = ""  # the innermost cpu_op around the launch ("" when none)
    dims: list = field(default_factory=list)  # its "Input Dims"
    in_optimizer: bool = False  # inside an `Optimizer.step#...` annotation


def matmul_dims(input_dims):
    """The matrix dimensions of a GEMM op's operands (the last two of each operand of 2+ dims), as a set."""
    return {d for dims in input_dims if isinstance(dims, list) and len(dims) >= 2 for d in dims[-2:]}


def matmul_category(dims, widths):
    """Which matmul a GEMM with these matrix dimensions is: AdaLN (its width, at most 3 x hidden in every
    dimension, that is one row per latent frame), LoRA (a rank), adapter (the bottleneck width), else base."""
    if widths.adaln_width in dims and widths.hidden and max(dims) <= 3 * widths.hidden:
        return "norm and AdaLN"
    if dims & set(widths.lora_ranks):
        return "LoRA matmul"
    if widths.adapter_width is not None and widths.adapter_width in dims:
        return "adapter"
    return "base matmul"


def kernel_category(event, launch, widths):
    """The category of one GPU event (kernel, memcpy, memset), given the CPU op that launched it."""
    lower = event["name"].lower()
    op = launch.op.lower()
    if event.get("cat") == "gpu_memcpy" and "htod" in lower:
        return "data"
    if "nccl" in lower:
        return "communication"
    if launch.in_optimizer or any(k in lower for k in OPTIMIZER_KEYS) or launch.op.startswith(OPTIMIZER_OPS):
        return "optimizer"
    if any(k in lower or k in op for k in NORM_KEYS):
        return "norm and AdaLN"
    if lower.startswith(FUSED_TRITON) or event.get("cat") != "kernel":
        return "elementwise and other"
    if "conv" in op:  # the temporal adapters' depthwise Conv1d: the transformer's only convolution
        return "adapter"
    if launch.op in MATMUL_OPS or category(lower) == "matmul":
        return matmul_category(matmul_dims(launch.dims), widths)
    return category(lower)


def innermost_spans(spans, points):
    """For each point (tid, ts), the index of the shortest span (tid, ts, dur) on that thread containing it, or None.
    Spans of one thread nest (a call stack), so one sweep per thread with a stack finds them."""
    found = [None] * len(points)
    order = sorted(
        [(tid, ts, 0, -dur, i) for i, (tid, ts, dur) in enumerate(spans)]
        + [(tid, ts, 1, 0, j) for j, (tid, ts) in enumerate(points)]
    )
    stack, current = [], None
    for tid, ts, is_point, minus_dur, index in order:
        if tid != current:  # the next thread's spans and points
            stack, current = [], tid
        while stack and stack[-1][0] < ts:  # spans that ended before this moment
            stack.pop()
        if is_point:
            found[index] = stack[-1][1] if stack else None
        else:
            stack.append((ts - minus_dur, index))
    return found


def thread(event):
    """The process and thread of a CPU event: the key that innermost_spans groups by."""
    return f"{event.get('pid')}/{event.get('tid')}"


def kernel_launches(events):
    """{correlation id: Launch} for every kernel launch and copy in the trace."""
    launches = [e for e in events if e.get("cat") in LAUNCH_CATEGORIES and "correlation" in e.get("args", {})]
    points = [(thread(e), e["ts"]) for e in launches]
    ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("dur", 0) > 0]
    steps = [
        e
        for e in events
        if e.get("cat") == "user_annotation" and e["name"].startswith(OPTIMIZER_ANNOTATION) and e.get("dur", 0) > 0
    ]
    op_of = innermost_spans([(thread(e), e["ts"], e["dur"]) for e in ops], points)
    step_of = innermost_spans([(thread(e), e["ts"], e["dur"]) for e in steps], points)
    result = {}
    for e, op, step in zip(launches, op_of, step_of, strict=True):
        inner = ops[op] if op is not None else {}
        dims = inner.get("args", {}).get("Input Dims", [])
        result[e["args"]["correlation"]] = Launch(inner.get("name", ""), dims, step is not None)
    return result


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the model, cache, runs and traces go.")
    parser.add_argument("--out", required=True, help="Where profile_<config>[_<recipe>].json go.")
    parser.add_argument(
        "--model",
        default=None,
        help="Diffusers checkpoint to train (used as it is). Default: WORKDIR/random-cosmos-2b, the random 2B "
        "Predict2 one, written there unless it already is.",
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["single_gpu.yaml", "fsdp3.yaml"],
        help="Files in accelerate_configs/ to profile, one run each.",
    )
    parser.add_argument(
        "--recipes",
        nargs="+",
        choices=["default", "nvidia"],
        default=None,
        help="Profile one run per config and recipe, passing --recipe NAME to the training script. Default: one "
        "run per config, with the recipe --train_args give, else the script's default.",
    )
    parser.add_argument("--batch_size", type=int, default=2, help="--train_batch_size per GPU.")
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
        help="Training-script flags, e.g. --compile --attention_backend _native_cudnn --fp8 (last on the command "
        "line).",
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


def kernel_categories(kernels, events, widths):
    """The category of each GPU event in `kernels`."""
    launches = kernel_launches(events)
    return [kernel_category(e, launches.get(e.get("args", {}).get("correlation"), Launch()), widths) for e in kernels]


def top_kernels(by_kernel, category, per_step, count):
    """The `count` kernels of a category with the most time, [name (cut to 100 characters), ms per step]."""
    times = sorted(((dur, name) for (label, name), dur in by_kernel.items() if label == category), reverse=True)
    return [[name[:100], round(dur / per_step, 2)] for dur, name in times[:count]]


def summarize_trace(events, steps, wall_s, widths=None, top_gaps=8, min_gap_us=100, top_kernels_per_category=5):
    """Per-step summary (milliseconds) of one rank's Chrome-trace events over `steps` optimizer steps; `widths`
    (MatmulWidths) sort the GEMMs (none given: every GEMM is a base matmul)."""
    widths = widths or MatmulWidths()
    kernels = [e for e in events if e.get("cat") in GPU_CATEGORIES and e.get("dur", 0) > 0]
    labels = kernel_categories(kernels, events, widths)
    threads = launching_threads(events)
    cpu_events = [e for e in events if e.get("cat") in CPU_CATEGORIES and e.get("dur", 0) > 0]
    per_step = 1e3 * steps  # microseconds in the trace -> milliseconds per step
    by_category, by_kernel = {}, {}
    for e, label in zip(kernels, labels, strict=True):
        by_category[label] = by_category.get(label, 0) + e["dur"]
        by_kernel[label, e["name"]] = by_kernel.get((label, e["name"]), 0) + e["dur"]
    everything = [(e["ts"], e["ts"] + e["dur"]) for e in kernels]
    compute = [
        (e["ts"], e["ts"] + e["dur"]) for e, label in zip(kernels, labels, strict=True) if label != "communication"
    ]
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
    ranked = sorted(by_category.items(), key=lambda kv: -kv[1])
    return {
        "steps": steps,
        "step_ms": round(1e3 * wall_s / steps, 1),
        "kernel_ms": {k: round(v / per_step, 2) for k, v in ranked},
        "kernel_share_of_busy": {k: round(v / busy, 3) for k, v in ranked},
        "top_kernels_ms": {k: top_kernels(by_kernel, k, per_step, top_kernels_per_category) for k, _ in ranked},
        "matmul_widths": asdict(widths),
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


def matmul_widths(args):
    """The widths of a training run's arguments once its main() resolved them (--recipe) and of its transformer."""
    from cosmos_families import load_component_config

    config = load_component_config(args.pretrained_model_name_or_path, "transformer", args.revision)
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    adapter = max(1, hidden // args.adapter_reduction_factor) if args.use_temporal_adapters else None
    return MatmulWidths((args.lora_rank,), adapter, config.get("adaln_lora_dim"), hidden)


def probe(report_path, warmup, steps, train_argv):
    """Run the training script's main() and profile optimizer steps warmup+1 .. warmup+steps on this rank. It runs
    through run_main, as the script's own entry point does, so a failed run (out of memory, a NaN) prints its
    error line and exits instead of waiting on its DataLoader workers."""
    import importlib.util

    script = train_argv.pop(0)
    spec = importlib.util.spec_from_file_location("train_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    profiler = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA], record_shapes=True
    )
    train_args = module.parse_args(train_argv)  # main() resolves the --recipe's values in it
    state = {"calls": 0, "gc_s": 0.0, "collections": 0}
    step_logs = module.step_logs

    def time_garbage_collection(phase, info):
        if phase == "start":
            state["gc_start"] = time.perf_counter()
        elif "gc_start" in state and warmup <= state["calls"] < warmup + steps:  # the profiled steps only
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
                **summarize_trace(events, steps, wall, matmul_widths(train_args)),
                "python_gc_ms": round(1e3 * state["gc_s"] / steps, 1),
                "python_gc_runs": state["collections"],
            }
            with open(f"{report_path}.rank{rank}.json", "w") as f:
                json.dump(summary, f, indent=2)
        return logs

    module.step_logs = step_logs_with_profiler
    run_main(module.main, lambda: train_args)


def run_name(config_file, recipe):
    """profile_<name>.json and the run folder's name: the config's, and the recipe's when --recipes names it."""
    name = os.path.splitext(config_file)[0]
    return f"{name}_{recipe}" if recipe else name


def profile_config(args, model, cache, config_file, recipe):
    output = os.path.join(args.workdir, "profile_runs", run_name(config_file, recipe))
    subprocess.run(["rm", "-rf", output], check=True)
    os.makedirs(output)
    train_argv = [
        *bench_train.training_flags(model, cache, output, args.warmup + args.profile_steps),
        "--train_batch_size",
        str(args.batch_size),
        *(["--recipe", recipe] if recipe else []),
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
    log_path = os.path.join(args.out, f"profile_{run_name(config_file, recipe)}.log")  # kept if this is stopped
    with open(log_path, "w") as log:
        code = bench_train.run_logged(command, None, log, timeout=None)  # killed with this process if it is stopped
    run = {"config_file": config_file, "recipe": recipe, "batch_size": args.batch_size, "train_args": args.train_args}
    if code:  # a failed run is a result: its error line (out of memory, say); the whole output stays in log_path
        return {**run, "exit": code, **bench_train.run_failure(log_path), "log": log_path}
    return {
        **run,
        "unprofiled": unprofiled_rate(os.path.join(output, "losses.jsonl"), args.warmup),
        "ranks": [
            json.load(open(os.path.join(output, f)))
            for f in sorted(os.listdir(output))
            if f.startswith("profile.rank")
        ],
    }


def unprofiled_rate(loss_log, warmup):
    """Mean samples/s, step time and peak memory of warm-up steps 3..warmup (the first two compile; the profiler
    starts after step `warmup`), from the run's losses.jsonl. None with fewer than three warm-up steps."""
    with open(loss_log) as f:
        rows = [json.loads(line) for line in f]
    steady = [row for row in rows if 3 <= row["step"] <= warmup]
    if not steady:
        return None
    return {
        "steps": len(steady),
        "samples_per_s": round(float(np.mean([row["samples_per_s"] for row in steady])), 3),
        "step_time_s": round(float(np.mean([row["step_time_s"] for row in steady])), 4),
        "peak_memory_gib": round(max(row.get("peak_memory_gib", 0.0) for row in steady), 1),
        "allocator_retries": steady[-1].get("allocator_retries", 0),
    }


def check_args(args):
    """One line before any expensive work for a model folder or config file that is not there."""
    if args.model and not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise FileNotFoundError(f"--model {args.model}: no model_index.json there (not a diffusers checkpoint)")
    for config_file in args.configs:
        if not os.path.isfile(os.path.join(bench_train.REPO, "accelerate_configs", config_file)):
            raise FileNotFoundError(f"--configs {config_file}: no such file in accelerate_configs/")


def main(args):
    check_args(args)
    os.makedirs(args.out, exist_ok=True)
    model = args.model or bench_train.random_2b_checkpoint(args.workdir)
    cache = bench_train.synthetic_cache_for(model, args.workdir)
    for config_file in args.configs:
        # one profiled run per config and recipe
        for recipe in args.recipes or [None]:
            with stage(f"profiling {run_name(config_file, recipe)}"):
                result = profile_config(args, model, cache, config_file, recipe)
            report = os.path.join(args.out, f"profile_{run_name(config_file, recipe)}.json")
            with file_written_whole(report) as path, open(path, "w") as f:
                json.dump(result, f, indent=2)
            print(json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":
        probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:])
    else:
        run_main(main, parse_args)
