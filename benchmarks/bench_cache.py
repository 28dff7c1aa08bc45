#!/usr/bin/env python
"""Caching speed on one GPU: the Wan2.1 VAE alone, and cache_latents.py end to end against a naive loop.

Everything runs in one call on the random-weight 2B checkpoint (the real-size Wan2.1 VAE) and synthetic H.265
456x256 30 fps videos shaped like Egocentric-100K, at the reference clip (61 frames at 8 fps, 256x448):

1. VAE encode alone, on clips already on the GPU: bf16 batch 4 as a plain script would run it, then with cuDNN
   autotuning, a larger batch, channels-last-3d memory and torch.compile, each checked against the first within
   bf16 tolerance, plus a kernel profile of the fastest.
2. Decode only: CPU-seconds per clip of cache_latents.py's decode path (PyAV, resample, crop), which gives the cores
   needed to feed one GPU.
3. End to end: a naive one-process loop (decode, convert on the CPU, encode, write, one after the other) and the real
   cache_latents.py (decode in DataLoader workers, uint8 to the GPU, cuDNN autotuning, channels-last, batch 8,
   writes on a thread). Each run starts from an empty --workdir cache, so nothing is skipped as already cached.
4. Text path: cache_latents.py's caption encoding (text encoder load, then seconds and bytes per unique caption) for
   each kind of embedding the model's family stores: T5 for Predict2; crossattn_proj outputs ("projected") and full
   Qwen2.5-VL embeddings for Predict2.5. The random 2.5 text encoder has the real 28 layers x 3584 width but a small
   MLP (1.0 B parameters against 8.3 B), so its seconds are a lower bound; the bytes are exact.

    python benchmarks/bench_cache.py --workdir /tmp/bench --out $OUT
    python benchmarks/bench_cache.py --family predict2.5 --workdir /tmp/bench25 --out $OUT
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool

import torch
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import bench_train  # noqa: E402
from bench_decode import video_clips  # noqa: E402

import cache_latents  # noqa: E402
import make_synthetic_clips  # noqa: E402
from cosmos_model import normalize_latents
from cosmos_video import frames_to_vae_input


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="Scratch folder: model, videos and caches go here.")
    parser.add_argument("--out", required=True, help="Folder for cache_results.json.")
    parser.add_argument("--num_videos", type=int, default=24, help="Synthetic videos for the end-to-end runs.")
    parser.add_argument("--seconds", type=float, default=60.0, help="Length of each synthetic video.")
    parser.add_argument("--naive_videos", type=int, default=4, help="Videos the (slow) naive loop caches.")
    parser.add_argument("--vae_clips", type=int, default=24, help="Clips timed per VAE-only variant.")
    parser.add_argument("--num_workers", type=int, default=8, help="cache_latents.py --num_workers.")
    parser.add_argument(
        "--family", choices=["predict2", "predict2.5"], default="predict2", help="Which random 2B model caches."
    )
    parser.add_argument("--captions", type=int, default=32, help="Unique captions the text stage encodes.")
    parser.add_argument(
        "--stages",
        nargs="+",
        choices=["end_to_end", "vae_only", "text"],
        default=["end_to_end", "vae_only", "text"],
        help="end_to_end: decode cost, naive loop and cache_latents.py; vae_only: the VAE variants; text: the "
        "caption encoding path.",
    )
    return parser.parse_args()


def write_video(task):
    index, seconds, path = task
    frames = make_synthetic_clips.render_video(index, round(seconds * 30), 256, 456)
    with open(path, "wb") as f:
        f.write(make_synthetic_clips.encode_mp4(frames, 30.0, "h265"))


def make_videos(workdir, num_videos, seconds):
    folder = os.path.join(workdir, "videos")
    os.makedirs(folder, exist_ok=True)
    tasks = [(i, seconds, os.path.join(folder, f"video{i:03d}.mp4")) for i in range(num_videos)]
    with Pool(os.cpu_count()) as pool:
        pool.map(write_video, [t for t in tasks if not os.path.exists(t[2])])
    return folder, [t[2] for t in tasks]


def load_vae(model, dtype=torch.bfloat16):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=dtype).cuda().eval()


@torch.no_grad()
def encode(vae, clips_uint8, memory_format=torch.contiguous_format):
    x = torch.stack([frames_to_vae_input(clip) for clip in clips_uint8]).to(vae.dtype)
    return vae.encode(x.contiguous(memory_format=memory_format)).latent_dist.mean.float()


def time_encode(vae, clips, batch_size, num_clips, memory_format=torch.contiguous_format):
    batch, repeats = clips[:batch_size], max(1, num_clips // batch_size)
    encode(vae, batch, memory_format)  # warm-up: cuDNN autotuning or compilation
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        encode(vae, batch, memory_format)
    torch.cuda.synchronize()
    return repeats * batch_size / (time.perf_counter() - start)


def encode_flops(vae, clip):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        encode(vae, clip[None])
    return counter.get_total_flops()


def vae_only(model, clips, num_clips):
    """Clips/s of the VAE encode alone under each variant, each checked against a float32 encode."""
    gpu_clips = torch.stack(clips[:8]).cuda()
    reference = encode(load_vae(model, torch.float32), gpu_clips[:2])
    vae = load_vae(model)
    flops = encode_flops(vae, gpu_clips[0])
    results = {"tflop_per_clip": round(flops / 1e12, 2)}
    variants = [
        ("bf16_batch4", 4, False, torch.contiguous_format),
        ("bf16_batch4_cudnn_benchmark", 4, True, torch.contiguous_format),
        ("bf16_batch8_cudnn_benchmark", 8, True, torch.contiguous_format),
        ("bf16_batch4_cudnn_benchmark_channels_last", 4, True, torch.channels_last_3d),
        ("bf16_batch8_cudnn_benchmark_channels_last", 8, True, torch.channels_last_3d),
    ]
    for name, batch_size, benchmark, memory_format in variants:
        torch.backends.cudnn.benchmark = benchmark
        rate = time_encode(vae, gpu_clips, batch_size, num_clips, memory_format)
        results[name] = variant_result(rate, flops, encode(vae, gpu_clips[:2], memory_format), reference)
        print(name, results[name], flush=True)
    results["profile_batch8_channels_last"] = profile_encode(vae, gpu_clips, torch.channels_last_3d)
    name = "bf16_batch8_cudnn_benchmark_channels_last_compile"
    try:
        vae.encoder.compile()
        start = time.perf_counter()
        encode(vae, gpu_clips, torch.channels_last_3d)
        compile_s = time.perf_counter() - start
        rate = time_encode(vae, gpu_clips, 8, num_clips, torch.channels_last_3d)
        results[name] = variant_result(rate, flops, encode(vae, gpu_clips[:2], torch.channels_last_3d), reference)
        results[name]["first_call_s"] = round(compile_s, 1)
        results["profile_batch8_channels_last_compile"] = profile_encode(vae, gpu_clips, torch.channels_last_3d)
    except Exception as error:  # report, don't lose the other figures
        results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
    print(name, results[name], flush=True)
    return results


def variant_result(rate, flops, latents, reference):
    error = ((latents - reference).norm() / reference.norm()).item()
    return {"clips_per_s": round(rate, 2), "tflops": round(rate * flops / 1e12, 1), "rel_error_vs_fp32": error}


def profile_encode(vae, batch, memory_format):
    """GPU kernel time per clip of one batch encode, grouped: convolutions, layout copies, the rest."""
    from torch.profiler import ProfilerActivity, profile

    encode(vae, batch, memory_format)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        encode(vae, batch, memory_format)
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        if event.device_type.name == "CUDA" and event.self_device_time_total > 0:
            kernels[event.key] = event.self_device_time_total / 1e3 / len(batch)
    groups = {
        "convolution": ("conv", "xmma", "fprop", "implicit", "cutlass", "gemm", "nvjet", "sm90"),
        "layout copies": ("nchw", "nhwc", "transpose", "copy", "cat", "pad"),
    }
    totals = {"convolution": 0.0, "layout copies": 0.0, "elementwise and other": 0.0}
    for name, ms in kernels.items():
        group = next(
            (g for g, keys in groups.items() if any(k in name.lower() for k in keys)), "elementwise and other"
        )
        totals[group] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:8]
    return {
        "ms_per_clip": {k: round(v, 1) for k, v in totals.items()},
        "top_kernels_ms": [[name[:90], round(ms, 1)] for name, ms in top],
    }


def decode_cost(paths):
    """CPU-seconds and wall seconds per clip of the decode path in one process (PyAV uses its own threads)."""
    cpu, wall, clips = time.process_time(), time.perf_counter(), 0
    for path in paths:
        clips += len(video_clips(path))
    return {
        "clips": clips,
        "cpu_s_per_clip": round((time.process_time() - cpu) / clips, 4),
        "wall_s_per_clip": round((time.perf_counter() - wall) / clips, 4),
    }


def naive_caching(model, paths, out_dir):
    """Decode, convert on the CPU, encode and write, one after another in one process: clips/s."""
    torch.backends.cudnn.benchmark = False
    vae = load_vae(model)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.makedirs(out_dir)
    start, written = time.perf_counter(), 0
    for path in paths:
        clips = video_clips(path)
        for first in range(0, len(clips), 4):
            x = torch.stack([frames_to_vae_input(c) for c in clips[first : first + 4]]).to("cuda", torch.bfloat16)
            with torch.no_grad():
                latents = normalize_latents(vae.encode(x).latent_dist.mean.float(), vae.config).bfloat16().cpu()
            for offset, latent in enumerate(latents):
                name = cache_latents.clip_file_name(os.path.splitext(os.path.basename(path))[0], first + offset)
                save_file({"latents": latent.contiguous()}, os.path.join(out_dir, name))
                written += 1
    return {"clips": written, "clips_per_s": round(written / (time.perf_counter() - start), 3)}


def script_caching(model, video_dir, out_dir, num_workers):
    """The real cache_latents.py on all videos; its own report gives the rate without model loading."""
    shutil.rmtree(out_dir, ignore_errors=True)
    command = [
        sys.executable,
        os.path.join(REPO, "cache_latents.py"),
        "--pretrained_model_name_or_path",
        model,
        "--video_dir",
        video_dir,
        "--output_dir",
        out_dir,
        "--num_workers",
        str(num_workers),
        "--verify",
    ]
    start = time.perf_counter()
    log = subprocess.run(command, capture_output=True, text=True)
    if log.returncode:
        raise RuntimeError(log.stdout[-2000:] + log.stderr[-2000:])
    with open(os.path.join(out_dir, "shard_00000", "report.json")) as f:
        report = json.load(f)
    stats = cache_latents.verify_cache(out_dir)[0]
    return {
        "command": " ".join(command[1:]),
        "clips": report["written"],
        "clips_per_s": report["clips_per_second"],
        "wall_s_with_model_load": round(time.perf_counter() - start, 1),
        "bytes_per_clip": stats["bytes_per_clip"],
        "problems": stats["problems"],
    }


def text_path(model, out_dir, num_captions):
    """cache_latents.py's TextEmbedCache on unique captions: load seconds, seconds and bytes per caption, per kind."""
    from cosmos_cache import caption_hash, text_embed_path
    from cosmos_families import detect_family, load_component_config, text_embed_kind

    family, config = detect_family(model), load_component_config(model, "transformer")
    results = {}
    for choice in ["projected", "full"] if family.name == "predict2.5" else ["projected"]:
        shutil.rmtree(out_dir, ignore_errors=True)
        args = argparse.Namespace(pretrained_model_name_or_path=model, revision=None, text_embeds=choice)
        kind = text_embed_kind(config, choice)
        start = time.perf_counter()
        projection, _ = cache_latents.load_text_projection(args, family, kind, torch.device("cuda"), torch.bfloat16)
        cache = cache_latents.TextEmbedCache(out_dir, args, family, projection, torch.device("cuda"), torch.bfloat16)
        cache.load()
        torch.cuda.synchronize()
        load_s = time.perf_counter() - start
        captions = [
            f"caption {i}: a worker's hands assemble part {i} at a factory bench." for i in range(num_captions)
        ]
        cache.ensure(captions[0])  # warm-up
        start = time.perf_counter()
        for caption in captions[1:]:
            cache.ensure(caption)
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / (num_captions - 1)
        size = os.path.getsize(text_embed_path(out_dir, caption_hash(captions[1])))
        results[kind] = {"load_s": round(load_s, 1), "s_per_caption": round(seconds, 4), "bytes_per_caption": size}
        cache.release()
    return results


