#!/usr/bin/env python
"""Training read speed of the latent cache: one safetensors file per clip against packed shards of many clips.

Writes a synthetic cache shaped like cache_latents.py's (OUTPUT/shard_NNNNN/KEY__CCC.safetensors, tensor "latents",
metadata key/clip_index/caption_hash, manifest.jsonl), packs the same clips into files of `--clips_per_pack` named
tensors, and reads every clip in one shuffled order through a torch DataLoader (batch 2), as training does. Cold reads
first drop the files from the page cache (fsync + POSIX_FADV_DONTNEED, no root needed); warm reads follow at once.

    python benchmarks/bench_cache_read.py --workdir /scratch/bench_cache_read --out cache_read.json
"""

import argparse
import datetime
import json
import math
import os
import shutil
import socket
import sys
import time

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cosmos_cache import clip_file_name, list_cached_clips, rebuild_manifest
from cosmos_cli import HelpFormatter

CLIPS_PER_SHARD = 1000
FULL_DATASET_CLIPS = 47_000_000  # Egocentric-100K at the reference clip


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--workdir",
        default="/tmp/bench_cache_read",
        help="Folder for the two synthetic caches (its per_clip/ and packed/ are replaced).",
    )
    parser.add_argument("--num_clips", type=int, default=2000, help="Clips in the synthetic cache.")
    parser.add_argument(
        "--latent_shape",
        type=int,
        nargs=4,
        default=[16, 16, 32, 56],
        metavar=("C", "T", "H", "W"),
        help="bf16 latent shape of one clip; the default is the reference clip (61 frames, 256x448).",
    )
    parser.add_argument("--clips_per_pack", type=int, default=256, help="Clips per packed safetensors file.")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader workers.")
    parser.add_argument("--open_packs", type=int, default=8, help="Open pack handles each worker keeps (LRU).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the clip values and of the read order.")
    parser.add_argument("--keep_data", action="store_true", help="Keep the synthetic caches instead of deleting them.")
    parser.add_argument("--out", default=None, help="Write the results and machine details to this JSON file.")
    return parser.parse_args()


def make_clip_cache(root, num_clips, shape, seed):
    """One file per clip, named and labelled as cache_latents.py names them; returns the manifest rows."""
    generator = torch.Generator().manual_seed(seed)
    for shard in range(math.ceil(num_clips / CLIPS_PER_SHARD)):
        shard_dir = os.path.join(root, f"shard_{shard:05d}")
        os.makedirs(shard_dir)
        for i in range(shard * CLIPS_PER_SHARD, min(num_clips, (shard + 1) * CLIPS_PER_SHARD)):
            key, clip_index = f"synthetic/video_{i // 8:06d}", i % 8
            latents = torch.randn(shape, generator=generator).to(torch.bfloat16)
            save_file(
                {"latents": latents},
                os.path.join(shard_dir, clip_file_name(key, clip_index)),
                {"key": key, "clip_index": str(clip_index), "start_seconds": "0", "caption_hash": "0" * 16},
            )
        rebuild_manifest(shard_dir)
    return list_cached_clips(root)


def make_packs(root, clips, clips_per_pack):
    """Copies the clips into packs, one named tensor per clip; returns (pack path, tensor name) per clip."""
    os.makedirs(root)
    entries = []
    for start in range(0, len(clips), clips_per_pack):
        path = os.path.join(root, f"pack_{start // clips_per_pack:05d}.safetensors")
        tensors = {}
        for clip in clips[start : start + clips_per_pack]:
            with safe_open(clip.path, "pt") as f:
                tensors[os.path.splitext(clip.file)[0]] = f.get_tensor("latents")
        save_file(tensors, path)
        entries += [(path, name) for name in tensors]
    return entries


class ClipReader(torch.utils.data.Dataset):
    """Sample i is tensor `name` of file `path` in entries[i]. Each worker keeps its last `keep_open` files open
    (0: open a file per sample, as training does with one file per clip)."""

    def __init__(self, entries, keep_open=0):
        self.entries, self.keep_open, self.handles = entries, keep_open, {}

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        path, name = self.entries[index]
        handle = self.handles.pop(path) if path in self.handles else safe_open(path, "pt")
        if self.keep_open:
            self.handles[path] = handle  # dicts keep insertion order: the first key is the least recently used
            if len(self.handles) > self.keep_open:
                self.handles.pop(next(iter(self.handles)))
        return handle.get_tensor(name)


