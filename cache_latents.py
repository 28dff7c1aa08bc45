#!/usr/bin/env python
"""Encode videos into a latent cache for train_cosmos_lora.py.

Videos come from a local folder, local WebDataset tar shards, or a Hugging Face dataset streamed with `datasets`.
Each video is cut into clips of `--num_frames` frames at `--fps`, fitted to `--height` x `--width`, and encoded with
the frozen Wan2.1 VAE of the Cosmos checkpoint. Every clip is stored as one safetensors file holding the VAE posterior
mean, normalized as the Cosmos pipeline normalizes latents. Captions are encoded once each with the checkpoint's text
encoder (Predict2: T5; Predict2.5: Qwen2.5-VL, stored by default as the frozen crossattn_proj output, see
--text_embeds), which loads only when an embedding is missing.

    OUTPUT/cache_info.json                 config, model family, id and revision, VAE normalization, counts
    OUTPUT/text_embeds/HH/HASH.safetensors text embedding [512, D] per unique caption, compressed losslessly
    OUTPUT/shard_00000/KEY__000.safetensors  latents [16, (N-1)/4+1, H/8, W/8] in bfloat16
    OUTPUT/shard_00000/manifest.jsonl      one row per clip file
    OUTPUT/shard_00000/report.json         what the last run of this shard cached and skipped

Rerunning skips finished clips, and all writes are atomic, so a killed job is finished by running it again.

    python cache_latents.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --dataset builddotai/Egocentric-100K --data_files 'factory001/**/*.tar' --output_dir /scratch/cache
"""

import argparse
import glob
import hashlib
import json
import os
import re
import resource
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

