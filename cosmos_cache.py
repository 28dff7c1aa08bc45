"""The latent cache's file format, written by cache_latents.py and read by train_cosmos_lora.py and sample.py.

    CACHE/cache_info.json                   config, model id, VAE normalization, counts
    CACHE/text_embeds/HH/HASH.safetensors   text embedding per unique caption, compressed losslessly (HH: the
                                            hash's first two characters, so no folder holds millions of files)
    CACHE/shard_00000/KEY__000.safetensors  one clip's normalized latents ("latents", bfloat16) + metadata
    CACHE/shard_00000/manifest.jsonl        one row per clip file
    CACHE/shard_00000/report.json           what the last run of this shard cached and skipped

Every file is written to a temporary name and renamed when complete, so a killed job never leaves a partial file.

A text file stores a caption's [512, D] bf16 embedding bit for bit in fewer bytes ("high_zstd" and "low_zstd",
uint8, with the metadata `shape`, `rows`, `delta_high`, `delta_low`, `caption`): the trailing rows whose bits are
all zero are dropped (T5 zeroes the embedding past the prompt's tokens, so only the real tokens' rows remain), the
high byte (sign, exponent) and the low byte of each remaining value go to two planes, each plane is XOR-ed row by row
when that makes it smaller (`delta_*`: rows much alike, such as Predict2.5's padding, then turn into zeros), and each
is compressed with zstd. Reading reverses each step; writing checks that the file rebuilds the embedding bit for
bit. Training reads one caption per clip by its hash, so each caption is one file found by name, with no index
to load.
"""

import functools
import glob
import hashlib
import json
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import zstandard
from safetensors import safe_open
from safetensors.torch import save_file

from cosmos_process import file_written_whole
from cosmos_sources import clip_plan
from cosmos_video import latent_shape

CACHE_INFO = "cache_info.json"
TEXT_EMBEDS_DIR = "text_embeds"
MANIFEST = "manifest.jsonl"
# 2: family, text_embeds, clip_plan, buckets, per-row shapes; 3: text embeddings compressed losslessly in
# text_embeds/HH/. Older ones are refused.
CACHE_FORMAT_VERSION = 3
# Settings that must match for clips to share one cache.
CACHE_CONFIG_KEYS = (
    "num_frames",
    "fps",
    "height",
    "width",
    "resize_mode",
    "latent_shape",
    "vae_normalization",
    "family",
    "text_embeds",
)


