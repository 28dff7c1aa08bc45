#!/usr/bin/env python
"""Encode videos into a latent cache for train_cosmos_lora.py.

Videos come from a local folder, local WebDataset tar shards, or a Hugging Face dataset streamed with `datasets`.
Each video is cut into clips of `--num_frames` frames at `--fps`, fitted to `--height` x `--width`, and encoded with
the frozen Wan2.1 VAE of the Cosmos checkpoint. Every clip is stored as one safetensors file holding the VAE posterior
mean, normalized as the Cosmos pipeline normalizes latents. Captions are encoded once each with the checkpoint's T5.

    OUTPUT/cache_info.json                 config, model id, VAE normalization, counts
    OUTPUT/text_embeds/HASH.safetensors    T5 embeddings [512, D] per unique caption
    OUTPUT/shard_00000/KEY__000.safetensors  latents [16, (N-1)/4+1, H/8, W/8] in bfloat16
    OUTPUT/shard_00000/manifest.jsonl      one row per clip file
    OUTPUT/shard_00000/report.json         what the last run of this shard cached and skipped

Rerunning skips finished clips, and all writes are atomic, so a killed job is finished by running it again.

    python cache_latents.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --dataset builddotai/Egocentric-100K --data_files 'factory001/**/*.tar' --output_dir /scratch/cache
"""

