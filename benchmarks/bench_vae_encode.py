#!/usr/bin/env python
"""The whole-clip VAE encode on one GPU by memory format and batch size, against the card's bf16 peak.

cache_latents.py encodes clips with cosmos_vae.encode_whole_clip, compiled. Its input is channels-last (NDHWC), but
the Wan2.1 VAE's weights are stored channels-first; a profile then shows cuDNN converting layouts around its
convolutions. This benchmark times, on the real-size Wan2.1 VAE (random weights, bf16) at the reference clip
(61x256x448), smooth random videos:

- `input_cl`: channels-last input only (cache_latents.py until this benchmark), compiled, at each --batch_sizes;
- `all_cl`: the convolution weights channels-last too (`cosmos_vae.convolutions_channels_last`), compiled;
- `all_cl_eager`: the same without compile;
- `all_cl_tuned`: `all_cl` with inductor's coordinate-descent tuning of its Triton kernels (block sizes searched per
  kernel at compile time);

each as clips/s, TFLOP/s and fraction of the bf16 matmul peak measured in the same process, first-call seconds
(compile and cuDNN autotuning), peak memory, the relative L2 distance from a float32 chunked encode (diffusers' own)
of the same clips, and a kernel profile (convolutions, layout conversions, inductor's Triton kernels, the rest).
Last, the compile's cost at start-up: a fresh process compiles the default encode with an empty inductor cache, and
again with the cache the first one filled (what a SLURM array task pays with TORCHINDUCTOR_CACHE_DIR on shared
storage).

    python benchmarks/bench_vae_encode.py --out results/
    python benchmarks/bench_vae_encode.py --size tiny --height 64 --width 112 --frames 17 --out /tmp/v  # CPU smoke
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import matmul_peak_tflops  # noqa: E402

import cosmos_vae  # noqa: E402
from cosmos_cli import HelpFormatter

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU only to try a script on tiny settings
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32  # bf16 convolutions crawl on CPU
# Profile categories by kernel name, matched in this order: inductor names its Triton kernels after every op they fuse
# ("triton_poi_fused_..._convolution_..." is the bias add, norm and activation after a convolution), so those are
# told apart before the convolutions are.
KERNEL_GROUPS = {
    "layout conversions": ("nchwtonhwc", "nhwctonchw", "transpose", "permute"),
    "Triton kernels (norms, activations, padding, adds)": ("triton",),
    "convolutions": ("conv", "xmma", "fprop", "implicit", "cutlass", "gemm", "nvjet", "sm90", "cudnn"),
}
OTHER_KERNELS = "the rest"
VARIANTS = ["input_cl", "all_cl", "all_cl_eager", "all_cl_tuned"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for vae_encode_results.json.")
    add_clip_arguments(parser)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[2, 4, 8], help="Clips per compiled call.")
    parser.add_argument("--clips", type=int, default=32, help="Clips timed per variant.")
    parser.add_argument("--profile_batch", type=int, default=4, help="Batch size profiled for each memory format.")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS, help="Encodes to time.")
    parser.add_argument(
        "--cudnn_benchmark_limit",
        type=int,
        default=10,
        help="Algorithms cuDNN's search tries per convolution (torch.backends.cudnn.benchmark_limit; PyTorch's "
        "default 10; 0: all).",
    )
    parser.add_argument(
        "--startup", action=argparse.BooleanOptionalAction, default=True, help="Time compile cold and warm."
    )
    parser.add_argument("--startup_child", action="store_true", help=argparse.SUPPRESS)  # one start-up measurement
    return parser.parse_args(argv)


def add_clip_arguments(parser):
    """The VAE (--size) and clip (--frames, --height, --width) of a VAE benchmark; the reference clip by default."""
    parser.add_argument("--size", choices=["2b", "tiny"], default="2b", help="The real Wan2.1 VAE, or a tiny one.")
    parser.add_argument("--frames", type=int, default=61, help="Frames per clip (4k+1).")
    parser.add_argument("--height", type=int, default=256, help="Clip height.")
    parser.add_argument("--width", type=int, default=448, help="Clip width.")


def clip_flags(args):
    """add_clip_arguments' flags with the values in args, for a child process of a VAE benchmark."""
    flags = {"--size": args.size, "--frames": args.frames, "--height": args.height, "--width": args.width}
    return [str(part) for flag in flags.items() for part in flag]