import cosmos_vae
from cosmos_cache import (
    atomic_write_text,
    cache_config,
    caption_hash,
    check_cache_compatible,
    clip_file_name,
    rebuild_manifest,
    remove_stale_temp_files,
    text_embed_path,
    verify_cache,
    write_cache_info,
    write_clips,
    write_text_embeds,
)
from cosmos_cli import (
    CAPTION_COLUMNS,
    DEFAULT_PROMPT,
    KEY_COLUMNS,
    VIDEO_COLUMNS,
    VIDEO_EXTENSIONS,
    HelpFormatter,
    add_clip_plan_arguments,
    add_config_argument,
    add_model_arguments,
    add_source_arguments,
    check_pretrained_model,
    model_dtype,
    non_negative_int,
    parse_with_config,
    positive_int,
)
from cosmos_families import (
    detect_family,
    load_component,
    load_component_config,
    load_text_projection,
    project_text,
    text_embed_kind,
    text_embed_width,
)
from cosmos_process import ignore_stop_signals, run_main, stage
from cosmos_video import (
    Bucket,
    check_clip_geometry,
    decode_frames,
    fit_frames,
    frames_to_vae_input,
    nearest_bucket_size,
    open_video,
    parse_bucket,
    plan_bucket_clips,
    probe_video,
    video_size,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_config_argument(parser)
    add_model_arguments(parser)
    parser.add_argument("--output_dir", required=True, help="Cache directory to create or complete.")
    add_source_arguments(parser)
    clips = add_clip_plan_arguments(
        parser,
        "Without --buckets, one bucket: --num_frames x --height x --width. These settings are the cache's clip\n"
        "plan: a rerun into the cache with another plan is refused.",
    )
    clips.add_argument(
        "--clip_stride_seconds",
        type=float,
        default=None,
        help="Seconds between clip starts within a video. Default: the clip length (back to back).",
    )
    clips.add_argument(
        "--max_clips_per_video", type=positive_int, default=None, help="Cap on clips taken from one video."
    )
    text = parser.add_argument_group("captions")
    text.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="Caption for videos without one (Egocentric-100K has no captions)."
    )
    text.add_argument(
        "--text_embeds",
        choices=["projected", "full"],
        default="projected",
        help="Predict2.5 only: store each caption as the output of the transformer's frozen crossattn_proj "
        "[512, 1024] (1 MB; valid while crossattn_proj stays frozen and unchanged, which training checks), or the "
        "full Qwen2.5-VL embedding [512, 100352] (103 MB). Predict2 stores T5 embeddings [512, 1024] either way.",
    )
    text.add_argument(
        "--caption_field",
        default="caption",
        help="Field read from KEY.json sidecars, the tar json, or --captions_file rows.",
    )
    text.add_argument(
        "--captions_file",
        default=None,
        help="jsonl or csv with a `key` column and the --caption_field column; keys are video keys "
        "(folder: path relative to --video_dir without extension; tars: the member name).",
    )
    run = parser.add_argument_group("run")
    run.add_argument("--batch_size", type=positive_int, default=8, help="Clips per VAE encode call.")
    run.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=min(8, os.cpu_count() or 1),
        help="DataLoader workers decoding videos (0 decodes in the main process).",
    )
    run.add_argument(
        "--vae_dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="VAE and T5 compute dtype; auto is bfloat16 on GPU and float32 on CPU.",
    )
    run.add_argument(
        "--vae_encode",
        choices=["whole", "chunked"],
        default=None,
        help="whole: the VAE encoder runs once over each clip (cosmos_vae.py, the same computation as chunked); "
        "chunked: diffusers' encode over frames 1, 4, 4, ... with a frame cache. Default: whole on GPU, chunked on "
        "CPU. A VAE layout the whole-clip encode does not know is encoded chunked.",
    )
    run.add_argument(
        "--compile_vae",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the whole-clip encode; the first batch compiles (tens of seconds). Default: on with "
        "--vae_encode whole on GPU, off on CPU.",
    )
    run.add_argument(
        "--num_shards",
        type=positive_int,
        default=None,
        help="Split the videos into this many disjoint shards. Default: SLURM_ARRAY_TASK_COUNT or 1.",
    )
    run.add_argument(
        "--shard_index",
        type=int,
        default=None,
        help="Which shard this run caches (0-based). Default: SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, or 0.",
    )
    run.add_argument(
        "--verify",
        action="store_true",
        help="Check every file of the cache and print its statistics. Alone (no source) it only "
        "verifies; with a source it verifies after caching.",
    )
    args = parse_with_config(parser, argv)
    resolve_shard_args(args)
    args.buckets = (
        [parse_bucket(b) for b in args.buckets] if args.buckets else [Bucket(args.num_frames, args.height, args.width)]
    )
    return args


def resolve_shard_args(args):
    if args.num_shards is None:
        args.num_shards = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if args.shard_index is None:
        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        args.shard_index = int(task_id) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)) if task_id else 0


def validate_args(args):
    """Fail at once, before any model loads, with a one-line error."""
    sources = [name for name in ("video_dir", "tars", "dataset") if getattr(args, name)]
    if len(sources) > 1:
        raise ValueError(f"give one source, not {' and '.join('--' + s for s in sources)}")
    if not sources and not args.verify:
        raise ValueError("give a source: --video_dir, --tars or --dataset (or --verify alone to check a cache)")
    check_clip_geometry(args.num_frames, args.height, args.width)
    if args.clip_stride_seconds is not None and args.clip_stride_seconds <= 0:
        raise ValueError(f"--clip_stride_seconds must be positive, got {args.clip_stride_seconds}")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(
            f"--shard_index {args.shard_index} is outside 0..{args.num_shards - 1} (--num_shards {args.num_shards})"
        )
    if len(set(args.buckets)) != len(args.buckets):
        raise ValueError(f"--buckets lists a bucket twice: {' '.join(b.name for b in args.buckets)}")
    if args.video_dir and not os.path.isdir(args.video_dir):
        raise FileNotFoundError(f"--video_dir {args.video_dir} is not a directory")
    if args.video_dir and not list_local_videos(args.video_dir):
        raise FileNotFoundError(f"--video_dir {args.video_dir} holds no video file ({', '.join(VIDEO_EXTENSIONS)})")
    if args.tars and not glob.glob(args.tars, recursive=True):
        raise FileNotFoundError(f"--tars {args.tars!r} matches no file")
    if args.captions_file and not os.path.isfile(args.captions_file):
        raise FileNotFoundError(f"--captions_file {args.captions_file} does not exist")
    if args.compile_vae and args.vae_encode == "chunked":
        raise ValueError(
            "--compile_vae needs --vae_encode whole (compiling the chunked encode recompiles on its cache)"
        )
    if sources:  # last: the values above are cheaper to fix than a download
        check_pretrained_model(args.pretrained_model_name_or_path, ["vae", "text_encoder", "tokenizer"])


