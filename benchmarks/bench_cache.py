#!/usr/bin/env python
"""Caching speed on one GPU: the Wan2.1 VAE encode alone, and cache_latents.py end to end against a naive loop.

Everything runs in one call on the random-weight 2B checkpoint (the real-size Wan2.1 VAE in bf16) and synthetic
H.265 456x256 30 fps videos shaped like Egocentric-100K, at the reference clip (61 frames at 8 fps, 256x448).
Stages, in the order they run (each result is saved as soon as it is measured):

1. decode: CPU-seconds per clip of cache_latents.py's decode path (PyAV, resample, crop) in one process.
2. naive: one process decodes, converts on the CPU, encodes (diffusers' chunked encode, bf16, batch 4) and writes,
   one after the other.
3. chunked: cache_latents.py with --vae_encode chunked --no-compile_vae (decode workers, uint8 to the GPU, cuDNN
   autotuning, channels-last, batch 8, writes on a thread).
4. vae_only: clips already on the GPU: the chunked encode (plain batch 4, and as cache_latents.py runs it), the
   whole-clip encode eager, and compiled at each --compile_batches, with peak memory, compile time and a kernel
   profile of the compiled batch 8.
5. default: cache_latents.py with its GPU defaults (whole-clip encode, compiled).
6. vae_decode: diffusers' chunked decode against cosmos_vae.decode_whole_clip at the reference clip and at
   93x480x832 (sample.py's default size), batch 1.

Every encode is compared with a plain float32 chunked encode of the same clips (relative L2 of the latents). For the
end-to-end runs the report gives clips/s, the rate after the first batch (start-up and compilation), the share of
wall time the loop waited for decoded clips, and the CPU cores the decode workers kept busy. Each run starts from an
empty cache under --workdir, so nothing is skipped as already cached.
7. text: cache_latents.py's caption encoding (text encoder load, then seconds and bytes per unique caption) for
   each kind of embedding the model's family stores: T5 for Predict2; crossattn_proj outputs ("projected") and full
   Qwen2.5-VL embeddings for Predict2.5. The random 2.5 text encoder has the real 28 layers x 3584 width but a small
   MLP (1.0 B parameters against 8.3 B), so its seconds are a lower bound; the bytes are exact.

    python benchmarks/bench_cache.py --workdir /tmp/bench --out $OUT
    python benchmarks/bench_cache.py --family predict2.5 --workdir /tmp/bench25 --out $OUT
"""

import argparse
import json
import os
import resource
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
import bench_train
from bench_decode import one_torch_thread, refuse_videos_shorter_than_a_clip, video_clips
from bench_vae_encode import DEVICE, DTYPE, first_call_and_rate, profile_encode, synchronize

import cache_latents
import cosmos_vae
import make_synthetic_clips
from cosmos_cli import HelpFormatter
from cosmos_process import run_main
from cosmos_video import frames_to_vae_input

STAGES = ["decode", "naive", "chunked", "vae_only", "default", "vae_decode", "text"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Scratch folder: model, videos and caches go here.")
    parser.add_argument("--out", required=True, help="Folder for cache_results.json.")
    parser.add_argument(
        "--model",
        default=None,
        help="Checkpoint folder to use. Default: the random 2B checkpoint, written to --workdir.",
    )
    parser.add_argument("--num_videos", type=int, default=24, help="Synthetic videos for the end-to-end runs.")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="Length of each synthetic video (at least one 7.53 s clip)."
    )
    parser.add_argument("--naive_videos", type=int, default=4, help="Videos the (slow) naive loop caches.")
    parser.add_argument("--vae_clips", type=int, default=24, help="Clips timed per VAE-only variant.")
    parser.add_argument("--num_workers", type=int, default=8, help="cache_latents.py --num_workers.")
    parser.add_argument(
        "--compile_batches", type=int, nargs="*", default=[2, 4, 8], help="Batch sizes of the compiled encode."
    )
    parser.add_argument(
        "--family", choices=["predict2", "predict2.5"], default="predict2", help="Which random 2B model caches."
    )
    parser.add_argument("--captions", type=int, default=32, help="Unique captions the text stage encodes.")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=STAGES, help="Stages to run.")
    args = parser.parse_args()
    refuse_videos_shorter_than_a_clip(args.seconds)
    return args


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


