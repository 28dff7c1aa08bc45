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
import json
import os
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
    DEFAULT_PROMPT,
    HelpFormatter,
    add_clip_plan_arguments,
    add_config_argument,
    add_model_arguments,
    add_shard_arguments,
    add_source_arguments,
    add_video_clip_arguments,
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
from cosmos_sources import (
    Captions,
    clip_id,
    clip_plan,
    clip_plan_sha,
    given_sources,
    iter_part_videos,
    list_local_videos,
    local_part_videos,
    plan_video,
    probe_layout,
    read_captions_file,
    resolve_source_args,
    sidecar_caption,
    validate_source_args,
)
from cosmos_video import decode_frames, fit_frames, frames_to_vae_input, open_video


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
    add_video_clip_arguments(clips)
    text = parser.add_argument_group("captions")
    text.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help="Caption for videos without one (Egocentric-100K has no captions)."
    )
    text.add_argument(
        "--text_embeds",
        choices=["projected", "full"],
        default="projected",
        help="Predict2.5 only: store each caption as the output of the transformer's frozen crossattn_proj "
        "[512, 1024] (1 MB before the cache's lossless compression; valid while crossattn_proj stays frozen and "
        "unchanged, which training checks), or the full Qwen2.5-VL embedding [512, 100352] (103 MB before "
        "compression). Predict2 stores T5 embeddings [512, 1024] either way.",
    )
    text.add_argument(
        "--caption_field",
        default="caption",
        help="Field read from KEY.json sidecars, the tar json, or --captions_file rows.",
    )
    text.add_argument(
        "--captions_file",
        default=None,
        help="Captions per video or per clip: a jsonl or csv with a `key` column and the --caption_field column "
        "(keys are video keys: folder: path relative to --video_dir without extension; tars: the member name), or "
        "the output folder (or one jsonl) of caption_clips.py, whose rows caption one clip each, matched by key and "
        "start time; those must come from this run's clip plan.",
    )
    text.add_argument(
        "--missing_caption",
        choices=["error", "prompt"],
        default="error",
        help="With per-clip captions: a clip without one stops the run naming it (error), or is captioned --prompt.",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--batch_size",
        type=positive_int,
        default=4,
        help="Clips per VAE encode call (the compiled encode of 61x256x448 clips: 10.2 clips/s at 4, 9.2 at 8 on an "
        "H100; benchmarks/RESULTS.md). A GPU whose free memory holds fewer clips of a shape gets fewer per call, "
        "with a message.",
    )
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
    add_shard_arguments(run, "caches")
    run.add_argument(
        "--verify",
        action="store_true",
        help="Check every file of the cache and print its statistics. Alone (no source) it only "
        "verifies; with a source it verifies after caching.",
    )
    args = parse_with_config(parser, argv)
    resolve_source_args(args)
    return args


def validate_args(args):
    """Fail at once, before any model loads, with a one-line error."""
    sources = given_sources(args)
    if not sources and not args.verify:
        raise ValueError("give a source: --video_dir, --tars or --dataset (or --verify alone to check a cache)")
    validate_source_args(args, source_required=False)
    if args.captions_file and not os.path.exists(args.captions_file):
        raise FileNotFoundError(f"--captions_file {args.captions_file} does not exist")
    if args.compile_vae and args.vae_encode == "chunked":
        raise ValueError(
            "--compile_vae needs --vae_encode whole (compiling the chunked encode recompiles on its cache)"
        )
    if sources:  # last: the values above are cheaper to fix than a download
        check_pretrained_model(args.pretrained_model_name_or_path, ["vae", "text_encoder", "tokenizer"])