# ----------------------------------------------------------------------------------------------------------------
# Sources: every source yields (key, video, caption), where video is a path or the file's bytes.
# ----------------------------------------------------------------------------------------------------------------
def list_local_videos(video_dir):
    """Sorted (key, path) pairs; the key is the path relative to video_dir without its extension."""
    found = []
    for root, _, files in os.walk(video_dir):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                path = os.path.join(root, name)
                found.append((os.path.splitext(os.path.relpath(path, video_dir))[0], path))
    return sorted(found)


def read_captions_file(path, field):
    """{key: caption} from a jsonl or csv file with a `key` column."""
    if path.endswith(".csv"):
        import csv

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    return {str(row["key"]): row[field] for row in rows if row.get(field)}


def sidecar_caption(video_path, field):
    """Caption from KEY.txt, or from `field` of KEY.json, next to a video; None if neither has one."""
    stem = os.path.splitext(video_path)[0]
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt") as f:
            return f.read().strip() or None
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json") as f:
            return json.load(f).get(field)
    return None


def load_streaming_dataset(args):
    """The same `datasets` streaming code path reads hub datasets, local dataset folders and local tar shards."""
    import datasets

    if args.tars:
        files = sorted(glob.glob(args.tars, recursive=True))
        ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(args.dataset, data_files=args.data_files, split=args.split, streaming=True)
    return ds.decode(False)  # raw bytes or paths: we decode with PyAV, not the Video feature


def take_part(ds, num_parts, index):
    """Part `index` of `num_parts` of a streaming dataset, split by whole files so nothing is read twice."""
    if num_parts == 1:
        return ds
    if index >= ds.num_shards:
        return None  # more parts than files: this part has no file
    return ds.shard(num_shards=min(num_parts, ds.num_shards), index=index)


@dataclass(frozen=True)
class Layout:
    """Which columns of a streamed dataset hold the video, its caption and its key (None: not in the data)."""

    video: str
    caption: str | None
    key: str | None


def looks_like_video(value):
    return isinstance(value, (bytes, bytearray, str)) or (isinstance(value, dict) and {"bytes", "path"} & set(value))


def resolve_layout(example, args):
    """Pick the video, caption and key columns from the first example; a layout that does not fit fails in one line
    naming the columns found."""
    columns = list(example)
    source = args.tars or args.dataset
    found = f"columns found: {', '.join(columns)}"
    for flag in ("video_column", "caption_column", "key_column"):
        if getattr(args, flag) and getattr(args, flag) not in example:
            raise ValueError(f"--{flag} {getattr(args, flag)} is not in {source}; {found}")
    # A WebDataset member KEY.video.mp4 is the column video.mp4: match names on their last extension too.
    named = [c for c in columns if c.lower() in VIDEO_COLUMNS or c.rsplit(".", 1)[-1].lower() in VIDEO_COLUMNS]
    video = args.video_column or next((c for c in named if looks_like_video(example[c])), None)
    if video is None:
        video = next((c for c in columns if isinstance(example[c], dict) and "bytes" in example[c]), None)
    if video is None:
        raise ValueError(f"{source}: no column holds a video ({found}); name it with --video_column")
    if not looks_like_video(example[video]):
        raise ValueError(
            f"{source}: column {video} holds {type(example[video]).__name__}, not video bytes, a path or a "
            f'{{"bytes", "path"}} dict; {found}'
        )
    texts = [c for c in CAPTION_COLUMNS if isinstance(example.get(c), str)]
    caption = args.caption_column or (texts[0] if texts else None)
    key = args.key_column or next((c for c in KEY_COLUMNS if c in example), None)
    return Layout(video, caption, key)


