#!/usr/bin/env python
"""Training throughput of the real train_cosmos_lora.py on the 2B model, one command, one GPU machine.

1. measures the bf16 matmul peak of GPU 0;
2. writes the random-weight 2B checkpoint of --family (tools/make_random_cosmos.py --size 2b);
3. writes a synthetic latent cache at the reference clip (61 frames at 256x448 -> latents [16, 16, 32, 56]);
4. runs `accelerate launch ... train_cosmos_lora.py` for each config for --steps steps and reads its losses.jsonl;
5. prints a table and writes results.json / results.md: samples/s, latent tokens/s, step time, peak memory per GPU,
   the CUDA allocator's retries (above 0: memory was full, and steps ran slower for it), useful TFLOP/s per GPU,
   fraction of the measured matmul peak, and the time spent waiting for data. A run that fails is a result too: its
   `error: ...` line, and out_of_memory when it ran out of GPU memory.

`1gpu_compile_cudnn_three_buckets` trains on a cache of three clip shapes (61x256x448, 61x448x256, 93x256x448):
against `1gpu_compile_cudnn` (one bucket) it gives what bucketing costs under --compile (compile_overhead_s: the
excess time of the steps that compiled) and the steady rate (steady_samples_per_s, steady_latent_tokens_per_s).

`1gpu_memory_93x704x1280_*` train NVIDIA's recipe clip (93x704x1280) at batch 1 in each checkpointing mode, for
the largest clip that trains on one card per mode; the `full_gcN` ones checkpoint only the first N blocks
(--gradient_checkpointing_blocks N).

Single-GPU configs run on the last GPU while multi-GPU configs run on the first three, two lanes at once.

    python benchmarks/bench_train.py --workdir /tmp/bench --out results/
    python benchmarks/bench_train.py --family predict2.5 --workdir /tmp/bench25 --out results25/ \
        --configs 1gpu_naive 1gpu_compile_cudnn

Predict2.5's synthetic cache holds projected text embeddings [512, 1024] (cache_latents.py's default), so the
transformer runs without its crossattn_proj, as a real run on such a cache does.
"""

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time

import psutil
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
from cosmos_cli import HelpFormatter
from cosmos_process import run_main  # noqa: E402

# name: (GPUs, accelerate config, extra launcher flags, extra train flags, (frames, height, width) or a tuple of
# them (a bucketed cache, equal clips per bucket), batch per GPU)
REFERENCE = (61, 256, 448)
# Mixed shapes: landscape, portrait, and a longer landscape clip. Against 1gpu_compile_cudnn (one bucket) this
# measures what bucketing costs under --compile: one static compile per bucket, then the steady rate.
THREE_BUCKETS = ((61, 256, 448), (61, 448, 256), (93, 256, 448))
# The clip of NVIDIA's LoRA and full post-training recipes: 93 frames at its "720" size, VIDEO_RES_SIZE_INFO["720"]
# ["16:9"] = 1280x704 (84,480 latent tokens, 2.3x 93x480x832's 37,440).
NVIDIA_720P = (93, 704, 1280)
FAST = ["--compile", "--attention_backend", "_native_cudnn"]
NO_RESHARD = ["--fsdp_reshard_after_forward", "false"]


def memory_config(clip, checkpointing, blocks=None):
    """One GPU, batch 1, --compile --attention_backend _native_cudnn, a --gradient_checkpointing mode (on the first
    `blocks` transformer blocks when given): whether and how fast a clip trains."""
    mode = [] if checkpointing == "none" else ["--gradient_checkpointing", checkpointing]
    if blocks:
        mode += ["--gradient_checkpointing_blocks", str(blocks)]
    return (1, "single_gpu.yaml", [], [*mode, *FAST], clip, 1)


