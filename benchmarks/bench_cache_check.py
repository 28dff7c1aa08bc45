#!/usr/bin/env python
"""What training's start-up check that every listed clip file exists costs on a large cache (CPU only).

Writes a synthetic cache of --num_clips manifest rows over --num_shards shard folders, each row with an empty clip
file, then times what train_cosmos_lora.py does before any model loads: reading every manifest
(cosmos_cache.list_cached_clips) and checking the files (cosmos_cache.missing_clip_files, one directory listing per
shard), against one os.stat per file for comparison. Prints one JSON line.

    python benchmarks/bench_cache_check.py --workdir /tmp/check --num_clips 1000000
"""

import argparse
import json
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from cosmos_cache import CACHE_INFO, MANIFEST, clip_file_name, list_cached_clips, missing_clip_files  # noqa: E402
from cosmos_cli import HelpFormatter


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the synthetic cache goes (deleted at the end).")
    parser.add_argument("--num_clips", type=int, default=1_000_000, help="Manifest rows (and empty clip files).")
    parser.add_argument("--num_shards", type=int, default=100, help="Shard folders the rows are spread over.")
    return parser.parse_args()


def write_cache(path, num_clips, num_shards):
    with open(os.path.join(path, CACHE_INFO), "w") as f:
        json.dump({"format_version": 2, "latent_shape": [16, 16, 32, 56]}, f)
    per_shard = num_clips // num_shards
    for s in range(num_shards):
        shard = os.path.join(path, f"shard_{s:05d}")
        os.makedirs(shard)
        rows = []
        for i in range(per_shard):
            name = clip_file_name(f"factory_{s:03d}_worker_{i // 100:03d}_{i:06d}", 0)
            open(os.path.join(shard, name), "w").close()
            row = {"file": name, "key": name[:-17], "clip_index": 0, "start_seconds": 0.0,
                   "caption_hash": "0123456789abcdef", "shape": [16, 16, 32, 56]}  # fmt: skip
            rows.append(json.dumps(row) + "\n")
        with open(os.path.join(shard, MANIFEST), "w") as f:
            f.writelines(rows)


def main(args):
    path = os.path.join(args.workdir, "cache")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    start = time.perf_counter()
    write_cache(path, args.num_clips, args.num_shards)
    written = time.perf_counter() - start
    start = time.perf_counter()
    clips = list_cached_clips(path)
    read_s = time.perf_counter() - start
    start = time.perf_counter()
    missing = missing_clip_files(clips)
    listing_s = time.perf_counter() - start
    start = time.perf_counter()
    stat_missing = [c.path for c in clips if not os.path.exists(c.path)]
    stat_s = time.perf_counter() - start
    assert missing == stat_missing == []
    result = {"clips": len(clips), "shards": args.num_shards, "write_s": round(written, 1),
              "read_manifests_s": round(read_s, 2), "check_by_listing_s": round(listing_s, 2),
              "check_by_stat_s": round(stat_s, 2)}  # fmt: skip
    print(json.dumps(result))
    shutil.rmtree(path)


if __name__ == "__main__":
    main(parse_args())