def probe_layout(args):
    """Read the first example of a --tars/--dataset source (before any model loads) and return its Layout."""
    example = next(iter(load_streaming_dataset(args)), None)
    if example is None:
        raise ValueError(f"{args.tars or args.dataset} holds no example")
    return resolve_layout(example, args)


def key_from_path(path, root):
    """A video's path relative to the dataset (a local folder or hf://datasets/ID@REV/...), without extension."""
    path = re.sub(r"^hf://datasets/[^/]+/[^/@]+(@[^/]+)?/", "", path.removeprefix("file://"))
    if root and os.path.isabs(path) and os.path.isdir(root):
        path = os.path.relpath(path, os.path.abspath(root))
    return os.path.splitext(path)[0]


def video_input(value, root):
    """Bytes or a local path PyAV can open, from a column value: bytes, a path, or a {"bytes", "path"} dict."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"the video column holds {type(value).__name__}, not bytes or a path")
    for path in (value, os.path.join(root or "", value)):
        if os.path.isfile(path):
            return path
    if "://" not in value and root and not os.path.isdir(root):
        value = f"hf://datasets/{root}/{value}"  # a path inside a hub dataset
    from datasets.utils.file_utils import xopen

    with xopen(value, "rb") as f:
        return f.read()


def example_key(example, layout, root):
    """Stable and unique per video: the key column, else the video's path, else a hash of its bytes."""
    if layout.key:
        return str(example[layout.key])
    value = example[layout.video]
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    if path:
        return key_from_path(path, root)
    data = value.get("bytes") if isinstance(value, dict) else value
    return "sha1-" + hashlib.sha1(data).hexdigest()[:16]


def example_caption(example, layout, field):
    if layout.caption and example.get(layout.caption):
        return str(example[layout.caption]).strip() or None
    meta = example.get("json")
    return meta.get(field) if isinstance(meta, dict) else None


def iter_part_videos(args, layout, captions, part, num_parts):
    """(key, video, caption, caption_from_file) for the videos of part `part` of `num_parts`; video is a path or
    bytes, or the exception that reading it raised."""
    if args.video_dir:
        for key, path in list_local_videos(args.video_dir)[part::num_parts]:
            caption = captions.get(key) or sidecar_caption(path, args.caption_field) or args.prompt
            yield key, path, caption, key in captions
        return
    ds = take_part(load_streaming_dataset(args), num_parts, part)
    root = None if args.tars else args.dataset
    for example in ds or []:
        key = example_key(example, layout, root)
        try:
            video = video_input(example[layout.video], root)
        except Exception as error:  # a missing file is this video's failure, not the run's
            video = error
        caption = captions.get(key) or example_caption(example, layout, args.caption_field) or args.prompt
        yield key, video, caption, key in captions