def load_vae(model, dtype=DTYPE):
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=dtype).to(DEVICE).eval()


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE.type == "cuda" else None


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def vae_input(clips_uint8, dtype):
    return torch.stack([frames_to_vae_input(clip) for clip in clips_uint8]).to(dtype)


def relative_error(ours, reference):
    """Relative L2 difference, to 3 significant digits."""
    return float(f"{((ours.float() - reference.float()).norm() / reference.float().norm()).item():.3g}")


# ----------------------------------------------------------------------------------------------------------------
# VAE alone
# ----------------------------------------------------------------------------------------------------------------
def reference_clips(paths, count):
    """The first `count` clips of the videos, decoded as cache_latents.py decodes them, with their cache file names."""
    clips, names = [], []
    for path in paths:
        key = os.path.splitext(os.path.basename(path))[0]
        for index, clip in enumerate(video_clips(path)[: count - len(clips)]):
            clips.append(clip)
            names.append(cache_latents.clip_file_name(key, index))
        if len(clips) == count:
            break
    return torch.stack(clips), names


@torch.no_grad()
def reference_latents(model, clips):
    """Posterior means [N, 16, T', h, w] of a plain float32 chunked encode (diffusers' own), and the VAE config."""
    vae = load_vae(model, torch.float32)
    means = [
        vae.encode(vae_input(clips[i : i + 2].to(DEVICE), torch.float32)).latent_dist.mean.cpu()
        for i in range(0, len(clips), 2)
    ]
    config = vae.config
    del vae
    reset_peak()
    return torch.cat(means), config


def chunked_plain(vae):
    return lambda x: vae.encode(x).latent_dist.mean  # contiguous input, as a plain script runs it