CONFIGS = {
    "1gpu_naive": (1, "single_gpu.yaml", [], [], REFERENCE, 2),
    "1gpu_compile": (1, "single_gpu.yaml", [], ["--compile"], REFERENCE, 2),
    "1gpu_compile_cudnn": (1, "single_gpu.yaml", [], FAST, REFERENCE, 2),
    "1gpu_compile_cudnn_b4": (1, "single_gpu.yaml", [], FAST, REFERENCE, 4),
    # NVIDIA's recipe for the --family (LoRA on every block linear, power EMA, ...) against 1gpu_compile_cudnn
    "1gpu_compile_cudnn_nvidia_recipe": (1, "single_gpu.yaml", [], [*FAST, "--recipe", "nvidia"], REFERENCE, 2),
    "1gpu_compile_cudnn_b6": (1, "single_gpu.yaml", [], FAST, REFERENCE, 6),
    "1gpu_compile_cudnn_b7": (1, "single_gpu.yaml", [], FAST, REFERENCE, 7),
    "1gpu_compile_cudnn_b8": (1, "single_gpu.yaml", [], FAST, REFERENCE, 8),
    "1gpu_compile_cudnn_fp8": (1, "single_gpu.yaml", [], [*FAST, "--fp8"], REFERENCE, 2),
    "1gpu_compile_cudnn_fp8_b4": (1, "single_gpu.yaml", [], [*FAST, "--fp8"], REFERENCE, 4),
    "1gpu_memory_93x480x832_full_gc": (
        1,
        "single_gpu.yaml",
        [],
        ["--gradient_checkpointing", "full"],
        (93, 480, 832),
        1,
    ),
    "3gpu_fsdp2_naive": (3, "fsdp3.yaml", [], [], REFERENCE, 2),
    "3gpu_ddp_compile_cudnn": (3, "ddp3.yaml", [], FAST, REFERENCE, 2),
    "3gpu_fsdp2_compile_cudnn": (3, "fsdp3.yaml", [], FAST, REFERENCE, 2),
    "3gpu_fsdp2_compile_cudnn_no_reshard": (3, "fsdp3.yaml", NO_RESHARD, FAST, REFERENCE, 2),
    "3gpu_fsdp2_full_gc": (3, "fsdp3.yaml", [], ["--gradient_checkpointing", "full"], REFERENCE, 2),
    "3gpu_fsdp2_selective_gc": (3, "fsdp3.yaml", [], ["--gradient_checkpointing", "selective"], REFERENCE, 2),
    "3gpu_fsdp2_full_gc_compile_cudnn": (
        3,
        "fsdp3.yaml",
        [],
        ["--gradient_checkpointing", "full", *FAST],
        REFERENCE,
        2,
    ),
    "3gpu_fsdp2_selective_gc_compile_cudnn": (
        3,
        "fsdp3.yaml",
        [],
        ["--gradient_checkpointing", "selective", *FAST],
        REFERENCE,
        2,
    ),
    "1gpu_compile_cudnn_three_buckets": (1, "single_gpu.yaml", [], FAST, THREE_BUCKETS, 2),
    "1gpu_memory_93x480x832_full_gc_compile_cudnn": memory_config((93, 480, 832), "full"),
    "1gpu_memory_93x480x832_selective_gc_compile_cudnn": memory_config((93, 480, 832), "selective"),
    "1gpu_memory_93x480x832_compile_cudnn": memory_config((93, 480, 832), "none"),
    # NVIDIA's recipe clip, batch 1, in each checkpointing mode; a run out of memory is a result (out_of_memory)
    "1gpu_memory_93x704x1280_full_gc_compile_cudnn": memory_config(NVIDIA_720P, "full"),
    "1gpu_memory_93x704x1280_selective_gc_compile_cudnn": memory_config(NVIDIA_720P, "selective"),
    "1gpu_memory_93x704x1280_compile_cudnn": memory_config(NVIDIA_720P, "none"),
    # full checkpointing on the first 22 or 20 of the 28 blocks (12 or 10 on a 141 GB card): the others keep their
    # activations in the memory `full` leaves free
    "1gpu_memory_93x704x1280_full_gc22_compile_cudnn": memory_config(NVIDIA_720P, "full", 22),
    "1gpu_memory_93x704x1280_full_gc20_compile_cudnn": memory_config(NVIDIA_720P, "full", 20),
    "1gpu_memory_93x704x1280_full_gc12_compile_cudnn": memory_config(NVIDIA_720P, "full", 12),
    "1gpu_memory_93x704x1280_full_gc10_compile_cudnn": memory_config(NVIDIA_720P, "full", 10),
    # Clips between 93x480x832 and it, for the largest clip per mode on an 80 GB and a 141 GB card: NVIDIA's "480"
    # size (768x432) and its 720p 10 fps clip (61 frames)
    "1gpu_memory_93x432x768_compile_cudnn": memory_config((93, 432, 768), "none"),
    "1gpu_memory_61x704x1280_selective_gc_compile_cudnn": memory_config((61, 704, 1280), "selective"),
    "1gpu_memory_61x704x1280_compile_cudnn": memory_config((61, 704, 1280), "none"),
}
LOSS_WINDOW = 20  # steps per mean in loss_window_means (runs of at least two windows)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the checkpoint, caches and runs go.")
    parser.add_argument("--out", required=True, help="Where results.json and results.md go.")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=None,
        choices=list(CONFIGS),
        metavar="CONFIG",
        help=f"Configs to run, of: {', '.join(CONFIGS)}. Default: all of them.",
    )
    parser.add_argument(
        "--family", choices=["predict2", "predict2.5"], default="predict2", help="Which random 2B model to train."
    )
    parser.add_argument("--steps", type=int, default=14, help="Optimizer steps per run.")
    parser.add_argument("--warmup", type=int, default=6, help="Leading steps left out of the averages (compile).")
    parser.add_argument("--timeout", type=int, default=400, help="Seconds one run may take.")
    parser.add_argument(
        "--script",
        default=os.path.join(REPO, "train_cosmos_lora.py"),
        help="Training script to run (a copy being tuned, say).",
    )
    args = parser.parse_args()
    args.configs = args.configs or list(CONFIGS)
    return args