def compare_latents(naive_dir, script_dir):
    """Largest relative difference between the naive loop's and the script's latents of the same clips."""
    worst, count = 0.0, 0
    for name in sorted(os.listdir(naive_dir)):
        ours = load_file(os.path.join(script_dir, "shard_00000", name))["latents"].float()
        theirs = load_file(os.path.join(naive_dir, name))["latents"].float()
        worst = max(worst, ((ours - theirs).norm() / theirs.norm()).item())
        count += 1
    return {"clips_compared": count, "max_rel_difference": worst}


def main():
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    model = bench_train.random_2b_checkpoint(args.workdir, args.family)
    video_dir, paths = make_videos(args.workdir, args.num_videos, args.seconds)
    results = {
        "device": torch.cuda.get_device_name(0),
        "family": args.family,
        "cpu_count": os.cpu_count(),
        "args": vars(args),
        "date": time.strftime("%Y-%m-%d"),
        "clip": "61x256x448 at 8 fps",
        "source": f"H.265 456x256 30 fps, {args.seconds:.0f} s each",
    }

    def record(name, value):  # saved after every stage, so a cut-off run keeps what it measured
        results[name] = value
        print(name, value, flush=True)
        with open(os.path.join(args.out, "cache_results.json"), "w") as f:
            json.dump(results, f, indent=2)

    naive_dir, script_dir = os.path.join(args.workdir, "naive"), os.path.join(args.workdir, "cache_latents")
    if "end_to_end" in args.stages:
        record("decode", decode_cost(paths[:3]))
        record("naive", naive_caching(model, paths[: args.naive_videos], naive_dir))
        record("cache_latents", script_caching(model, video_dir, script_dir, args.num_workers))
        record("naive_vs_script", compare_latents(naive_dir, script_dir))
    if "vae_only" in args.stages:
        record("vae_only", vae_only(model, video_clips(paths[0]), args.vae_clips))
    if "text" in args.stages:
        record("text", text_path(model, os.path.join(args.workdir, "text_cache"), args.captions))


if __name__ == "__main__":
    main()