class VideoClips(torch.utils.data.IterableDataset):
    """Decodes this process's videos in DataLoader workers and yields clips still missing from the cache.

    Items are dicts with the video's `key`: a clip (`frames` uint8 [T, H, W, 3], its `bucket`, `caption` and
    metadata), `{"error": ...}` for a video that could not be used, `{"skipped": n}` for a video whose n clips are
    already cached, or `{"missing_caption": start}` for a clip that per-clip captions do not cover (without
    --missing_caption prompt). `caption_from_file` says whether --captions_file captioned the video or the clip.
    """

    def __init__(self, args, layout, shard_dir, captions, part, num_parts):
        self.args, self.layout, self.shard_dir, self.captions = args, layout, shard_dir, captions
        self.part, self.num_parts = part, num_parts

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # Worker w of process-part p reads sub-part p + w * num_parts of num_parts * num_workers.
        part, num_parts = self.part + worker * self.num_parts, self.num_parts * num_workers
        videos = iter_part_videos(
            self.args, self.layout, part, num_parts, self.captions.videos, self.args.caption_field
        )
        seen = set()
        for source in videos:
            tag = {"key": source.key, "caption_from_file": source.key in self.captions.videos}
            if source.key in seen:
                yield tag | {"error": "duplicate key: an earlier video of this source has the same key"}
                continue
            seen.add(source.key)
            try:
                if isinstance(source.video, Exception):
                    raise source.video
                for item in self.video_clips(source):
                    yield tag | item
            except Exception as error:  # a corrupt or truncated video is reported, never fatal
                yield tag | {"error": f"{type(error).__name__}: {error}".splitlines()[0]}

    def clip_caption(self, source, clip):
        """{"caption", "caption_from_file"} of a clip: its per-clip caption where the captions file has per-clip
        rows (else --prompt with --missing_caption prompt, else {"missing_caption"}), otherwise the video's."""
        if not self.captions.clips:
            return {"caption": source.caption or self.args.prompt}
        caption = self.captions.clips.get(clip_id(source.key, clip.start_seconds))
        if caption:
            return {"caption": caption, "caption_from_file": True}
        if self.args.missing_caption == "prompt":
            return {"caption": self.args.prompt, "caption_from_file": False}
        return {"missing_caption": round(clip.start_seconds, 3)}

    def video_clips(self, source):
        a = self.args
        with open_video(source.video) as container:
            plan = plan_video(container, a)
            if plan.error:
                yield {"error": plan.error}
                return
            todo = [
                clip
                for clip in plan.clips
                if not os.path.exists(os.path.join(self.shard_dir, clip_file_name(source.key, clip.index)))
            ]
            if not todo:
                yield {"skipped": len(plan.clips)}
                return
            frames = decode_frames(container, {i for clip in todo for i in clip.indices})
        for clip in todo:
            caption = self.clip_caption(source, clip)
            if "missing_caption" in caption:
                yield caption
                return
            if clip.indices[-1] not in frames:
                yield {
                    "error": f"truncated: clip {clip.index} needs frame {clip.indices[-1]}, decoded {len(frames)} "
                    "wanted frames"
                }
                break
            clip_frames = torch.stack([torch.from_numpy(frames[i]) for i in clip.indices])
            yield caption | {
                "clip_index": clip.index,
                "bucket": clip.bucket,
                "frames": fit_frames(clip_frames, clip.bucket.height, clip.bucket.width, a.resize_mode),
                "start_seconds": clip.start_seconds,
                "source_fps": plan.source_fps,
            }


# ----------------------------------------------------------------------------------------------------------------
# Encoding and writing
# ----------------------------------------------------------------------------------------------------------------