def matmul_peak_tflops(size=8192, repeats=20):
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def useful_flops_per_sample(frames, height, width, dim=2048, layers=28, text_len=512, text_dim=1024, mlp=4):
    """Matmul FLOPs of one training sample with frozen weights (no weight gradients; recomputation not counted).

    Forward: 2*N*D*D for each of q, k, v, out (self), q, out (cross), 2*N*D*4D twice (MLP), 2*L*Dt*D for cross k, v,
    attention 4*N*N*D (self) and 4*N*L*D (cross). Backward: the same linear FLOPs once (input gradients only) and the
    attention FLOPs twice.
    """
    tokens = ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)
    linear = 2 * tokens * dim * dim * 6 + 2 * 2 * tokens * dim * mlp * dim + 2 * 2 * text_len * text_dim * dim
    attention = 4 * tokens * tokens * dim + 4 * tokens * text_len * dim
    return layers * (2 * linear + 3 * attention), tokens


def synthetic_text_embeds(model_dir):
    """The cache's text_embeds entry for a model: T5 [512, D] (Predict2) or projected [512, D] (Predict2.5)."""
    from cosmos_families import (
        detect_family,
        load_component,
        load_component_config,
        projection_sha,
        text_embed_kind,
        text_embed_width,
    )

    config = load_component_config(model_dir, "transformer")
    kind = text_embed_kind(config, "projected")
    sha = None
    if kind == "projected":
        sha = projection_sha(load_component(model_dir, "transformer", family=detect_family(model_dir)).crossattn_proj)
    return {"kind": kind, "shape": [512, text_embed_width(config, kind)], "projection_sha": sha}


def write_synthetic_cache(path, model_dir, frames, height, width, num_clips=48, more_shapes=()):
    """A cache in cache_latents.py's format holding random latents, for throughput only: num_clips clips of each
    shape, (frames, height, width) and then more_shapes (a bucketed cache)."""
    from safetensors.torch import save_file

    import cache_latents
    from cosmos_cache import caption_hash, text_embed_path, write_text_embeds
    from cosmos_families import detect_family, load_component_config
    from cosmos_video import Bucket

    if os.path.isfile(os.path.join(path, "cache_info.json")):
        return
    vae_config = load_component_config(model_dir, "vae")
    buckets = [Bucket(*shape) for shape in [(frames, height, width), *more_shapes]]
    args = argparse.Namespace(
        buckets=buckets,
        fps=8.0,
        clip_stride_seconds=None,
        max_clips_per_video=None,
        resize_mode="crop",
        pretrained_model_name_or_path=model_dir,
    )
    text_embeds = synthetic_text_embeds(model_dir)
    config = cache_latents.cache_config(args, vae_config, text_embeds, detect_family(model_dir).name)
    shard = os.path.join(path, "shard_00000")
    os.makedirs(shard, exist_ok=True)
    caption = "synthetic"
    embeds = torch.randn(*text_embeds["shape"]).to(torch.bfloat16)
    write_text_embeds(text_embed_path(path, caption_hash(caption)), embeds, caption)
    for b, bucket in enumerate(buckets):
        for i in range(b * num_clips, (b + 1) * num_clips):
            meta = {
                "key": f"clip{i:04d}",
                "clip_index": "0",
                "start_seconds": "0",
                "caption_hash": caption_hash(caption),
                "num_frames": str(bucket.num_frames),
                "height": str(bucket.height),
                "width": str(bucket.width),
            }
            latents = torch.randn(bucket.latent_shape()).to(torch.bfloat16)
            save_file({"latents": latents}, os.path.join(shard, f"clip{i:04d}__000.safetensors"), metadata=meta)
    cache_latents.rebuild_manifest(shard)
    cache_latents.write_cache_info(path, config)