import argparse
import glob
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from cosmos_cache import (
    TEXT_EMBEDS_DIR,
    atomic_save,
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
)
from cosmos_cli import HelpFormatter, check_pretrained_model, non_negative_int, positive_int
from cosmos_model import encode_prompts, normalize_latents
from cosmos_video import (
    check_clip_geometry,
    decode_frames,
    fit_frames,
    frames_to_vae_input,
    open_video,
    plan_clips,
    probe_video,
)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov")
DEFAULT_PROMPT = "An egocentric video from a head-mounted camera of a worker's hands doing manual work in a factory."
# Settings that must match for clips to share one cache.


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default="nvidia/Cosmos-Predict2-2B-Video2World",
        help="Hub id or local diffusers directory of a Cosmos-Predict2 Video2World checkpoint. "
        "Its vae/, text_encoder/ and tokenizer/ are used.",
    )
    parser.add_argument("--output_dir", required=True, help="Cache directory to create or complete.")
    source = parser.add_argument_group("source (exactly one, except with --verify alone)")
    source.add_argument("--video_dir", help="Local folder searched recursively for .mp4/.mkv/.webm/.mov files.")
    source.add_argument(
        "--tars",
        help="Glob of local WebDataset tar shards holding KEY.mp4 (+ KEY.json), e.g. '/data/ego/factory*/**/*.tar'.",
    )
    source.add_argument(
        "--dataset",
        help="Hugging Face dataset id (or local dataset folder) streamed with "
        "`datasets`, e.g. builddotai/Egocentric-100K. Gated datasets read the "
        "token from the environment (HF_TOKEN or `hf auth login`).",
    )
    source.add_argument(
        "--data_files", default=None, help="With --dataset: glob of files to stream, e.g. 'factory001/**/*.tar'."
    )
    source.add_argument("--split", default="train", help="With --dataset: split to stream.")
    source.add_argument("--video_column", default="mp4", help="With --tars/--dataset: column holding the video.")
    clips = parser.add_argument_group("clips")
    clips.add_argument(
        "--num_frames", type=int, default=61, help="Frames per clip; must be 4k+1 (61 -> 16 latent frames)."
    )
    clips.add_argument("--fps", type=float, default=8.0, help="Frame rate the clips are resampled to.")
    clips.add_argument("--height", type=int, default=256, help="Clip height in pixels, a multiple of 16.")
    clips.add_argument(
        "--width",
        type=int,
        default=448,
        help="Clip width in pixels, a multiple of 16 (456-wide Egocentric-100K videos are centre-cropped to 448).",
    )
    clips.add_argument(
        "--resize_mode",
        choices=["crop", "resize"],
        default="crop",
        help="crop: scale to cover the target size and centre-crop; resize: stretch to it.",
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
    args = parser.parse_args(argv)
    resolve_shard_args(args)
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
    if args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    if args.clip_stride_seconds is not None and args.clip_stride_seconds <= 0:
        raise ValueError(f"--clip_stride_seconds must be positive, got {args.clip_stride_seconds}")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(
            f"--shard_index {args.shard_index} is outside 0..{args.num_shards - 1} (--num_shards {args.num_shards})"
        )
    if args.video_dir and not os.path.isdir(args.video_dir):
        raise FileNotFoundError(f"--video_dir {args.video_dir} is not a directory")
    if args.tars and not glob.glob(args.tars, recursive=True):
        raise FileNotFoundError(f"--tars {args.tars!r} matches no file")
    if args.captions_file and not os.path.isfile(args.captions_file):
        raise FileNotFoundError(f"--captions_file {args.captions_file} does not exist")
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
    """The same `datasets` streaming code path reads hub datasets and local tar shards."""
    import datasets

    if args.tars:
        files = sorted(glob.glob(args.tars, recursive=True))
        ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(args.dataset, data_files=args.data_files, split=args.split, streaming=True)
    return ds.decode(False)  # raw mp4 bytes: we decode with PyAV, not the Video feature


def take_part(ds, num_parts, index):
    """Part `index` of `num_parts` of a streaming dataset, split by whole files so nothing is read twice."""
    if num_parts == 1:
        return ds
    if index >= ds.num_shards:
        return None  # more parts than files: this part has no file
    return ds.shard(num_shards=min(num_parts, ds.num_shards), index=index)


def iter_part_videos(args, captions, part, num_parts):
    """(key, video, caption) for the videos of part `part` of `num_parts`."""
    if args.video_dir:
        for key, path in list_local_videos(args.video_dir)[part::num_parts]:
            yield key, path, captions.get(key) or sidecar_caption(path, args.caption_field) or args.prompt
        return
    ds = take_part(load_streaming_dataset(args), num_parts, part)
    for example in ds or []:
        key = example["__key__"]
        meta = example.get("json") or {}
        video = example[args.video_column]
        video = video["bytes"] if isinstance(video, dict) else video
        yield key, video, captions.get(key) or meta.get(args.caption_field) or args.prompt


class VideoClips(torch.utils.data.IterableDataset):
    """Decodes this process's videos in DataLoader workers and yields clips still missing from the cache.

    Items are dicts: a clip (`frames` uint8 [T, H, W, 3] plus metadata), `{"error": ...}` for a video that could not
    be used, or `{"skipped": n}` for a video whose n clips are already cached.
    """

    def __init__(self, args, shard_dir, captions, part, num_parts):
        self.args, self.shard_dir, self.captions = args, shard_dir, captions
        self.part, self.num_parts = part, num_parts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w of process-part p reads sub-part p + w * num_parts of num_parts * num_workers.
        videos = iter_part_videos(
            self.args, self.captions, self.part + worker * self.num_parts, self.num_parts * num_workers
        )
        for key, video, caption in videos:
            try:
                yield from self.video_clips(key, video, caption)
            except Exception as error:  # a corrupt or truncated video is reported, never fatal
                yield {"key": key, "error": f"{type(error).__name__}: {error}".splitlines()[0]}

    def video_clips(self, key, video, caption):
        a = self.args
        with open_video(video) as container:
            num_source_frames, source_fps = probe_video(container)
            clips = plan_clips(
                num_source_frames, source_fps, a.num_frames, a.fps, a.clip_stride_seconds, a.max_clips_per_video
            )
            if not clips:
                yield {
                    "key": key,
                    "error": f"too short: {num_source_frames / source_fps:.2f} s, a clip needs "
                    f"{(a.num_frames - 1) / a.fps:.2f} s",
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
            frames = decode_frames(container, {i for c in todo for i in clips[c]})
        for c in todo:
            if clips[c][-1] not in frames:
                yield {
                    "key": key,
                    "error": f"truncated: clip {c} needs frame {clips[c][-1]}, decoded {len(frames)} wanted frames",
                }
                break
            clip = fit_frames(
                torch.stack([torch.from_numpy(frames[i]) for i in clips[c]]), a.height, a.width, a.resize_mode
            )
            yield {
                "key": key,
                "clip_index": c,
                "frames": clip,
                "caption": caption,
                "start_seconds": clips[c][0] / source_fps,
                "source_fps": source_fps,
            }


# ----------------------------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode_clips(vae, frames, vae_config):
    """uint8 clips [B, T, H, W, 3] -> normalized posterior-mean latents [B, 16, T', H/8, W/8] in bfloat16.

    The clips travel to the GPU as uint8 (a quarter of the bytes of float32) and are converted there.
    """
    x = torch.stack([frames_to_vae_input(f.to(vae.device, non_blocking=True)) for f in frames]).to(vae.dtype)
    if vae.device.type == "cuda":  # cuDNN's 3D convolutions run channels-last; this saves a layout copy per conv
        x = x.contiguous(memory_format=torch.channels_last_3d)
    latents = vae.encode(x).latent_dist.mean.float()
    return normalize_latents(latents, vae_config).to(torch.bfloat16).cpu()


class TextEmbedCache:
    """Encodes each caption once and stores it as text_embeds/HASH.safetensors."""

    def __init__(self, output_dir, tokenizer, text_encoder):
        self.output_dir, self.tokenizer, self.text_encoder = output_dir, tokenizer, text_encoder
        os.makedirs(os.path.join(output_dir, TEXT_EMBEDS_DIR), exist_ok=True)
        self.known = set()

    def ensure(self, caption):
        hash_ = caption_hash(caption)
        path = text_embed_path(self.output_dir, hash_)
        if hash_ not in self.known and not os.path.exists(path):
            embeds = encode_prompts(self.tokenizer, self.text_encoder, [caption], self.text_encoder.device)
            atomic_save({"prompt_embeds": embeds[0].to(torch.bfloat16).cpu()}, path, {"caption": caption})
        self.known.add(hash_)
        return hash_


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
def load_models(args, device):
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, T5EncoderModel

    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
    }[args.vae_dtype]
    path = args.pretrained_model_name_or_path
    vae = AutoencoderKLWan.from_pretrained(path, subfolder="vae", torch_dtype=dtype).to(device).eval()
    vae.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
    text_encoder = T5EncoderModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype).to(device).eval()
    return vae, tokenizer, text_encoder