def build_vae(size, dtype):
    from diffusers import AutoencoderKLWan

    import make_random_cosmos

    torch.manual_seed(0)
    return AutoencoderKLWan(**make_random_cosmos.VAE_CONFIGS[size]).to(DEVICE, dtype).eval().requires_grad_(False)


def smooth_videos(count, frames, height, width):
    """Videos in [-1, 1] [count, 3, frames, height, width]: random at 1/16 of the size, upsampled (image-like)."""
    generator = torch.Generator().manual_seed(1)
    small = torch.rand(count, 3, frames // 4 + 1, height // 16, width // 16, generator=generator)
    return F.interpolate(small, size=(frames, height, width), mode="trilinear") * 2 - 1


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def encode_flops(vae, clip):
    """FLOPs of one clip's encode as torch.utils.flop_counter counts them: diffusers' chunked encode and the
    whole-clip encode (the same convolutions; the count checks that)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name, encode in [
        ("chunked", lambda x: vae.encode(x)),
        ("whole", lambda x: cosmos_vae.encode_whole_clip(vae, x)),
    ]:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            encode(clip[None].to(DEVICE, vae.dtype))
        counts[name] = counter.get_total_flops()
    return counts


@torch.no_grad()
def reference_means(vae, videos):
    """Posterior means of a float32 chunked encode (diffusers' own) of the videos."""
    vae32 = build_vae_like(vae, torch.float32)
    return torch.cat([vae32.encode(v[None].to(DEVICE)).latent_dist.mean.cpu() for v in videos])


def build_vae_like(vae, dtype):
    copy = type(vae)(**vae.config).to(DEVICE, dtype).eval()
    copy.load_state_dict(vae.state_dict())
    return copy


def make_encode(vae, variant):
    """The encode of one variant: (function of a [B, 3, T, H, W] batch, the VAE it runs)."""
    if variant.startswith("all_cl"):
        vae = cosmos_vae.convolutions_channels_last(build_vae_like(vae, vae.dtype))
    encode = cosmos_vae.encode_whole_clip
    if variant == "all_cl_tuned":
        encode = torch.compile(encode, dynamic=False, options={"coordinate_descent_tuning": True})
    elif not variant.endswith("eager"):
        encode = torch.compile(encode, dynamic=False)
    return (lambda x: encode(vae, x.contiguous(memory_format=torch.channels_last_3d))), vae


@torch.no_grad()
def first_call_and_rate(encode, x, repeats):
    """encode(x)'s output and seconds on a first call (compile, autotuning), and clips/s over `repeats` more."""
    start = time.perf_counter()
    output = encode(x)
    synchronize()
    first_call_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(repeats):
        encode(x)
    synchronize()
    return output, first_call_s, repeats * len(x) / (time.perf_counter() - start)


@torch.no_grad()
def time_variant(encode, videos, batch_size, clips, flops, peak_tflops, reference):
    x = videos[:batch_size].to(DEVICE, DTYPE)
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    means, first_call_s, rate = first_call_and_rate(encode, x, repeats=max(1, clips // batch_size))
    count = min(batch_size, len(reference))
    error = (means[:count].float().cpu() - reference[:count]).norm() / reference[:count].norm()
    return {
        "batch_size": batch_size,
        "clips_per_s": round(rate, 2),
        "tflops": round(rate * flops / 1e12, 1),
        "peak_fraction": round(rate * flops / 1e12 / peak_tflops, 3) if peak_tflops else None,
        "first_call_s": round(first_call_s, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if DEVICE.type == "cuda" else None,
        "rel_l2_vs_fp32_chunked": float(f"{error.item():.3g}"),
    }


@torch.no_grad()
def profile_encode(encode, x):
    """GPU kernel milliseconds per clip of one call, by KERNEL_GROUPS, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    encode(x)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        encode(x)
        torch.cuda.synchronize()
    kernels = {
        e.key: e.self_device_time_total / 1e3 / len(x)
        for e in prof.key_averages()
        if e.device_type.name == "CUDA" and e.self_device_time_total > 0
    }
    totals = dict.fromkeys([*KERNEL_GROUPS, OTHER_KERNELS], 0.0)
    for name, ms in kernels.items():
        group = next((g for g, keys in KERNEL_GROUPS.items() if any(k in name.lower() for k in keys)), OTHER_KERNELS)
        totals[group] += ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:16]
    return {
        "ms_per_clip": {k: round(v, 2) for k, v in totals.items()},
        "top_kernels_ms_per_clip": [[name[:100], round(ms, 2)] for name, ms in top],
    }


def startup_seconds(args, cache_dir):
    """First-call seconds of the default encode in a fresh process with TORCHINDUCTOR_CACHE_DIR=cache_dir."""
    argv = [sys.executable, os.path.abspath(__file__), "--startup_child", "--out", args.out, *clip_flags(args)]
    argv += ["--batch_sizes", str(args.batch_sizes[0]), "--cudnn_benchmark_limit", str(args.cudnn_benchmark_limit)]
    return child_result(argv, env=dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir))


def child_result(argv, env=None, timeout=None):
    """The JSON line a child benchmark process prints last, or {"error": ...} if it fails or runs past `timeout`."""
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not done within {timeout} s"}
    if result.returncode:
        return {"error": result.stderr[-2000:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def startup_child(args):
    """Load, compile and run the default encode once; print the seconds of each part."""
    torch.backends.cudnn.benchmark = True  # as cache_latents.py: its search is part of the start-up
    torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    start = time.perf_counter()
    vae = build_vae(args.size, DTYPE)
    loaded = time.perf_counter()
    encode, _ = make_encode(vae, "all_cl")
    encode(smooth_videos(args.batch_sizes[0], args.frames, args.height, args.width).to(DEVICE, DTYPE))
    synchronize()
    done = time.perf_counter()
    print(json.dumps({"build_s": round(loaded - start, 1), "first_call_s": round(done - loaded, 1)}))


def main(args):
    if args.startup_child:
        return startup_child(args)
    os.makedirs(args.out, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "clip": f"{args.frames}x{args.height}x{args.width}",
        "args": vars(args),
    }

    def record(name, value):  # saved after every measurement, so a cut-off run keeps what it measured
        results[name] = value
        print(name, json.dumps(value), flush=True)
        with open(os.path.join(args.out, "vae_encode_results.json"), "w") as f:
            json.dump(results, f, indent=2)

    torch.backends.cudnn.benchmark = True  # as cache_latents.py
    torch.backends.cudnn.benchmark_limit = args.cudnn_benchmark_limit
    vae = build_vae(args.size, DTYPE)
    videos = smooth_videos(max(args.batch_sizes + [args.profile_batch]), args.frames, args.height, args.width)
    record("bf16_matmul_peak_tflops", round(matmul_peak_tflops(), 1) if DEVICE.type == "cuda" else None)
    counts = encode_flops(vae, videos[0])
    record("tflop_per_clip", {k: round(v / 1e12, 3) for k, v in counts.items()})
    reference = reference_means(vae, videos[:2])
    for variant in args.variants:
        batch_sizes = [4] if variant == "all_cl_eager" else args.batch_sizes
        encode, _ = make_encode(vae, variant)
        for batch_size in batch_sizes:
            try:
                row = time_variant(
                    encode,
                    videos,
                    batch_size,
                    args.clips,
                    counts["whole"],
                    results["bf16_matmul_peak_tflops"],
                    reference,
                )
            except torch.OutOfMemoryError:
                row = {"batch_size": batch_size, "out_of_memory": True}
            record(f"{variant}_batch{batch_size}", row)
        if DEVICE.type == "cuda" and variant != "all_cl_eager":
            x = videos[: args.profile_batch].to(DEVICE, DTYPE)
            record(f"profile_{variant}_batch{args.profile_batch}", profile_encode(encode, x))
        del encode
    if args.startup:
        del vae
        if DEVICE.type == "cuda":  # give the GPU memory this process cached back, for the start-up processes
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory() as cache_dir:
            record("startup_cold_cache", startup_seconds(args, cache_dir))
            record("startup_warm_cache", startup_seconds(args, cache_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