class VideoClips(torch.utils.data.IterableDataset):
    """Decodes this process's videos in DataLoader workers and yields clips still missing from the cache.

    Items are dicts with the video's `key`: a clip (`frames` uint8 [T, H, W, 3], its `bucket` and metadata),
    `{"error": ...}` for a video that could not be used, or `{"skipped": n}` for a video whose n clips are already
    cached. `caption_from_file` says whether --captions_file named the video.
    """

    def __init__(self, args, layout, shard_dir, captions, part, num_parts):
        self.args, self.layout, self.shard_dir, self.captions = args, layout, shard_dir, captions
        self.part, self.num_parts = part, num_parts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w of process-part p reads sub-part p + w * num_parts of num_parts * num_workers.
        videos = iter_part_videos(
            self.args, self.layout, self.captions, self.part + worker * self.num_parts, self.num_parts * num_workers
        )
        seen = set()
        for key, video, caption, caption_from_file in videos:
            tag = {"key": key, "caption_from_file": caption_from_file}
            if key in seen:
                yield tag | {"error": "duplicate key: an earlier video of this source has the same key"}
                continue
            seen.add(key)
            try:
                if isinstance(video, Exception):
                    raise video
                for item in self.video_clips(key, video, caption):
                    yield tag | item
            except Exception as error:  # a corrupt or truncated video is reported, never fatal
                yield tag | {"error": f"{type(error).__name__}: {error}".splitlines()[0]}

    def video_clips(self, key, video, caption):
        a = self.args
        with open_video(video) as container:
            num_source_frames, source_fps = probe_video(container)
            height, width = video_size(container)
            size = nearest_bucket_size(a.buckets, height, width)
            buckets = [b for b in a.buckets if (b.height, b.width) == size]
            clips = plan_bucket_clips(
                buckets, num_source_frames, source_fps, a.fps, a.clip_stride_seconds, a.max_clips_per_video
            )
            if not clips:
                shortest = min(buckets, key=lambda b: b.num_frames)
                yield {
                    "error": f"too short for every bucket of its aspect ratio: {num_source_frames / source_fps:.2f} "
                    f"s, the shortest clip ({shortest.name}) needs {(shortest.num_frames - 1) / a.fps:.2f} s; "
                    f"source {width}x{height}"
                }
                return
            todo = [
                c
                for c in range(len(clips))
                if not os.path.exists(os.path.join(self.shard_dir, clip_file_name(key, c)))
            ]
            if not todo:
                yield {"skipped": len(clips)}
                return
            frames = decode_frames(container, {i for c in todo for i in clips[c][1]})
        for c in todo:
            bucket, indices = clips[c]
            if indices[-1] not in frames:
                yield {"error": f"truncated: clip {c} needs frame {indices[-1]}, decoded {len(frames)} wanted frames"}
                break
            clip = fit_frames(
                torch.stack([torch.from_numpy(frames[i]) for i in indices]), bucket.height, bucket.width, a.resize_mode
            )
            yield {
                "clip_index": c,
                "bucket": bucket,
                "frames": clip,
                "caption": caption,
                "start_seconds": indices[0] / source_fps,
                "source_fps": source_fps,
            }


# ----------------------------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------------------------


class ClipEncoder:
    """The VAE encode: whole-clip (cosmos_vae.encode_whole_clip, compiled or eager) or diffusers' chunked encode.

    A VAE layout the whole-clip encode does not know is encoded chunked, with a message; so is every batch after a
    whole-clip batch ran out of GPU memory.
    """

    def __init__(self, vae, mode, compile_vae, batch_size):
        reason = cosmos_vae.whole_clip_unsupported(vae) if mode == "whole" else None
        if reason:
            print(f"--vae_encode whole: {reason}; encoding chunked")
            mode = "chunked"
        self.vae, self.mode, self.batch_size = vae, mode, batch_size
        self.compiled = compile_vae and mode == "whole"
        encode = cosmos_vae.encode_whole_clip
        self.encode_whole = torch.compile(encode, dynamic=False) if self.compiled else encode

    def __call__(self, x):
        """VAE input [B, 3, T, H, W] -> posterior mean [B, 16, T', h, w]."""
        size = len(x)
        if self.compiled and size < self.batch_size:  # a new batch size would compile again: pad the last batch
            x = torch.cat([x, x[-1:].expand(self.batch_size - size, *x.shape[1:])])
        if self.vae.device.type == "cuda":  # cuDNN's 3D convolutions run channels-last; this saves a copy per conv
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.mode == "whole":
            try:
                return self.encode_whole(self.vae, x)[:size]
            except torch.OutOfMemoryError:
                self.mode, self.compiled = "chunked", False
                tqdm.write(
                    f"the whole-clip encode of {len(x)} clips ran out of GPU memory; encoding chunked from now on "
                    "(a lower --batch_size keeps it whole)"
                )
            torch.cuda.empty_cache()
        return self.vae.encode(x[:size]).latent_dist.mean