def config_shapes(entry):
    """The clip shapes of a config: one (frames, height, width) or a tuple of them."""
    return [entry] if isinstance(entry[0], int) else list(entry)


def cache_path(workdir, frames, height, width, more_shapes=()):
    names = ["x".join(map(str, shape)) for shape in [(frames, height, width), *more_shapes]]
    return os.path.join(workdir, "cache_" + "+".join(names))


def synthetic_cache_for(model_dir, workdir):
    """A synthetic cache at the reference clip for the 2B model, or at a small clip for a tiny one; its path."""
    from diffusers import CosmosTransformer3DModel

    text_dim = CosmosTransformer3DModel.load_config(model_dir, subfolder="transformer")["text_embed_dim"]
    size = REFERENCE if text_dim == 1024 else (9, 64, 112)
    cache = cache_path(workdir, *size)
    write_synthetic_cache(cache, model_dir, *size)
    return cache


def training_flags(model, cache, output, steps, checkpointing_steps=100000):
    """The train_cosmos_lora.py flags every benchmark run shares: no validation, no tracker, a constant LR."""
    return [
        "--pretrained_model_name_or_path",
        model,
        "--cache_dir",
        cache,
        "--output_dir",
        output,
        "--max_train_steps",
        str(steps),
        "--checkpointing_steps",
        str(checkpointing_steps),
        "--num_validation_clips",
        "0",
        "--report_to",
        "none",
        "--lr_scheduler",
        "constant",
    ]


def launch_command(config_file, script, *script_args, launch_flags=()):
    """`python -m accelerate.commands.launch --config_file CONFIG [launch flags] SCRIPT ARGS...`"""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file, *launch_flags]
    return [*launcher, script, *script_args]


def run_config(name, args, model_dir, gpus):
    num_gpus, config_file, launch_flags, extra, entry, batch = CONFIGS[name]
    shapes = config_shapes(entry)
    cache = cache_path(args.workdir, *shapes[0], shapes[1:])
    output = os.path.join(args.workdir, "runs", name)
    subprocess.run(["rm", "-rf", output], check=True)
    cmd = launch_command(
        os.path.join(REPO, "accelerate_configs", config_file),
        os.path.abspath(args.script),
        *training_flags(model_dir, cache, output, args.steps),
        "--train_batch_size",
        str(batch),
        "--dataloader_num_workers",
        "4",
        *extra,
        launch_flags=["--num_processes", str(num_gpus), *launch_flags],
    )
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(map(str, gpus)))
    start = time.time()
    log_path = os.path.join(args.out, f"{name}.log")
    with open(log_path, "w") as log:
        code = run_logged(cmd, env, log, args.timeout)
    result = {
        "name": name,
        "gpus": num_gpus,
        "flags": " ".join(launch_flags + extra),
        "clip": "+".join("x".join(map(str, shape)) for shape in shapes),
        "batch_per_gpu": batch,
        "exit": code,
        "wall_s": round(time.time() - start, 1),
    }
    if code != 0:
        result.update(run_failure(log_path))
    rows = []
    if os.path.isfile(os.path.join(output, "losses.jsonl")):
        rows = [json.loads(line) for line in open(os.path.join(output, "losses.jsonl"))]
    measured = rows[args.warmup :]
    if measured:
        # Every bucket holds as many clips, so a sample is each shape equally often.
        per_shape = [useful_flops_per_sample(*shape) for shape in shapes]
        flops, tokens = (sum(v) / len(shapes) for v in zip(*per_shape, strict=True))
        samples_per_s = sum(r["samples_per_s"] for r in measured) / len(measured)
        # A step that compiles (the first of each shape) takes far longer than the median: count the excess as
        # compile time, and average the rate over the other steps.
        median = statistics.median(r["step_time_s"] for r in measured)
        steady = [r for r in measured if r["step_time_s"] < 2 * median]
        result.update(
            steps_measured=len(measured),
            samples_per_s=round(samples_per_s, 3),
            samples_per_s_per_gpu=round(samples_per_s / num_gpus, 3),
            latent_tokens_per_s=round(samples_per_s * tokens),
            step_time_s=round(sum(r["step_time_s"] for r in measured) / len(measured), 3),
            peak_memory_gib=round(max(r.get("peak_memory_gib", 0) for r in rows), 1),
            allocator_retries=rows[-1].get("allocator_retries", 0),
            useful_tflops_per_gpu=round(samples_per_s * flops / num_gpus / 1e12, 1),
            data_wait_fraction=round(sum(r["data_wait_fraction"] for r in measured) / len(measured), 4),
            compile_overhead_s=round(sum(max(0.0, r["step_time_s"] - median) for r in rows), 1),
            steady_samples_per_s=round(sum(r["samples_per_s"] for r in steady) / len(steady), 3),
            steady_latent_tokens_per_s=round(sum(r["latent_tokens_per_s"] for r in steady) / len(steady)),
            final_loss=round(rows[-1]["loss"], 4),
            loss_window_means=loss_window_means(rows),
            export_ok=export_ok(output),
        )
    return result