# ----------------------------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------------------------
def atomic_save(tensors, path, metadata=None):
    """Write safetensors to a temporary name and rename it, so a killed job never leaves a partial file."""
    with file_written_whole(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_text(path, text):
    with file_written_whole(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def remove_stale_temp_files(directory):
    for path in glob.glob(os.path.join(directory, "*.tmp")):
        os.remove(path)


# ----------------------------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------------------------
def caption_hash(caption):
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


def text_embed_path(cache_dir, hash_):
    return os.path.join(cache_dir, TEXT_EMBEDS_DIR, hash_[:2], f"{hash_}.safetensors")


def shard_dirs(cache_dir):
    return sorted(os.path.join(cache_dir, d) for d in os.listdir(cache_dir) if d.startswith("shard_"))


def clip_file_name(key, clip_index):
    return f"{key.replace('/', '--')}__{clip_index:03d}.safetensors"


# ----------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------
def read_cache_info(cache_dir):
    """cache_info.json of a cache of the current format (an older one is refused: re-cache it)."""
    path = os.path.join(cache_dir, CACHE_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no {CACHE_INFO}); run cache_latents.py first")
    with open(path) as f:
        info = json.load(f)
    version = info.get("format_version", 1)
    if version != CACHE_FORMAT_VERSION:
        raise ValueError(f"{cache_dir} is a format-{version} cache, not format {CACHE_FORMAT_VERSION}: re-cache it")
    return info


def read_manifest(shard_dir):
    """Rows of a shard's manifest.jsonl; an empty list when the shard has none yet."""
    path = os.path.join(shard_dir, "manifest.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass(frozen=True)
class CachedClip:
    """One clip of a cache, as its shard's manifest lists it, with the paths of its latents and its caption's
    embedding."""

    key: str  # the source video's key
    clip_index: int  # its place in the video's clip plan
    start_seconds: float
    shape: tuple  # latent shape [16, T, h, w]
    caption_hash: str
    path: str  # CACHE/shard_NNNNN/KEY__NNN.safetensors
    text_path: str  # CACHE/text_embeds/HH/HASH.safetensors

    @property
    def file(self):
        return os.path.basename(self.path)


def list_cached_clips(cache_dir):
    """All clips of a cache, in shard and manifest order."""
    return [
        CachedClip(
            key=row["key"],
            clip_index=row["clip_index"],
            start_seconds=row["start_seconds"],
            shape=tuple(row["shape"]),
            caption_hash=row["caption_hash"],
            path=os.path.join(shard, row["file"]),
            text_path=text_embed_path(cache_dir, row["caption_hash"]),
        )
        for shard in shard_dirs(cache_dir)
        for row in read_manifest(shard)
    ]


def read_clip(path):
    """A clip file's latents [16, T, h, w] (bfloat16) and its metadata (what cache_latents.py wrote in its header)."""
    with safe_open(path, "pt") as f:
        return f.get_tensor("latents"), f.metadata()


def missing_clip_files(clips):
    """Paths of listed clips whose file is gone: one directory listing per shard, not one stat per clip (a million
    clips in 100 shards: 4.6 s against 8.6 s by stat on a shared 2-core CPU box, benchmarks/RESULTS.md)."""
    present, missing = {}, []
    for clip in clips:
        directory = os.path.dirname(clip.path)
        if directory not in present:
            present[directory] = set(os.listdir(directory)) if os.path.isdir(directory) else set()
        if clip.file not in present[directory]:
            missing.append(clip.path)
    return missing


def bucket_name(shape):
    """A latent shape [C, T, h, w] as the bucket it came from, FRAMESxHEIGHTxWIDTH in pixels."""
    _, frames, height, width = shape
    return f"{(frames - 1) * 4 + 1}x{height * 8}x{width * 8}"


@functools.lru_cache(maxsize=64)
def load_text_embeds(path):
    """A caption's embedding [512, D] (bf16) from a cache. When clips share captions, recent ones stay in memory
    instead of being read again for every clip. Callers must not change the tensor in place."""
    return read_text_embeds(path)


def read_text_embeds(path):
    """A text embedding file's [512, D] bf16 tensor, rebuilt bit for bit (see the module docstring)."""
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        planes = [
            PackedPlane(f.get_tensor(f"{name}_zstd").numpy().tobytes(), meta[f"delta_{name}"] == "1")
            for name in ("high", "low")
        ]
    shape = tuple(int(n) for n in meta["shape"].split(","))
    return unpack_text_embeds(PackedText(int(meta["rows"]), *planes), shape)


# ----------------------------------------------------------------------------------------------------------------
# Text embeddings: lossless compression
# ----------------------------------------------------------------------------------------------------------------
TEXT_ZSTD_LEVEL = 3  # level 19 saves about 3% more and takes 30x longer to write


@dataclass(frozen=True)
class PackedPlane:
    """One byte of every stored bf16 value (high: sign and exponent; low: the rest of the mantissa), zstd-compressed,
    each row XOR-ed with the row before it when `delta`."""

    data: bytes
    delta: bool


@dataclass(frozen=True)
class PackedText:
    """A [512, D] bf16 embedding as the two byte planes of its first `rows` rows (the rows after them are zero)."""

    rows: int
    high: PackedPlane
    low: PackedPlane

    @property
    def nbytes(self):
        return len(self.high.data) + len(self.low.data)


def bf16_bits(embeds):
    """The bit patterns of a bf16 tensor, as uint16 numpy."""
    return embeds.contiguous().view(torch.int16).numpy().view(np.uint16)


def pack_plane(plane):
    """A [rows, D] uint8 plane compressed as it is or XOR-ed row by row, whichever is smaller."""
    delta = plane.copy()
    delta[1:] ^= plane[:-1]
    compressor = zstandard.ZstdCompressor(level=TEXT_ZSTD_LEVEL, write_checksum=True)
    plain, xored = compressor.compress(plane.tobytes()), compressor.compress(delta.tobytes())
    return PackedPlane(xored, True) if len(xored) < len(plain) else PackedPlane(plain, False)


def unpack_plane(packed, rows, width):
    plane = np.frombuffer(zstandard.ZstdDecompressor().decompress(packed.data), np.uint8).reshape(rows, width)
    return np.bitwise_xor.accumulate(plane, axis=0) if packed.delta else plane


def pack_text_embeds(embeds):
    """A [512, D] bf16 embedding compressed without loss: trailing all-zero rows dropped, then the high and the low
    byte of each value in two planes, each compressed with zstd (XOR-ed row by row first when that is smaller)."""
    bits = bf16_bits(embeds)
    nonzero = np.flatnonzero(bits.any(axis=1))
    rows = int(nonzero[-1]) + 1 if len(nonzero) else 0
    stored = bits[:rows]
    return PackedText(rows, pack_plane((stored >> 8).astype(np.uint8)), pack_plane((stored & 0xFF).astype(np.uint8)))


def unpack_text_embeds(packed, shape):
    """The [512, D] bf16 embedding a PackedText holds, bit for bit."""
    rows, width = packed.rows, shape[1]
    high, low = unpack_plane(packed.high, rows, width), unpack_plane(packed.low, rows, width)
    bits = np.zeros(shape, np.uint16)
    bits[:rows] = (high.astype(np.uint16) << 8) | low
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)


def write_text_embeds(path, embeds, caption):
    """Store one caption's [512, D] bf16 embedding compressed; refuse to write a file that would not rebuild it bit
    for bit."""
    packed = pack_text_embeds(embeds)
    if not np.array_equal(bf16_bits(unpack_text_embeds(packed, tuple(embeds.shape))), bf16_bits(embeds)):
        raise RuntimeError(f"{path}: the compressed text embedding does not rebuild the embedding bit for bit")
    meta = {
        "shape": ",".join(str(n) for n in embeds.shape),
        "rows": str(packed.rows),
        "delta_high": str(int(packed.high.delta)),
        "delta_low": str(int(packed.low.delta)),
        "caption": caption,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tensors = {
        f"{name}_zstd": torch.frombuffer(bytearray(plane.data), dtype=torch.uint8)
        for name, plane in (("high", packed.high), ("low", packed.low))
    }
    atomic_save(tensors, path, meta)


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------
def vae_normalization(vae_config):
    """The per-channel mean/std the pipeline normalizes latents with, from a VAE config (a cache records it)."""
    return {"latents_mean": list(vae_config["latents_mean"]), "latents_std": list(vae_config["latents_std"])}


def cache_config(args, vae_config, text_embeds, family):
    """What cache_info.json records before counting: the cache identity.

    `text_embeds` is {"kind": "t5"|"projected"|"full", "shape": [512, D], "projection_sha"}. `clip_plan` holds every
    setting that decides which frames a clip holds, so that a rerun with another plan is refused instead of mixing two
    plans in one cache. With several buckets, num_frames, height, width and latent_shape are null: each manifest row
    has its own shape."""
    buckets, single = args.buckets, len(args.buckets) == 1
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "num_frames": buckets[0].num_frames if single else None,
        "fps": args.fps,
        "height": buckets[0].height if single else None,
        "width": buckets[0].width if single else None,
        "resize_mode": args.resize_mode,
        "latent_shape": buckets[0].latent_shape(vae_config["z_dim"]) if single else None,
        "buckets": [b.name for b in buckets],
        "bucket_latent_shapes": {b.name: b.latent_shape(vae_config["z_dim"]) for b in buckets},
        "clip_plan": clip_plan(args),
        "latent_dtype": "bfloat16",
        "text_embed_shape": list(text_embeds["shape"]),
        "text_embeds": text_embeds,
        "vae_normalization": vae_normalization(vae_config),
        "family": family,
        "model": args.pretrained_model_name_or_path,
        "revision": getattr(args, "revision", None),
    }


def check_cache_compatible(output_dir, config):
    if not os.path.isfile(os.path.join(output_dir, CACHE_INFO)):
        return
    existing = read_cache_info(output_dir)
    for key in CACHE_CONFIG_KEYS:
        if existing.get(key) != config[key]:
            raise ValueError(
                f"{output_dir} was cached with {key}={existing.get(key)}, this run asks for "
                f"{config[key]}; use a new --output_dir"
            )
    for key, value in config["clip_plan"].items():
        if existing["clip_plan"].get(key) != value:
            raise ValueError(
                f"{output_dir} was cached with {key}={existing['clip_plan'].get(key)}, this run asks for {value}: "
                "two clip plans cannot share one cache; use a new --output_dir"
            )


def write_cache_info(output_dir, config):
    """cache_info.json: the config plus counts over all shards (safe to rewrite from any array task)."""
    clips = [row for shard in shard_dirs(output_dir) for row in read_manifest(shard)]
    per_bucket = Counter(bucket_name(row["shape"]) for row in clips)
    info = dict(
        config,
        num_clips=len(clips),
        num_videos=len({row["key"] for row in clips}),
        num_shards=len(shard_dirs(output_dir)),
        clips_per_bucket={name: per_bucket[name] for name in config["buckets"]},
    )
    atomic_write_text(os.path.join(output_dir, CACHE_INFO), json.dumps(info, indent=2))
    return info


def write_clips(batch, latents, caption_hashes, shard_dir, config):
    """Write each clip of a batch (one bucket) as KEY__NNN.safetensors; its header holds what the manifest needs."""
    for item, latent, hash_ in zip(batch, latents, caption_hashes, strict=True):
        bucket = item["bucket"]
        metadata = {
            "key": item["key"],
            "clip_index": str(item["clip_index"]),
            "start_seconds": f"{item['start_seconds']:.4f}",
            "source_fps": f"{item['source_fps']:.4f}",
            "fps": str(config["fps"]),
            "num_frames": str(bucket.num_frames),
            "height": str(bucket.height),
            "width": str(bucket.width),
            "caption_hash": hash_,
            "caption": item["caption"],  # the text itself, for contact sheets
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
                meta, shape = f.metadata(), f.get_slice("latents").get_shape()
            rows[name] = {
                "file": name,
                "key": meta["key"],
                "clip_index": int(meta["clip_index"]),
                "start_seconds": float(meta["start_seconds"]),
                "caption_hash": meta["caption_hash"],
                "shape": list(shape),
            }
    atomic_write_text(
        os.path.join(shard_dir, "manifest.jsonl"), "".join(json.dumps(rows[name]) + "\n" for name in files)
    )
    return len(files)


# ----------------------------------------------------------------------------------------------------------------
# Verifying
# ----------------------------------------------------------------------------------------------------------------
def verify_cache(output_dir):
    """Check every clip file against its own shape, every listed file's presence and every text file; return
    (statistics with clips per bucket, problems)."""
    info = read_cache_info(output_dir)
    buckets = info["buckets"]
    channels = (info["latent_shape"] or next(iter(info["bucket_latent_shapes"].values())))[0]
    problems, num_clips, keys, clip_bytes, failures, seconds = [], 0, set(), 0, 0, 0.0
    hashes, per_bucket = set(), Counter()
    for shard in shard_dirs(output_dir):
        listed = {row["file"]: row for row in read_manifest(shard)}
        present = sorted(f for f in os.listdir(shard) if f.endswith(".safetensors"))
        for name in sorted(set(listed) - set(present)):
            problems.append(f"{os.path.join(shard, name)}: listed in the shard manifest but missing")
        for name in present:
            path = os.path.join(shard, name)
            try:
                with safe_open(path, "pt") as f:
                    latents, meta = f.get_tensor("latents"), f.metadata()
                frames, height, width = int(meta["num_frames"]), int(meta["height"]), int(meta["width"])
            except Exception as error:
                problems.append(f"{path}: unreadable ({error})")
                continue
            expected = latent_shape(frames, height, width, channels)
            bucket = f"{frames}x{height}x{width}"
            if bucket not in buckets:
                problems.append(f"{path}: bucket {bucket} is not one of the cache's buckets {buckets}")
            if list(latents.shape) != expected or latents.dtype != torch.bfloat16:
                problems.append(f"{path}: {latents.dtype} {list(latents.shape)}, expected bfloat16 {expected}")
            elif not torch.isfinite(latents).all():
                problems.append(f"{path}: holds NaN or inf")
            if name not in listed:
                problems.append(f"{path}: missing from the shard manifest")
            elif listed[name]["shape"] != list(latents.shape):
                problems.append(f"{path}: manifest shape {listed[name].get('shape')} differs from the file's")
            num_clips += 1
            per_bucket[bucket] += 1
            seconds += frames / info["fps"]
            keys.add(meta["key"])
            hashes.add(meta["caption_hash"])
            clip_bytes += os.path.getsize(path)
        report = os.path.join(shard, "report.json")
        if os.path.isfile(report):
            with open(report) as f:
                failures += len(json.load(f)["failures"])
    text_bytes = 0
    for hash_ in sorted(hashes):
        path = text_embed_path(output_dir, hash_)
        try:
            embeds = read_text_embeds(path)
            if list(embeds.shape) != info["text_embed_shape"] or not torch.isfinite(embeds.float()).all():
                problems.append(f"{path}: shape {list(embeds.shape)} or values are wrong")
            text_bytes += os.path.getsize(path)
        except Exception as error:
            problems.append(f"{path}: unreadable or missing ({error})")
    stats = {
        "clips": num_clips,
        "videos": len(keys),
        "shards": len(shard_dirs(output_dir)),
        "captions": len(hashes),
        "video_hours": round(seconds / 3600, 4),
        "bytes": clip_bytes,
        "bytes_per_clip": clip_bytes // max(num_clips, 1),
        "text_bytes": text_bytes,
        "text_bytes_per_caption": text_bytes // max(len(hashes), 1),
        "failed_videos_last_runs": failures,
        "clips_per_bucket": {name: per_bucket[name] for name in buckets},
        "problems": len(problems),
    }
    return stats, problems