@torch.no_grad()
def encode_clips(encode, frames, vae_config):
    """uint8 clips [B, T, H, W, 3] -> normalized posterior-mean latents [B, 16, T', H/8, W/8] in bfloat16.

    The clips travel to the GPU as uint8 (a quarter of the bytes of float32) and are converted there.
    """
    vae = encode.vae
    x = torch.stack([frames_to_vae_input(f.to(vae.device, non_blocking=True)) for f in frames]).to(vae.dtype)
    latents = encode(x).float()
    return cosmos_vae.normalize_latents(latents, vae_config).to(torch.bfloat16).cpu()


@dataclass
class LoopClock:
    """Where the caching loop's time goes: waiting for decoded clips, and the first batch (start-up, compile)."""

    start: float
    data_wait: float = 0.0
    first_batch: float = 0.0

    def items(self, loader):
        """The loader's items, adding the time the loop waits for each to data_wait."""
        iterator = iter(loader)
        while True:
            start = time.time()
            with stage("decoding videos"):
                item = next(iterator, None)
            self.data_wait += time.time() - start
            if item is None:
                return
            yield item

    def data_wait_share(self):
        return self.data_wait / max(time.time() - self.start, 1e-9)


def children_cpu_seconds():
    """CPU seconds of this process's finished children: the DataLoader workers that decoded the videos."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class TextEmbedCache:
    """Encodes each caption once and stores it, compressed losslessly, as text_embeds/HH/HASH.safetensors (projected
    if `projection` is given).

    The tokenizer and text encoder load on the first missing embedding; `release` frees them again.
    """

    def __init__(self, output_dir, args, family, projection, device, dtype):
        self.output_dir, self.args, self.family, self.projection = output_dir, args, family, projection
        self.device, self.dtype = device, dtype
        self.known, self.tokenizer, self.text_encoder = set(), None, None

    def ensure(self, caption):
        hash_ = caption_hash(caption)
        path = text_embed_path(self.output_dir, hash_)
        if hash_ not in self.known and not os.path.exists(path):
            if self.text_encoder is None:
                self.load()
            embeds = self.family.encode_prompts(self.tokenizer, self.text_encoder, [caption], self.device)
            with torch.no_grad():
                embeds = project_text(self.projection, embeds)
            write_text_embeds(path, embeds[0].to(torch.bfloat16).cpu(), caption)
        self.known.add(hash_)
        return hash_

    def load(self):
        path, revision = self.args.pretrained_model_name_or_path, self.args.revision
        self.tokenizer = load_component(path, "tokenizer", revision, family=self.family)
        encoder = load_component(path, "text_encoder", revision, self.dtype, family=self.family)
        self.text_encoder = encoder.to(self.device).eval().requires_grad_(False)

    def release(self):
        self.tokenizer = self.text_encoder = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# Cache bookkeeping
# ----------------------------------------------------------------------------------------------------------------


def print_verify(output_dir):
    stats, problems = verify_cache(output_dir)
    for problem in problems[:50]:
        print(f"PROBLEM {problem}")
    print(f"cache {output_dir}: " + ", ".join(f"{k}={v}" for k, v in stats.items()))
    return not problems


# ----------------------------------------------------------------------------------------------------------------
def cache_videos(args, layout, accelerator):
    """Cache this run's part of the videos; return the shard's report (on the main process)."""
    torch.backends.cudnn.benchmark = True  # VAE calls repeat a few shapes, so the fastest conv kernels pay off
    path, revision, device = args.pretrained_model_name_or_path, args.revision, accelerator.device
    dtype = model_dtype(args.vae_dtype, device)
    family = detect_family(path, revision)
    transformer_config = load_component_config(path, "transformer", revision)
    kind = text_embed_kind(transformer_config, args.text_embeds)
    projection, sha = load_text_projection(path, revision, family, kind, device, dtype)
    text_embeds = {"kind": kind, "shape": [512, text_embed_width(transformer_config, kind)], "projection_sha": sha}
    vae = load_component(path, "vae", revision, dtype, family=family).to(device).eval().requires_grad_(False)
    config = cache_config(args, vae.config, text_embeds, family.name)
    check_cache_compatible(args.output_dir, config)
    shard_dir = os.path.join(args.output_dir, f"shard_{args.shard_index:05d}")
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
        remove_stale_temp_files(shard_dir)
        write_cache_info(args.output_dir, config)
    accelerator.wait_for_everyone()

    captions = read_captions_file(args.captions_file, args.caption_field) if args.captions_file else {}
    num_parts = args.num_shards * accelerator.num_processes
    part = args.shard_index * accelerator.num_processes + accelerator.process_index
    loader = torch.utils.data.DataLoader(
        VideoClips(args, layout, shard_dir, captions, part, num_parts),
        batch_size=None,
        num_workers=args.num_workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=accelerator.device.type == "cuda",
    )
    # Captions known up front (local folders) are encoded now, and the text encoder is freed before the VAE loop.
    text_cache = TextEmbedCache(args.output_dir, args, family, projection, device, dtype)
    if args.video_dir:
        with stage("encoding captions"):
            for key, video_path in list_local_videos(args.video_dir)[part::num_parts]:
                text_cache.ensure(captions.get(key) or sidecar_caption(video_path, args.caption_field) or args.prompt)
        text_cache.release()
    gpu = accelerator.device.type == "cuda"
    mode = args.vae_encode or ("whole" if gpu else "chunked")
    compile_vae = args.compile_vae if args.compile_vae is not None else gpu and mode == "whole"
    encode = ClipEncoder(vae, mode, compile_vae, args.batch_size)
    written, skipped, failures, keys_captioned = 0, 0, [], set()
    batches = {bucket: [] for bucket in args.buckets}  # one VAE batch per clip shape
    start, workers_cpu = time.time(), children_cpu_seconds()
    clock = LoopClock(start)
    progress = tqdm(desc=f"shard {args.shard_index}", unit="clip", disable=not accelerator.is_local_main_process)
    # Files are written on a background thread while the GPU encodes the next batch.
    writer, pending = ThreadPoolExecutor(max_workers=1), deque()

    def flush(batch):
        nonlocal written
        with stage(f"encoding {len(batch)} clips of {batch[0]['key']}"):
            hashes = [text_cache.ensure(item["caption"]) for item in batch]
            latents = encode_clips(encode, [item["frames"] for item in batch], vae.config)
        clock.first_batch = clock.first_batch or time.time() - start
        pending.append(writer.submit(write_clips, list(batch), latents, hashes, shard_dir, config))
        while len(pending) > 2:
            wait_for_write(pending.popleft())
        written += len(batch)
        progress.update(len(batch))
        progress.set_postfix(
            clips_per_s=f"{written / (time.time() - start):.2f}",
            data_wait=f"{clock.data_wait_share():.0%}",
            failed=len(failures),
        )
        batch.clear()

    for item in clock.items(loader):
        if item["caption_from_file"]:
            keys_captioned.add(item["key"])
        if "error" in item:
            failures.append({"key": item["key"], "reason": item["error"]})
            tqdm.write(f"skipped video {item['key']}: {item['error']}")
        elif "skipped" in item:
            skipped += item["skipped"]
        else:
            batch = batches[item["bucket"]]
            batch.append(item)
            if len(batch) == args.batch_size:
                flush(batch)
    for batch in batches.values():
        if batch:
            flush(batch)
    for future in pending:
        wait_for_write(future)
    writer.shutdown()
    progress.close()
    seconds = time.time() - start
    result = {"written": written, "skipped": skipped, "failures": failures, "seconds": seconds}
    result.update(first_batch=clock.first_batch, data_wait_share=clock.data_wait_share())
    result.update(workers_cpu=children_cpu_seconds() - workers_cpu, vae_encode=encode.mode, compile=encode.compiled)

    result["keys"] = keys_captioned
    results = gather_object([result])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report = {
            "written": sum(r["written"] for r in results),
            "already_cached": sum(r["skipped"] for r in results),
            "failures": [f for r in results for f in r["failures"]],
            "seconds": round(max(r["seconds"] for r in results), 2),
        }
        report["clips_per_second"] = round(report["written"] / max(report["seconds"], 1e-9), 3)
        # Start-up and compilation fall in the first batch; the share of time the loop waited for decoded clips (the
        # GPU idles then) is the slowest process's; the decode workers' CPU seconds are summed over processes.
        report["first_batch_seconds"] = round(max(r["first_batch"] for r in results), 2)
        report["data_wait_share"] = round(max(r["data_wait_share"] for r in results), 4)
        report["decode_workers_cpu_seconds"] = round(sum(r["workers_cpu"] for r in results), 2)
        report["vae_encode"] = results[0]["vae_encode"]
        report["compile_vae"] = results[0]["compile"]
        if args.captions_file:
            report["captions_file_keys_matched"] = len(set().union(*(r["keys"] for r in results)))
        atomic_write_text(os.path.join(shard_dir, "report.json"), json.dumps(report, indent=2))
        rebuild_manifest(shard_dir)
        info = write_cache_info(args.output_dir, config)
        print(
            f"shard {args.shard_index}/{args.num_shards}: wrote {report['written']} clips in {report['seconds']} s "
            f"({report['clips_per_second']} clips/s, {report['data_wait_share']:.0%} of the time waiting for decoded "
            f"clips), "
            f"{report['already_cached']} already cached, {len(report['failures'])} videos skipped; "
            f"cache holds {info['num_clips']} clips ("
            + ", ".join(f"{n} {name}" for name, n in info["clips_per_bucket"].items())
            + ")"
        )
        if args.captions_file:
            print(
                f"--captions_file: {report['captions_file_keys_matched']} of its {len(captions)} keys matched a "
                "video of this shard"
            )
        return report
    return None


def wait_for_write(future):
    """Wait for one batch's files, re-raising here what failed on the writer thread."""
    with stage("writing latents"):
        future.result()