def cache_videos(args, accelerator):
    """Cache this run's part of the videos; return the number of clips written."""
    torch.backends.cudnn.benchmark = True  # every VAE call has the same shape, so the fastest conv kernels pay off
    vae, tokenizer, text_encoder = load_models(args, accelerator.device)
    config = cache_config(args, vae.config, text_encoder.config.d_model)
    check_cache_compatible(args.output_dir, config)
    shard_dir = os.path.join(args.output_dir, f"shard_{args.shard_index:05d}")
    if accelerator.is_main_process:
        os.makedirs(shard_dir, exist_ok=True)
        remove_stale_temp_files(shard_dir)
        remove_stale_temp_files(os.path.join(args.output_dir, TEXT_EMBEDS_DIR))
        write_cache_info(args.output_dir, config)
    accelerator.wait_for_everyone()

    captions = read_captions_file(args.captions_file, args.caption_field) if args.captions_file else {}
    num_parts = args.num_shards * accelerator.num_processes
    part = args.shard_index * accelerator.num_processes + accelerator.process_index
    loader = torch.utils.data.DataLoader(
        VideoClips(args, shard_dir, captions, part, num_parts),
        batch_size=None,
        num_workers=args.num_workers,
        pin_memory=accelerator.device.type == "cuda",
    )
    text_cache = TextEmbedCache(args.output_dir, tokenizer, text_encoder)
    written, skipped, failures, batch = 0, 0, [], []
    start = time.time()
    progress = tqdm(desc=f"shard {args.shard_index}", unit="clip", disable=not accelerator.is_local_main_process)
    # Files are written on a background thread while the GPU encodes the next batch.
    writer, pending = ThreadPoolExecutor(max_workers=1), deque()

    def flush():
        nonlocal written
        hashes = [text_cache.ensure(item["caption"]) for item in batch]
        latents = encode_clips(vae, [item["frames"] for item in batch], vae.config)
        pending.append(writer.submit(write_clips, list(batch), latents, hashes, shard_dir, config))
        while len(pending) > 2:
            pending.popleft().result()  # re-raises a failed write here
        written += len(batch)
        progress.update(len(batch))
        progress.set_postfix(clips_per_s=f"{written / (time.time() - start):.2f}", failed=len(failures))
        batch.clear()

    for item in loader:
        if "error" in item:
            failures.append({"key": item["key"], "reason": item["error"]})
            tqdm.write(f"skipped video {item['key']}: {item['error']}")
        elif "skipped" in item:
            skipped += item["skipped"]
        else:
            batch.append(item)
            if len(batch) == args.batch_size:
                flush()
    if batch:
        flush()
    for future in pending:
        future.result()
    writer.shutdown()
    progress.close()
    seconds = time.time() - start

    results = gather_object([{"written": written, "skipped": skipped, "failures": failures, "seconds": seconds}])
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        report = {
            "written": sum(r["written"] for r in results),
            "already_cached": sum(r["skipped"] for r in results),
            "failures": [f for r in results for f in r["failures"]],
            "seconds": round(max(r["seconds"] for r in results), 2),
        }
        report["clips_per_second"] = round(report["written"] / max(report["seconds"], 1e-9), 3)
        atomic_write_text(os.path.join(shard_dir, "report.json"), json.dumps(report, indent=2))
        rebuild_manifest(shard_dir)
        info = write_cache_info(args.output_dir, config)
        print(
            f"shard {args.shard_index}/{args.num_shards}: wrote {report['written']} clips in {report['seconds']} s "
            f"({report['clips_per_second']} clips/s), "
            f"{report['already_cached']} already cached, {len(report['failures'])} videos skipped; "
            f"cache holds {info['num_clips']} clips"
        )
        return report
    return None


def main(args):
    validate_args(args)
    ok = True
    if args.video_dir or args.tars or args.dataset:
        accelerator = Accelerator()
        report = cache_videos(args, accelerator)
        if report is not None and report["failures"] and not report["written"] and not report["already_cached"]:
            print("error: no clip could be cached", file=sys.stderr)
            ok = False
        if not accelerator.is_main_process:
            return 0
    if args.verify:
        ok = print_verify(args.output_dir) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main(parse_args()))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"error: {error}")
