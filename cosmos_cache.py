"""The latent cache's file format, written by cache_latents.py and read by train_cosmos_lora.py and sample.py.

    CACHE/cache_info.json                   config, model id, VAE normalization, counts
    CACHE/text_embeds/HASH.safetensors      text embedding per unique caption ("prompt_embeds")
    CACHE/shard_00000/KEY__000.safetensors  one clip's normalized latents ("latents", bfloat16) + metadata
    CACHE/shard_00000/manifest.jsonl        one row per clip file
    CACHE/shard_00000/report.json           what the last run of this shard cached and skipped

Every file is written to a temporary name and renamed when complete, so a killed job never leaves a partial file.
"""

import functools
import glob
import hashlib
import json
import os
import random
from collections import Counter

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cosmos_model import vae_normalization
from cosmos_video import latent_shape

CACHE_INFO = "cache_info.json"
TEXT_EMBEDS_DIR = "text_embeds"
MANIFEST = "manifest.jsonl"
REPORT = "report.json"
# Settings that must match for clips to share one cache.
CACHE_CONFIG_KEYS = ("num_frames", "fps", "height", "width", "resize_mode", "latent_shape", "vae_normalization")


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------
def atomic_save(tensors, path, metadata=None):
    """Write safetensors to a temporary name and rename it, so a killed job never leaves a partial file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def atomic_write_text(path, text):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def remove_stale_temp_files(directory):
    for path in glob.glob(os.path.join(directory, "*.tmp")):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------
def caption_hash(caption):
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


def text_embed_path(cache_dir, hash_):
    return os.path.join(cache_dir, TEXT_EMBEDS_DIR, f"{hash_}.safetensors")


def shard_dirs(cache_dir):
    return sorted(os.path.join(cache_dir, d) for d in os.listdir(cache_dir) if d.startswith("shard_"))


def clip_file_name(key, clip_index):
    return f"{key.replace('/', '--')}__{clip_index:03d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def read_cache_info(cache_dir):
    path = os.path.join(cache_dir, CACHE_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no {CACHE_INFO}); run cache_latents.py first")
    with open(path) as f:
        return json.load(f)


def read_manifest(shard_dir):
    """Rows of a shard's manifest.jsonl; an empty list when the shard has none yet."""
    path = os.path.join(shard_dir, "manifest.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def list_cached_clips(cache_dir):
    """All clips of a cache as manifest rows, each with `path` set to the clip file."""
    clips = []
    for shard in shard_dirs(cache_dir):
        for row in read_manifest(shard):
            clips.append(dict(row, path=os.path.join(shard, row["file"])))
    return clips


@functools.lru_cache(maxsize=64)
def load_text_embeds(path):
    """A caption's T5 embedding [512, D] (bf16) from a cache. Most clips share a few captions, so recent ones stay
    in memory instead of being read again for every clip. Callers must not change the tensor in place."""
    with safe_open(path, "pt") as f:
        return f.get_tensor("prompt_embeds")


def hold_out_clips(clips, num_clips, seed):
    """Split whole videos off until num_clips clips are held out, so no held-out video ever trains."""
    if num_clips <= 0:
        return clips, []
    keys = sorted({c["key"] for c in clips})
    random.Random(seed).shuffle(keys)
    clips_per_key = Counter(c["key"] for c in clips)
    held_keys, held = set(), 0
    for key in keys:
        if held >= num_clips:
            break
        held_keys.add(key)
        held += clips_per_key[key]
    train = [c for c in clips if c["key"] not in held_keys]
    if not train:
        raise ValueError(f"--num_validation_clips {num_clips} leaves no clip to train on")
    return train, [c for c in clips if c["key"] in held_keys][:num_clips]


HELD_OUT = "held_out.json"


def write_held_out(directory, cache_dir, train, held, trained_caches):
    """Record in DIRECTORY/held_out.json which clips of `cache_dir` (the first cache) a run held out: the validation
    clips (files relative to the cache) and every held-out video key (none of their clips trained); and every cache
    the run trained on (all clips of the others trained)."""
    trained_keys = {c["key"] for c in train}
    record = {
        "cache_dir": os.path.realpath(cache_dir),
        "trained_caches": [os.path.realpath(path) for path in trained_caches],
        "keys": sorted({c["key"] for c in held} - trained_keys),
        "clips": [os.path.relpath(c["path"], cache_dir) for c in held],
    }
    atomic_write_text(os.path.join(directory, HELD_OUT), json.dumps(record, indent=2))


def read_held_out(directory):
    """The held_out.json of a run, checkpoint or export dir (or of the dir above it, for RUN/ema); None if none."""
    for path in (
        os.path.join(directory, HELD_OUT),
        os.path.join(os.path.dirname(os.path.normpath(directory)), HELD_OUT),
    ):
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def split_by_record(clips, cache_dir, record):
    """(train, held) of a cache's clips as a held_out.json recorded them; refuses a record that names other clips."""
    by_file = {os.path.relpath(c["path"], cache_dir): c for c in clips}
    missing = [f for f in record["clips"] if f not in by_file]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(record['clips'])} held-out clips recorded for {record['cache_dir']} are not "
            f"in {cache_dir} (first: {missing[0]}); give the cache the run was trained on"
        )
    held_keys = set(record["keys"])
    return [c for c in clips if c["key"] not in held_keys], [by_file[f] for f in record["clips"]]


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def cache_config(args, vae_config, text_dim):
    return {
        "num_frames": args.num_frames,
        "fps": args.fps,
        "height": args.height,
        "width": args.width,
        "resize_mode": args.resize_mode,
        "latent_shape": latent_shape(args.num_frames, args.height, args.width, vae_config["z_dim"]),
        "latent_dtype": "bfloat16",
        "text_embed_shape": [512, text_dim],
        "vae_normalization": vae_normalization(vae_config),
        "model": args.pretrained_model_name_or_path,
    }