class ClipEncoder:
    """The VAE encode: whole-clip (cosmos_vae.encode_whole_clip, compiled or eager) or diffusers' chunked encode.

    On a GPU the whole-clip encode takes as many of a batch's clips per call as its counted peak memory lets it
    (cosmos_vae.whole_clips_that_fit, once per clip shape), and a clip shape that does not fit even alone is encoded
    chunked; each case says so once. A VAE layout the whole-clip encode does not know is encoded chunked, with a
    message; so is every batch after a whole-clip call ran out of GPU memory all the same.
    """

    def __init__(self, vae, mode, compile_vae, batch_size):
        reason = cosmos_vae.whole_clip_unsupported(vae) if mode == "whole" else None
        if reason:
            print(f"--vae_encode whole: {reason}; encoding chunked")
            mode = "chunked"
        if vae.device.type == "cuda":  # cuDNN runs convolutions channels-last: keep the whole encode in that format
            cosmos_vae.convolutions_channels_last(vae)
        self.vae, self.mode, self.batch_size = vae, mode, batch_size
        self.compiled = compile_vae and mode == "whole"
        encode = cosmos_vae.encode_whole_clip
        self.encode_whole = torch.compile(encode, dynamic=False) if self.compiled else encode
        self.clips_per_call = {}  # clip shape -> clips one whole-clip call takes (0: encoded chunked)

    def __call__(self, x):
        """VAE input [B, 3, T, H, W] -> posterior mean [B, 16, T', h, w]."""
        if self.vae.device.type == "cuda":  # the input in the weights' format
            x = x.contiguous(memory_format=torch.channels_last_3d)
        clips = self.whole_clips_per_call(x) if self.mode == "whole" else 0
        if clips:
            try:
                return torch.cat([self.encode_whole_call(part, clips) for part in x.split(clips)])
            except torch.OutOfMemoryError:
                self.mode, self.compiled = "chunked", False
                tqdm.write(
                    f"the whole-clip encode of {clips} clips ran out of GPU memory; encoding chunked from now on "
                    "(a lower --batch_size keeps it whole)"
                )
            torch.cuda.empty_cache()
        return self.vae.encode(x).latent_dist.mean

    def whole_clips_per_call(self, x):
        """How many clips of x's shape one whole-clip call takes: the batch size, or fewer on a GPU whose free memory
        holds fewer (0: none, so they are encoded chunked). Says so once per shape when it is fewer."""
        shape = tuple(x.shape[1:])
        if shape not in self.clips_per_call:
            free = cosmos_vae.free_gpu_bytes(x.device)
            encode = cosmos_vae.encode_whole_clip
            clips = self.batch_size if free is None else cosmos_vae.whole_clips_that_fit(
                self.vae, encode, shape, self.batch_size, free
            )  # fmt: skip
            if clips < self.batch_size:
                clip = "x".join(map(str, shape[1:]))
                what = f"{clips} at a time" if clips else "chunked (slower)"
                free_gib = free / 2**30
                tqdm.write(
                    f"{self.batch_size} {clip} clips in one whole-clip encode do not fit in the {free_gib:.1f} GiB of "
                    f"GPU memory free: encoding them {what}"
                )
            self.clips_per_call[shape] = clips
        return self.clips_per_call[shape]

    def encode_whole_call(self, x, clips):
        """One whole-clip call; compiled, a short last part is padded to `clips`, so that no new shape compiles."""
        size = len(x)
        if self.compiled and size < clips:
            x = torch.cat([x, x[-1:].expand(clips - size, *x.shape[1:])])
        return self.encode_whole(self.vae, x)[:size]


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
    first_batch: float = 0.0  # seconds from the start until the first batch was encoded
    first_batch_clips: int = 0

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
def cache_videos(args, layout, captions, accelerator):
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
            for caption in known_captions(args, captions, part, num_parts):
                text_cache.ensure(caption)
        text_cache.release()
    gpu = accelerator.device.type == "cuda"
    mode = args.vae_encode or ("whole" if gpu else "chunked")
    compile_vae = args.compile_vae if args.compile_vae is not None else gpu and mode == "whole"
    encode = ClipEncoder(vae, mode, compile_vae, args.batch_size)
    written, skipped, failures, keys_captioned, clips_captioned = 0, 0, [], set(), 0
    batches = {bucket: [] for bucket in args.buckets}  # one VAE batch per clip shape
    start, workers_cpu = time.time(), children_cpu_seconds()
    clock = LoopClock(start)
    progress = tqdm(desc=f"shard {args.shard_index}", unit="clip", disable=not accelerator.is_local_main_process)
    # Files are written on a background thread while the GPU encodes the next batch.
    writer, pending = ThreadPoolExecutor(max_workers=1), deque()

    def flush(batch):
        nonlocal written, clips_captioned
        with stage(f"encoding {len(batch)} clips of {batch[0]['key']}"):
            hashes = [text_cache.ensure(item["caption"]) for item in batch]
            latents = encode_clips(encode, [item["frames"] for item in batch], vae.config)
        if not clock.first_batch:
            clock.first_batch, clock.first_batch_clips = time.time() - start, len(batch)
        pending.append(writer.submit(write_clips, list(batch), latents, hashes, shard_dir, config))
        while len(pending) > 2:
            wait_for_write(pending.popleft())
        written += len(batch)
        clips_captioned += sum(bool(item["caption_from_file"]) for item in batch)
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
        if "missing_caption" in item:
            raise ValueError(
                f"--captions_file {args.captions_file} has no caption for the clip of {item['key']} at "
                f"{item['missing_caption']} s: caption it with caption_clips.py (same clip plan), or pass "
                "--missing_caption prompt to caption such clips --prompt"
            )
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
    if written > clock.first_batch_clips:  # the rate once started and compiled
        result["rate_after_first_batch"] = (written - clock.first_batch_clips) / (seconds - clock.first_batch)
    result.update(workers_cpu=children_cpu_seconds() - workers_cpu, vae_encode=encode.mode, compile=encode.compiled)

    result.update(keys=keys_captioned, clips_captioned=clips_captioned)
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
        if all("rate_after_first_batch" in r for r in results):
            report["clips_per_second_after_first_batch"] = round(sum(r["rate_after_first_batch"] for r in results), 3)
        report["data_wait_share"] = round(max(r["data_wait_share"] for r in results), 4)
        report["decode_workers_cpu_seconds"] = round(sum(r["workers_cpu"] for r in results), 2)
        report["vae_encode"] = results[0]["vae_encode"]
        report["compile_vae"] = results[0]["compile"]
        if args.captions_file:
            report["captions_file_keys_matched"] = len(set().union(*(r["keys"] for r in results)))
            report["clips_captioned_from_file"] = sum(r["clips_captioned"] for r in results)
        atomic_write_text(os.path.join(shard_dir, "report.json"), json.dumps(report, indent=2))
        rebuild_manifest(shard_dir)
        info = write_cache_info(args.output_dir, config)
        print(
            f"shard {args.shard_index}/{args.num_shards}: wrote {report['written']} clips in {report['seconds']} s "
            f"({report['clips_per_second']} clips/s, {report.get('clips_per_second_after_first_batch', '-')} after "
            f"the first batch, {report['data_wait_share']:.0%} of the time waiting for decoded clips), "
            f"{report['already_cached']} already cached, {len(report['failures'])} videos skipped; "
            f"cache holds {info['num_clips']} clips ("
            + ", ".join(f"{n} {name}" for name, n in info["clips_per_bucket"].items())
            + ")"
        )
        if captions.clips:
            print(
                f"--captions_file: {report['clips_captioned_from_file']} of the {report['written']} clips written "
                f"got their own caption ({len(captions.clips)} clip captions in the file)"
            )
        elif args.captions_file:
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