@torch.no_grad()
def time_variant(encode, clips, batch_size, num_clips, flops, reference):
    """clips/s of one encode variant on one batch, after a first call (autotuning or compilation)."""
    x, repeats = vae_input(clips[:batch_size], DTYPE), max(1, num_clips // batch_size)
    reset_peak()
    latents, first_call_s, rate = first_call_and_rate(encode, x, repeats)
    count = min(batch_size, len(reference))
    return {
        "clips_per_s": round(rate, 2),
        "tflops": round(rate * flops / 1e12, 1),
        "rel_error_vs_fp32_chunked": relative_error(latents[:count].cpu(), reference[:count]),
        "first_call_s": round(first_call_s, 1),
        "peak_gib": peak_gib(),
    }


def encode_flops(vae, clip):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vae.encode(vae_input(clip[None], vae.dtype))
    return counter.get_total_flops()


def vae_only(model, clips, reference, args):
    """The encode variants on the same clips, each checked against the float32 chunked encode."""
    device_clips = clips[:8].to(DEVICE)
    vae = load_vae(model)
    flops = encode_flops(vae, device_clips[0])
    results = {"tflop_per_clip": round(flops / 1e12, 2)}
    variants = [
        ("chunked_batch4_plain", lambda: chunked_plain(vae), 4, False),
        ("chunked_batch8_cache_latents", lambda: cache_latents.ClipEncoder(vae, "chunked", False, 8), 8, True),
        ("whole_eager_batch8", lambda: cache_latents.ClipEncoder(vae, "whole", False, 8), 8, True),
    ]
    for batch_size in args.compile_batches:
        encoder = lambda b=batch_size: cache_latents.ClipEncoder(vae, "whole", True, b)
        variants.append((f"whole_compiled_batch{batch_size}", encoder, batch_size, True))
    for name, make_encoder, batch_size, benchmark in variants:
        torch.backends.cudnn.benchmark = benchmark
        try:
            encoder = make_encoder()
            results[name] = time_variant(encoder, device_clips, batch_size, args.vae_clips, flops, reference)
            if name == "whole_compiled_batch8" and DEVICE.type == "cuda":
                results["profile_" + name] = profile_encode(encoder, vae_input(device_clips, DTYPE))
        except Exception as error:  # report, don't lose the other figures
            results[name] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(name, results[name], flush=True)
    return results


@torch.no_grad()
def time_decode(decode, z, repeats=3):
    reset_peak()
    video = decode(z)  # first call: cuDNN autotuning
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        decode(z)
    synchronize()
    return video, {"seconds": round((time.perf_counter() - start) / repeats, 3), "peak_gib": peak_gib()}


def vae_decode(model, reference):
    """diffusers' chunked decode against the whole-clip decode, bf16, batch 1, cuDNN autotuning on."""
    torch.backends.cudnn.benchmark = True
    vae = load_vae(model)
    results = {}
    sizes = {"61x256x448": reference[:1].to(DEVICE, DTYPE)}
    if DEVICE.type == "cuda":  # sample.py's default size; the latents' spread matters little for speed
        sizes["93x480x832"] = torch.randn(1, 16, 24, 60, 104, device=DEVICE, dtype=DTYPE)
    for size, z in sizes.items():
        try:
            chunked, results[f"chunked_{size}"] = time_decode(lambda z: vae.decode(z).sample, z)
            whole, results[f"whole_{size}"] = time_decode(lambda z: cosmos_vae.decode_whole_clip(vae, z), z)
            results[f"whole_vs_chunked_rel_difference_{size}"] = relative_error(whole, chunked)
        except Exception as error:
            results[size] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(size, {k: v for k, v in results.items() if size in k}, flush=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------
def decode_cost(paths):
    """CPU-seconds and wall seconds per clip of the decode path in one process (PyAV uses its own threads), with torch
    at one thread as in cache_latents.py's DataLoader workers (at torch's default, a thread per core, the same decode
    took 0.44 CPU-s per clip against 0.16 on an H100 machine, RESULTS.md run 30)."""
    with one_torch_thread():
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
            x = vae_input(clips[first : first + 4], torch.float32).to(DEVICE, DTYPE)
            with torch.no_grad():
                latents = (
                    cosmos_vae.normalize_latents(vae.encode(x).latent_dist.mean.float(), vae.config).bfloat16().cpu()
                )
            for offset, latent in enumerate(latents):
                name = cache_latents.clip_file_name(os.path.splitext(os.path.basename(path))[0], first + offset)
                save_file({"latents": latent.contiguous()}, os.path.join(out_dir, name))
                written += 1
    return {"clips": written, "clips_per_s": round(written / (time.perf_counter() - start), 3)}


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def script_caching(model, video_dir, out_dir, num_workers, extra=()):
    """The real cache_latents.py on all videos; its own report gives the rates without model loading."""
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
        *extra,
    ]
    start, cpu = time.perf_counter(), children_cpu_seconds()
    log = subprocess.run(command, capture_output=True, text=True)
    if log.returncode:
        raise RuntimeError(log.stdout[-2000:] + log.stderr[-2000:])
    wall, cpu = time.perf_counter() - start, children_cpu_seconds() - cpu
    with open(os.path.join(out_dir, "shard_00000", "report.json")) as f:
        report = json.load(f)
    stats = cache_latents.verify_cache(out_dir)[0]
    return {
        "command": " ".join(command[1:]),
        "vae_encode": report["vae_encode"],
        "compile_vae": report["compile_vae"],
        "clips": report["written"],
        "clips_per_s": report["clips_per_second"],
        "clips_per_s_after_first_batch": report.get("clips_per_second_after_first_batch"),  # None: too few clips
        "first_batch_s": report["first_batch_seconds"],
        "data_wait_share": report["data_wait_share"],
        "decode_worker_cores": round(report["decode_workers_cpu_seconds"] / report["seconds"], 2),
        "all_cores_with_model_load": round(cpu / wall, 2),
        "wall_s_with_model_load": round(wall, 1),
        "bytes_per_clip": stats["bytes_per_clip"],
        "problems": stats["problems"],
    }


def text_path(model, out_dir, num_captions):
    """cache_latents.py's TextEmbedCache on unique captions: load seconds, seconds and bytes per caption, per kind."""
    from cosmos_cache import caption_hash, text_embed_path
    from cosmos_families import detect_family, load_component_config, load_text_projection, text_embed_kind

    family, config = detect_family(model), load_component_config(model, "transformer")
    results = {}
    for choice in ["projected", "full"] if text_embed_kind(config, "full") == "full" else ["projected"]:
        shutil.rmtree(out_dir, ignore_errors=True)
        args = argparse.Namespace(pretrained_model_name_or_path=model, revision=None, text_embeds=choice)
        kind = text_embed_kind(config, choice)
        start = time.perf_counter()
        projection, _ = load_text_projection(model, None, family, kind, torch.device("cuda"), torch.bfloat16)
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


def compare_latents(dir_a, dir_b):
    """Largest relative difference between the latents of the same clips in two caches."""
    names = sorted(set(os.listdir(dir_a)) & set(os.listdir(dir_b)) - {"manifest.jsonl", "report.json"})
    worst = max(
        relative_error(load_file(os.path.join(dir_a, n))["latents"], load_file(os.path.join(dir_b, n))["latents"])
        for n in names
    )
    return {"clips_compared": len(names), "max_rel_difference": worst}


def compare_with_reference(cache_dir, names, reference, vae_config):
    """Relative L2 of a cache's stored latents of the reference clips against their float32 chunked encode."""
    expected = cosmos_vae.normalize_latents(reference, vae_config)
    errors = [
        relative_error(load_file(os.path.join(cache_dir, name))["latents"], latent)
        for name, latent in zip(names, expected, strict=True)
        if os.path.exists(os.path.join(cache_dir, name))  # the naive loop caches only the first videos
    ]
    return {"clips": len(errors), "max": max(errors), "mean": float(f"{sum(errors) / len(errors):.3g}")}


def main(args):
    bench_train.refuse_a_missing_model_folder(args.model)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.workdir, exist_ok=True)
    model = args.model or bench_train.random_2b_checkpoint(args.workdir, args.family)
    video_dir, paths = make_videos(args.workdir, args.num_videos, args.seconds)
    results = {
        "device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
        "family": args.family,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
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

    # Eight clips of the first videos, decoded as cache_latents.py decodes them, and their float32 chunked encode.
    clips, names = reference_clips(paths, 8)
    reference, vae_config = reference_latents(model, clips)
    caches = {
        "naive": os.path.join(args.workdir, "naive"),
        "chunked": os.path.join(args.workdir, "chunked", "shard_00000"),
        "default": os.path.join(args.workdir, "default", "shard_00000"),
    }
    if "decode" in args.stages:
        record("decode", decode_cost(paths[:3]))
    if "naive" in args.stages:
        record("naive", naive_caching(model, paths[: args.naive_videos], caches["naive"]))
        record("naive_vs_fp32_chunked", compare_with_reference(caches["naive"], names, reference, vae_config))
    if "chunked" in args.stages:
        extra = ["--vae_encode", "chunked", "--no-compile_vae"]
        record(
            "chunked", script_caching(model, video_dir, os.path.dirname(caches["chunked"]), args.num_workers, extra)
        )
        record("chunked_vs_fp32_chunked", compare_with_reference(caches["chunked"], names, reference, vae_config))
    if "vae_only" in args.stages:
        record("vae_only", vae_only(model, clips, reference, args))
    if "default" in args.stages:
        record("default", script_caching(model, video_dir, os.path.dirname(caches["default"]), args.num_workers))
        record("default_vs_fp32_chunked", compare_with_reference(caches["default"], names, reference, vae_config))
    for a, b in [("naive", "chunked"), ("chunked", "default")]:
        if a in args.stages and b in args.stages:
            record(f"{a}_vs_{b}", compare_latents(caches[a], caches[b]))
    if "vae_decode" in args.stages:
        record("vae_decode", vae_decode(model, reference))
    if "text" in args.stages:
        record("text", text_path(model, os.path.join(args.workdir, "text_cache"), args.captions))


if __name__ == "__main__":
    run_main(main, parse_args)