def drop_page_cache(paths):
    """Evicts the files' pages from the page cache (dirty pages are not evicted, hence the fsync); no root needed."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def read_all(dataset, order, num_workers):
    """Seconds to read every clip once in `order`, batch 2, as the training DataLoader does."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, sampler=order, num_workers=num_workers)
    start, seen = time.perf_counter(), 0
    for batch in loader:
        seen += batch.shape[0]
    assert seen == len(order), f"read {seen} of {len(order)} clips"
    return time.perf_counter() - start


def measure(name, dataset, files, clips_per_file, order, clip_bytes, args):
    """File count and size of a layout, and its read speed from a dropped page cache (cold), then again (warm)."""
    result = {
        "layout": name,
        "files": len(files),
        "bytes": sum(os.path.getsize(p) for p in files),
        "files_per_47M_clips": math.ceil(FULL_DATASET_CLIPS / clips_per_file),
    }
    drop_page_cache(files)
    for state in ("cold", "warm"):  # warm: read again at once, with the pages the cold pass left in the cache
        seconds = read_all(dataset, order, args.num_workers)
        result[f"{state}_clips_per_s"] = len(order) / seconds
        result[f"{state}_MB_per_s"] = len(order) * clip_bytes / seconds / 1e6
    return result


def print_table(results):
    print(
        f"{'layout':<9}{'files':>7}{'GB':>7}{'files/47M clips':>17}{'cold clips/s':>14}{'cold MB/s':>11}"
        f"{'warm clips/s':>14}{'warm MB/s':>11}"
    )
    for r in results:
        print(
            f"{r['layout']:<9}{r['files']:>7}{r['bytes'] / 1e9:>7.2f}{r['files_per_47M_clips']:>17,}"
            f"{r['cold_clips_per_s']:>14.0f}{r['cold_MB_per_s']:>11.0f}{r['warm_clips_per_s']:>14.0f}"
            f"{r['warm_MB_per_s']:>11.0f}"
        )


def main():
    args = parse_args()
    clip_dir, pack_dir = os.path.join(args.workdir, "per_clip"), os.path.join(args.workdir, "packed")
    for folder in (clip_dir, pack_dir):
        shutil.rmtree(folder, ignore_errors=True)
    clips = make_clip_cache(clip_dir, args.num_clips, args.latent_shape, args.seed)
    entries = make_packs(pack_dir, clips, args.clips_per_pack)
    per_clip, packed = ClipReader([(c.path, "latents") for c in clips]), ClipReader(entries, args.open_packs)
    for i in torch.randperm(len(clips), generator=torch.Generator().manual_seed(args.seed + 1))[:8].tolist():
        assert torch.equal(per_clip[i], packed[i]), f"clip {i} differs between the layouts"
    packed.handles.clear()  # workers start with no open packs
    order = torch.randperm(len(clips), generator=torch.Generator().manual_seed(args.seed)).tolist()
    clip_bytes = math.prod(args.latent_shape) * 2
    pack_files = sorted({path for path, _ in entries})
    results = [
        measure("per_clip", per_clip, [c.path for c in clips], 1, order, clip_bytes, args),
        measure("packed", packed, pack_files, args.clips_per_pack, order, clip_bytes, args),
    ]
    print(
        f"{os.cpu_count()} CPUs, {len(clips)} clips of {clip_bytes / 1e6:.2f} MB, {args.num_workers} workers, "
        f"batch 2, {args.clips_per_pack} clips per pack"
    )
    print_table(results)
    if args.out:
        report = {
            "hostname": socket.gethostname(),
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "args": vars(args),
            "clip_bytes": clip_bytes,
            "results": results,
        }
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    if not args.keep_data:
        shutil.rmtree(clip_dir)
        shutil.rmtree(pack_dir)


if __name__ == "__main__":
    main()