def check_cache_compatible(output_dir, config):
    path = os.path.join(output_dir, CACHE_INFO)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    for key in CACHE_CONFIG_KEYS:
        if existing.get(key) != config[key]:
            raise ValueError(
                f"{output_dir} was cached with {key}={existing.get(key)}, this run asks for "
                f"{config[key]}; use a new --output_dir"
            )


def write_cache_info(output_dir, config):
    """cache_info.json: the config plus counts over all shards (safe to rewrite from any array task)."""
    clips = [row for shard in shard_dirs(output_dir) for row in read_manifest(shard)]
    info = dict(
        config,
        num_clips=len(clips),
        num_videos=len({row["key"] for row in clips}),
        num_shards=len(shard_dirs(output_dir)),
    )
    atomic_write_text(os.path.join(output_dir, CACHE_INFO), json.dumps(info, indent=2))
    return info


def write_clips(batch, latents, caption_hashes, shard_dir, config):
    """Write each clip of a batch as KEY__NNN.safetensors; its header holds what rebuild_manifest needs."""
    for item, latent, hash_ in zip(batch, latents, caption_hashes, strict=True):
        metadata = {
            "key": item["key"],
            "clip_index": str(item["clip_index"]),
            "start_seconds": f"{item['start_seconds']:.4f}",
            "source_fps": f"{item['source_fps']:.4f}",
            "fps": str(config["fps"]),
            "num_frames": str(config["num_frames"]),
            "height": str(config["height"]),
            "width": str(config["width"]),
            "caption_hash": hash_,
            "model": config["model"],
        }
        path = os.path.join(shard_dir, clip_file_name(item["key"], item["clip_index"]))
        atomic_save({"latents": latent.contiguous()}, path, metadata)


def rebuild_manifest(shard_dir):
    """Rewrite manifest.jsonl from the clip files present, reading only headers of files it does not list yet."""
    rows = {row["file"]: row for row in read_manifest(shard_dir)}
    files = sorted(f for f in os.listdir(shard_dir) if f.endswith(".safetensors"))
    for name in files:
        if name not in rows:
            with safe_open(os.path.join(shard_dir, name), "pt") as f:
                meta = f.metadata()
            rows[name] = {
                "file": name,
                "key": meta["key"],
                "clip_index": int(meta["clip_index"]),
                "start_seconds": float(meta["start_seconds"]),
                "caption_hash": meta["caption_hash"],
            }
    atomic_write_text(
        os.path.join(shard_dir, "manifest.jsonl"), "".join(json.dumps(rows[name]) + "\n" for name in files)
    )
    return len(files)


# ----------------------------------------------------------------------------------------------------------------
# Verifying
# ----------------------------------------------------------------------------------------------------------------
def verify_cache(output_dir):
    """Check every clip and text file; return (statistics, problems)."""
    with open(os.path.join(output_dir, CACHE_INFO)) as f:
        info = json.load(f)
    problems, num_clips, keys, clip_bytes, failures = [], 0, set(), 0, 0
    hashes = set()
    for shard in shard_dirs(output_dir):
        listed = {row["file"] for row in read_manifest(shard)}
        for name in sorted(f for f in os.listdir(shard) if f.endswith(".safetensors")):
            path = os.path.join(shard, name)
            try:
                with safe_open(path, "pt") as f:
                    latents, meta = f.get_tensor("latents"), f.metadata()
            except Exception as error:
                problems.append(f"{path}: unreadable ({error})")
                continue
            if list(latents.shape) != info["latent_shape"] or latents.dtype != torch.bfloat16:
                problems.append(
                    f"{path}: {latents.dtype} {list(latents.shape)}, expected bfloat16 {info['latent_shape']}"
                )
            elif not torch.isfinite(latents).all():
                problems.append(f"{path}: holds NaN or inf")
            if name not in listed:
                problems.append(f"{path}: missing from the shard manifest")
            num_clips += 1
            keys.add(meta["key"])
            hashes.add(meta["caption_hash"])
            clip_bytes += os.path.getsize(path)
        report = os.path.join(shard, "report.json")
        if os.path.isfile(report):
            with open(report) as f:
                failures += len(json.load(f)["failures"])
    for hash_ in sorted(hashes):
        path = text_embed_path(output_dir, hash_)
        try:
            with safe_open(path, "pt") as f:
                embeds = f.get_tensor("prompt_embeds")
            if list(embeds.shape) != info["text_embed_shape"] or not torch.isfinite(embeds.float()).all():
                problems.append(f"{path}: shape {list(embeds.shape)} or values are wrong")
        except Exception as error:
            problems.append(f"{path}: unreadable or missing ({error})")
    clip_seconds = info["num_frames"] / info["fps"]
    stats = {
        "clips": num_clips,
        "videos": len(keys),
        "shards": len(shard_dirs(output_dir)),
        "captions": len(hashes),
        "video_hours": round(num_clips * clip_seconds / 3600, 4),
        "bytes": clip_bytes,
        "bytes_per_clip": clip_bytes // max(num_clips, 1),
        "failed_videos_last_runs": failures,
        "latent_shape": info["latent_shape"],
        "problems": len(problems),
    }
    return stats, problems
