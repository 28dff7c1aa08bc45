#!/usr/bin/env python
"""GPU memory of the whole-clip VAE decode per clip size, counted on the meta device: no GPU and no weights needed.

sample.py decodes a video in one pass over the whole clip (cosmos_vae.decode_whole_clip) when that pass's counted
peak fits in the free GPU memory, and in diffusers' frame-by-frame decode, with a warning, when it does not. For
each --sizes clip this reports that count (`cosmos_vae.counted_peak_bytes`): the peak of bytes held at once by the
tensors the decode creates, following each tensor's storage from the op that made it until its last reference
goes, in eager bf16 at batch 1. The latents and weights are not included, nor are kernel workspaces or the caching
allocator's rounding, so a card needs somewhat more (sample.py adds cosmos_vae.DECODE_MEMORY_MARGIN). With
--measure on a GPU, the real eager decode (random weights) runs too, and its torch.cuda.max_memory_allocated above
the memory before it is reported beside the count, or out_of_memory.

    python benchmarks/vae_decode_memory.py --out results/ --sizes 61x256x448 93x480x832 93x704x1280
"""

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import cosmos_vae  # noqa: E402
import make_random_cosmos  # noqa: E402
from cosmos_process import file_written_whole, run_main  # noqa: E402
from cosmos_video import parse_bucket  # noqa: E402

GIB = 2**30


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Where vae_decode_memory.json goes.")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["61x256x448", "93x480x832", "93x704x1280"],
        help="Clips as FRAMESxHEIGHTxWIDTH, checked as cache_latents.py's --buckets are (default: %(default)s).",
    )
    parser.add_argument(
        "--vae", choices=sorted(make_random_cosmos.VAE_CONFIGS), default="2b", help="VAE config (default: 2b)."
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="On a GPU, also run the real eager decode (random weights) and report its peak memory.",
    )
    return parser.parse_args()


def build_vae(config, device):
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan(**make_random_cosmos.VAE_CONFIGS[config]).to(torch.bfloat16).eval()


def latents_for(vae, bucket, device):
    return torch.randn(1, *bucket.latent_shape(vae.config.z_dim), device=device, dtype=torch.bfloat16)


@torch.no_grad()
def measured_peak_gib(vae, latents):
    """The real decode's torch.cuda.max_memory_allocated above the memory before it, or "out_of_memory"."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        cosmos_vae.decode_whole_clip(vae, latents)
    except torch.OutOfMemoryError:
        return "out_of_memory"
    return round((torch.cuda.max_memory_allocated() - before) / GIB, 2)


def main(args):
    buckets = [parse_bucket(size) for size in args.sizes]
    if args.measure and not torch.cuda.is_available():
        raise ValueError("--measure needs a GPU")
    os.makedirs(args.out, exist_ok=True)
    meta_vae = build_vae(args.vae, "meta")
    gpu_vae = build_vae(args.vae, "cuda") if args.measure else None
    results = {"vae": args.vae, "dtype": "bfloat16", "batch": 1, "sizes": []}
    for bucket in buckets:
        counted = cosmos_vae.counted_peak_bytes(meta_vae, latents_for(meta_vae, bucket, "meta"))
        row = {"clip": bucket.name, "counted_peak_bytes": counted, "counted_peak_gib": round(counted / GIB, 2)}
        if gpu_vae is not None:
            row["measured_peak_gib"] = measured_peak_gib(gpu_vae, latents_for(gpu_vae, bucket, "cuda"))
        print(json.dumps(row), flush=True)
        results["sizes"].append(row)
    with file_written_whole(os.path.join(args.out, "vae_decode_memory.json")) as path, open(path, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main, parse_args)
