#!/usr/bin/env python
"""GPU memory of the whole-clip VAE encode and decode per clip size, counted on the meta device: no GPU and no weights.

cache_latents.py encodes clips, and sample.py decodes videos, in one pass over the whole clip (cosmos_vae's
encode_whole_clip and decode_whole_clip). Before a pass runs on a GPU, both count its peak and compare it, with
cosmos_vae.MEMORY_MARGIN, with the free memory: where a batch does not fit they take fewer clips per call, and where
one clip does not fit they encode chunked or decode frame by frame. For each --sizes clip this reports that count
for one clip, from the function the scripts call (`cosmos_vae.whole_clip_peak_bytes`): the peak of bytes held at once
by the tensors the eager bf16 pass creates, following each tensor's storage from the op that made it until its last
reference goes. The input and weights are not included, nor are kernel workspaces or the caching allocator's
rounding. With --measure on a GPU, the real eager passes (random weights) run too, and each one's
torch.cuda.max_memory_allocated above the memory before it is reported beside its count, or out_of_memory.

    python benchmarks/vae_memory.py --out results/ --sizes 61x256x448 93x480x832 93x704x1280 --measure
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
from cosmos_cli import HelpFormatter
from cosmos_process import file_written_whole, run_main  # noqa: E402
from cosmos_video import parse_bucket  # noqa: E402

GIB = 2**30
PASSES = {"encode": cosmos_vae.encode_whole_clip, "decode": cosmos_vae.decode_whole_clip}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="Where vae_memory.json goes.")
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["61x256x448", "93x480x832", "93x704x1280"],
        help="Clips as FRAMESxHEIGHTxWIDTH, checked as cache_latents.py's --buckets are.",
    )
    parser.add_argument("--vae", choices=sorted(make_random_cosmos.VAE_CONFIGS), default="2b", help="VAE config.")
    parser.add_argument(
        "--measure",
        action="store_true",
        help="On a GPU, also run the real eager encode and decode (random weights) and report their peak memory "
        "(without it: the count only).",
    )
    return parser.parse_args()


def build_vae(config, device):
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return AutoencoderKLWan(**make_random_cosmos.VAE_CONFIGS[config]).to(torch.bfloat16).eval()


def pass_input_shape(name, vae, bucket):
    """The shape of one clip, as the encode takes it, or of its latents, as the decode takes them."""
    if name == "encode":
        return (1, 3, bucket.num_frames, bucket.height, bucket.width)
    return (1, *bucket.latent_shape(vae.config.z_dim))


@torch.no_grad()
def measured_peak_gib(function, vae, shape):
    """The real pass's torch.cuda.max_memory_allocated above the memory before it (input of `shape` in [-1, 1]), or
    "out_of_memory"."""
    x = torch.rand(shape, device="cuda", dtype=torch.bfloat16) * 2 - 1
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        function(vae, x)
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
        row = {"clip": bucket.name}
        for name, function in PASSES.items():
            shape = pass_input_shape(name, meta_vae, bucket)
            counted = cosmos_vae.whole_clip_peak_bytes(meta_vae, function, shape)  # as the scripts count it
            row[f"{name}_counted_peak_bytes"] = counted
            row[f"{name}_counted_peak_gib"] = round(counted / GIB, 2)
            if gpu_vae is not None:
                row[f"{name}_measured_peak_gib"] = measured_peak_gib(function, gpu_vae, shape)
        print(json.dumps(row), flush=True)
        results["sizes"].append(row)
    with file_written_whole(os.path.join(args.out, "vae_memory.json")) as path, open(path, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    run_main(main, parse_args)