def check_captions_file(args):
    """With --video_dir all keys are known up front: report how many captions match one, and refuse none."""
    captions = read_captions_file(args.captions_file, args.caption_field)
    keys = [key for key, _ in list_local_videos(args.video_dir)]
    matched = len(set(captions) & set(keys))
    if not matched:
        raise ValueError(
            f"--captions_file {args.captions_file}: none of its {len(captions)} keys (e.g. "
            f"{next(iter(captions), 'none')!r}) matches a video key under --video_dir (e.g. {keys[0]!r})"
        )
    print(f"--captions_file: {matched} of its {len(captions)} keys match one of the {len(keys)} videos")


def main(args):
    validate_args(args)
    ok = True
    if args.video_dir or args.tars or args.dataset:
        # Check the source before any model loads: the layout of a dataset, the captions file of a folder.
        layout = probe_layout(args) if not args.video_dir else None
        if args.video_dir and args.captions_file:
            check_captions_file(args)
        accelerator = Accelerator()
        report = cache_videos(args, layout, accelerator)
        if report is not None and report["failures"] and not report["written"] and not report["already_cached"]:
            print("error: no clip could be cached", file=sys.stderr)
            ok = False
        if not accelerator.is_main_process:
            return 0
    if args.verify:
        ok = print_verify(args.output_dir) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    run_main(main, parse_args)