RUNS = set()  # the runs under way (each the leader of its own process group)
STOPPING = threading.Event()  # set once this benchmark is stopped: no new run starts


def run_logged(cmd, env, log, timeout):
    """Run cmd in its own process group with its output in log; its exit code, or "timeout" after `timeout` seconds
    (None: no limit). However it ends (its own exit, the timeout, this benchmark stopped by a signal) the run is
    killed with every process it started: the launcher and its training processes would otherwise hold the GPUs."""
    if STOPPING.is_set():
        raise RuntimeError("the benchmark is stopping: no new run")
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    RUNS.add(process)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    finally:
        kill_run(process)
        RUNS.discard(process)


def kill_run(process):
    """SIGKILL a run's process group and every process the run started (whatever of them is left), and reap its
    leader. On several GPUs `accelerate launch` starts torch's elastic agent, which gives each training process a
    session of its own: a signal to the run's group alone would leave them training."""
    started = []
    if process.returncode is None:  # not reaped yet, so its PID is still its own
        with contextlib.suppress(psutil.NoSuchProcess):  # reaped meanwhile by another thread
            started = psutil.Process(process.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()


def run_in_threads(*targets):
    """Run each target in its own thread until all have ended. If this process is stopped meanwhile (SIGTERM or
    Ctrl-C under run_main), every run under way is killed before it exits, and no new one starts."""
    threads = [threading.Thread(target=target, daemon=True) for target in targets]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        STOPPING.set()
        for process in list(RUNS):
            kill_run(process)
        raise


def failure_line(log_path):
    """The `error: ...` line a failed training run ends with (cosmos_process.failure_line), or None."""
    with open(log_path, errors="replace") as log:
        lines = [line.strip() for line in log if line.startswith("error: ")]
    return lines[-1] if lines else None


def run_failure(log_path):
    """A failed run as a result: its error line, and whether it ran out of GPU memory."""
    error = failure_line(log_path)
    return {"error": error, "out_of_memory": error is not None and "out of memory" in error.lower()}


def loss_window_means(rows):
    """Mean loss over each full window of LOSS_WINDOW steps: two runs' curves compared within noise."""
    losses = [r["loss"] for r in rows]
    windows = range(0, len(losses) - LOSS_WINDOW + 1, LOSS_WINDOW)
    return [round(statistics.mean(losses[i : i + LOSS_WINDOW]), 4) for i in windows] if len(windows) > 1 else None


def export_ok(output):
    """The exported files hold every trained tensor in full (not empty, not a rank's slice, not all zeros)."""
    from safetensors.torch import load_file

    path = os.path.join(output, "pytorch_lora_weights.safetensors")
    if not os.path.isfile(path):
        return False
    with open(os.path.join(output, "adapter_config.json")) as f:
        config = json.load(f)  # the run's rank, targets, and whether adapters and proj_out trained
    lora, rank = load_file(path), config["lora_rank"]
    full_shapes = all(t.shape[0] == rank or t.shape[1] == rank for k, t in lora.items())
    b_trained = all(t.abs().sum() > 0 for k, t in lora.items() if ".lora_B." in k)
    expected_adapters = 28 * 6 * config["use_temporal_adapters"] + config["train_proj_out"]
    adapters_path = os.path.join(output, "temporal_adapters.safetensors")
    adapters = load_file(adapters_path) if os.path.isfile(adapters_path) else {}
    return (
        len(lora) == 28 * len(config["lora_target_modules"]) * 2
        and len(adapters) == expected_adapters
        and full_shapes
        and b_trained
    )


def lane(names, args, model_dir, gpus, results, lock):
    for name in names:
        result = run_config(name, args, model_dir, gpus)
        with lock:
            results.append(result)
            print(json.dumps(result), flush=True)
            write_results(results, args)


def write_results(results, args):
    with open(os.path.join(args.out, "results.json"), "w") as f:
        device = {"device": torch.cuda.get_device_name(0), "device_memory_gib": device_memory_gib()}
        json.dump({"matmul_peak_tflops": args.peak, **device, "results": results}, f, indent=2)
    header = [
        "name",
        "gpus",
        "clip",
        "batch_per_gpu",
        "samples_per_s",
        "samples_per_s_per_gpu",
        "latent_tokens_per_s",
        "step_time_s",
        "steady_samples_per_s",
        "compile_overhead_s",
        "peak_memory_gib",
        "allocator_retries",
        "useful_tflops_per_gpu",
        "data_wait_fraction",
        "export_ok",
        "exit",
        "out_of_memory",
    ]
    lines = ["| " + " | ".join(header) + " | peak fraction |", "|" + "---|" * (len(header) + 1)]
    for r in results:
        fraction = r["useful_tflops_per_gpu"] / args.peak if "useful_tflops_per_gpu" in r else None
        lines.append("| " + " | ".join(str(r.get(h, "")) for h in header) + f" | {fraction and round(fraction, 3)} |")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        device = f"{torch.cuda.get_device_name(0)} ({device_memory_gib()} GiB)"
        f.write(f"bf16 matmul peak measured: {args.peak:.0f} TFLOP/s on {device}\n\n")
        f.write("\n".join(lines) + "\n")


def device_memory_gib():
    """GPU 0's memory in GiB, above any run's peak_memory_gib (PyTorch's allocator peak) that fits on it."""
    return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)