def known_captions(args, captions, part, num_parts):
    """The captions of a local folder's part, known before any video is decoded: per clip where the captions file
    has per-clip rows, else per video (--captions_file, sidecar or --prompt)."""
    videos = local_part_videos(args.video_dir, part, num_parts)
    if captions.clips:
        keys = {key for key, _ in videos}
        return sorted({caption for (key, _), caption in captions.clips.items() if key in keys})
    return sorted(
        {captions.videos.get(key) or sidecar_caption(path, args.caption_field) or args.prompt for key, path in videos}
    )


def check_captions(args, captions):
    """Before any model loads: per-clip captions must come from this run's clip plan; with --video_dir, whose keys
    are known up front, report how many captions match a video, and refuse a file that matches none."""
    if captions.clips:
        plan = clip_plan_sha(clip_plan(args))
        if captions.clip_plans != {plan}:
            other = sorted(str(p) for p in captions.clip_plans - {plan})
            raise ValueError(
                f"--captions_file {args.captions_file} holds clip captions of another clip plan ({', '.join(other)}, "
                f"this run's is {plan}): caption with the same --fps/--buckets/--num_frames/--height/--width/"
                "--resize_mode/--clip_stride_seconds/--max_clips_per_video as this run"
            )
    if not args.video_dir:
        return
    keys = [key for key, _ in list_local_videos(args.video_dir)]
    file_keys = set(captions.videos) | {key for key, _ in captions.clips}
    matched = len(file_keys & set(keys))
    if not matched:
        raise ValueError(
            f"--captions_file {args.captions_file}: none of its {len(file_keys)} keys (e.g. "
            f"{next(iter(sorted(file_keys)), 'none')!r}) matches a video key under --video_dir (e.g. {keys[0]!r})"
        )
    print(f"--captions_file: {matched} of its {len(file_keys)} keys match one of the {len(keys)} videos")


def main(args):
    validate_args(args)
    ok = True
    if args.video_dir or args.tars or args.dataset:
        # Check the source before any model loads: the layout of a dataset, the captions file of a folder.
        layout = probe_layout(args) if not args.video_dir else None
        captions = read_captions_file(args.captions_file, args.caption_field) if args.captions_file else Captions()
        if args.captions_file:
            check_captions(args, captions)
        accelerator = Accelerator()
        report = cache_videos(args, layout, captions, accelerator)
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