def refuse_a_missing_model_folder(model):
    """A benchmark's --model, when given, must be a checkpoint folder (unset: the random 2B one is written)."""
    if model and not os.path.isdir(model):
        raise FileNotFoundError(f"--model {model}: no such checkpoint folder")


def random_2b_checkpoint(workdir, family="predict2"):
    """WORKDIR/random-cosmos-2b (Predict2) or WORKDIR/random-cosmos-predict2.5-2b, written by
    tools/make_random_cosmos.py --size 2b unless it is already there."""
    import make_random_cosmos

    model_dir = os.path.join(workdir, "random-cosmos-2b" if family == "predict2" else f"random-cosmos-{family}-2b")
    if not os.path.isfile(os.path.join(model_dir, "model_index.json")):
        start = time.time()
        argv = ["--family", family, "--size", "2b", "--output_dir", model_dir]
        make_random_cosmos.main(make_random_cosmos.parse_args(argv))
        print(f"2B checkpoint written in {time.time() - start:.0f} s", flush=True)
    return model_dir


def main(args):
    if not torch.cuda.is_available():
        raise ValueError("bench_train.py measures training on GPUs, and none is visible")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    args.peak = round(matmul_peak_tflops(), 1)
    print(f"bf16 matmul peak: {args.peak} TFLOP/s", flush=True)
    model_dir = random_2b_checkpoint(args.workdir, args.family)
    for name in args.configs:
        shapes = config_shapes(CONFIGS[name][4])
        write_synthetic_cache(
            cache_path(args.workdir, *shapes[0], shapes[1:]), model_dir, *shapes[0], more_shapes=shapes[1:]
        )
    count = torch.cuda.device_count()
    single = [n for n in args.configs if CONFIGS[n][0] == 1]
    multi = [n for n in args.configs if CONFIGS[n][0] > 1]
    results, lock = [], threading.Lock()
    run_in_threads(
        lambda: lane(multi, args, model_dir, list(range(3)), results, lock),
        lambda: lane(single, args, model_dir, [count - 1], results, lock),
    )
    print(open(os.path.join(args.out, "results.md")).read())


if __name__ == "__main__":
    run_main(main, parse_args)
