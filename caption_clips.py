#!/usr/bin/env python
"""Caption every clip that cache_latents.py will cache, with a Qwen2.5-VL-family vision-language model.

Egocentric-100K has no captions. Trained on one fixed --prompt, the text side of the cross-attention LoRA sees one
input and can learn only a constant; a caption per clip ties each sentence to what happens in that clip. This script
reads the same sources as cache_latents.py (--video_dir, --tars, --dataset in every layout) and plans the same clips
with the same code (cosmos_sources.py), shows the captioner frames from each clip's own time window (--caption_fps, at
most --caption_max_pixels each, cropped as the clip is), and writes one caption per clip:

    OUTPUT/captions_info.json              clip plan, caption model and revision, instruction (and its hash)
    OUTPUT/shard_00000/captions.jsonl      one row per clip: key, clip_index, start_seconds, num_frames, caption,
                                           caption_model, caption_model_revision, instruction_sha, clip_plan_sha
    OUTPUT/shard_00000/part_000000.jsonl   rows of finished batches, merged into captions.jsonl when the run ends
    OUTPUT/shard_00000/report.json         what the last run of this shard captioned and skipped

Every write is atomic and a rerun captions only the clips still missing, so a killed job is finished by running it
again. A rerun with another clip plan, model, revision or instruction into the same folder is refused. Then:

    python caption_clips.py --video_dir /data/ego/videos --output_dir /scratch/captions
    python cache_latents.py --video_dir /data/ego/videos --captions_file /scratch/captions --output_dir /scratch/cache
"""

import argparse
import glob
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # PyTorch < 2.10: the vision tower keeps transformers' per-window SDPA
    varlen_attn = None

from cosmos_cache import atomic_write_text, caption_hash, remove_stale_temp_files
from cosmos_cli import (
    HelpFormatter,
    add_clip_plan_arguments,
    add_config_argument,
    add_shard_arguments,
    add_source_arguments,
    add_video_clip_arguments,
    hub_offline,
    model_dtype,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
)
from cosmos_process import ignore_stop_signals, run_main, stage
from cosmos_sources import (
    CAPTION_SHARD_FILE,
    clip_plan,
    clip_plan_sha,
    iter_part_videos,
    plan_video,
    probe_layout,
    read_caption_rows,
    resolve_source_args,
    validate_source_args,
)
from cosmos_video import decode_frames, fit_frames, open_video

# NVIDIA's Cosmos Curator captions clips with Cosmos-Reason1-7B (a Qwen2.5-VL-7B fine-tune) by default, and the same
# weights are Cosmos-Predict2.5's text encoder.
DEFAULT_CAPTION_MODEL = "nvidia/Cosmos-Reason1-7B"
DEFAULT_INSTRUCTION = (
    "This video was recorded by a camera worn on the head of a person doing manual work. Describe it in 2 to 4 "
    "factual sentences: what the wearer's hands do and with which objects, the action and how far it has "
    "progressed by the end of the clip, how the camera moves, and the setting. Describe only what is visible; do "
    "not guess intentions, identities or anything outside the frame."
)
CAPTIONS_INFO = "captions_info.json"
HUB_INDEX_FILES = ("config.json", "model_index.json")  # a transformers model, or a diffusers checkpoint
# Settings that decide what a caption says: a folder holds captions of one setting only.
CAPTION_IDENTITY_KEYS = (
    "clip_plan_sha",
    "caption_model",
    "caption_model_revision",
    "instruction_sha",
    "caption_fps",
    "caption_max_pixels",
    "max_new_tokens",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_config_argument(parser)
    parser.add_argument("--output_dir", required=True, help="Captions folder to create or complete.")
    add_source_arguments(parser)
    clips = add_clip_plan_arguments(
        parser,
        "The clip plan: give the values cache_latents.py will get, so every caption belongs to one cached clip\n"
        "(cache_latents.py refuses captions of another plan). Without --buckets, one bucket.",
    )
    add_video_clip_arguments(clips)
    model = parser.add_argument_group("captioner")
    model.add_argument(
        "--caption_model",
        default=DEFAULT_CAPTION_MODEL,
        help="Hub id or local folder of a Qwen2.5-VL-family model (transformers). nvidia/Cosmos-Reason1-7B is "
        "NVIDIA's curator default; Qwen/Qwen2.5-VL-7B-Instruct also works; a diffusers Cosmos-Predict2.5 checkpoint "
        "(e.g. nvidia/Cosmos-Predict2.5-2B with --revision diffusers/base/post-trained) captions with its own "
        "text_encoder when that holds the vision tower.",
    )
    model.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --caption_model.")
    model.add_argument(
        "--caption_fps",
        type=positive_float,
        default=2.0,
        help="Frames per second of the clip shown to the captioner (2: 16 frames of a 61-frame clip at 8 fps).",
    )
    model.add_argument(
        "--caption_max_pixels",
        type=positive_int,
        default=448 * 448,
        help="Pixel budget per frame shown to the captioner: the clip's frames are scaled down to fit it, to "
        "multiples of the model's 28-pixel patch grid (256x448 clips: 252x448).",
    )
    model.add_argument(
        "--caption_prompt",
        default=DEFAULT_INSTRUCTION,
        help="Instruction given with each clip. Default: a description of egocentric work video (hands, objects, "
        "action and progress, camera motion, setting; 2-4 factual sentences).",
    )
    model.add_argument(
        "--max_new_tokens", type=positive_int, default=160, help="Caption length cap in tokens (greedy decoding)."
    )
    model.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="Captioner dtype; auto is bfloat16 on GPU and float32 on CPU. Attention runs through SDPA.",
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--batch_size",
        type=positive_int,
        default=128,
        help="Clips per generate call (128 of 16 frames at 252x448 take 53 GiB with a 7B captioner; a batch that "
        "runs out of GPU memory is captioned in halves from then on).",
    )
    run.add_argument(
        "--num_workers",
        type=non_negative_int,
        default=min(4, os.cpu_count() or 1),
        help="DataLoader workers decoding videos (0 decodes in the main process).",
    )
    add_shard_arguments(run, "captions")
    args = parse_with_config(parser, argv)
    resolve_source_args(args)
    return args


def captions_identity(args):
    """What captions_info.json records: every setting that decides what a caption says."""
    plan = clip_plan(args)
    return {
        "clip_plan": plan,
        "clip_plan_sha": clip_plan_sha(plan),
        "caption_model": args.caption_model,
        "caption_model_revision": args.revision,
        "instruction": args.caption_prompt,
        "instruction_sha": caption_hash(args.caption_prompt),  # the hash the cache names captions by
        "caption_fps": args.caption_fps,
        "caption_max_pixels": args.caption_max_pixels,
        "max_new_tokens": args.max_new_tokens,
    }


def check_output_compatible(output_dir, identity):
    """Refuse, in one line, a rerun that would mix captions of two settings in one folder."""
    path = os.path.join(output_dir, CAPTIONS_INFO)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    for key in CAPTION_IDENTITY_KEYS:
        if existing.get(key) != identity[key]:
            raise ValueError(
                f"{output_dir} holds captions made with {key}={existing.get(key)}, this run asks for {identity[key]}: "
                "one folder holds captions of one setting; use a new --output_dir"
            )


def validate_args(args):
    """Fail at once, before any model loads, with a one-line error."""
    validate_source_args(args)
    if args.caption_fps > args.fps:
        raise ValueError(f"--caption_fps {args.caption_fps} is above the clips' --fps {args.fps}")
    if args.caption_max_pixels < 28 * 28:
        raise ValueError(f"--caption_max_pixels {args.caption_max_pixels} is below one 28x28 patch group (784)")
    if not args.caption_prompt.strip():
        raise ValueError("--caption_prompt is empty")
    check_output_compatible(args.output_dir, captions_identity(args))


# ----------------------------------------------------------------------------------------------------------------
# The captioner: a Qwen2.5-VL model and its processor
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionerSource:
    """Where the captioner's weights and processor come from: a model folder or hub id, or the text_encoder and
    tokenizer of a diffusers Cosmos-Predict2.5 checkpoint (which has no image/video processor of its own)."""

    path: str
    revision: str | None
    model_subfolder: str  # "" or "text_encoder"
    diffusers: bool


def model_file(path, name, revision):
    """Local path of one file of a folder or hub repository, or None when it has no such file."""
    if os.path.isdir(path):
        local = os.path.join(path, name)
        return local if os.path.isfile(local) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return hf_hub_download(path, name, revision=revision)
    except EntryNotFoundError:
        return None


def captioner_source(path, revision):
    """Fail in one line on a missing folder, or on a hub id not in the local cache while the hub is offline."""
    if not os.path.isdir(path) and (path.startswith(("/", ".", "~")) or path.count("/") != 1):
        raise FileNotFoundError(f"--caption_model {path} does not exist (a local path)")
    if not os.path.isdir(path) and hub_offline():
        from huggingface_hub import try_to_load_from_cache

        if not any(isinstance(try_to_load_from_cache(path, f, revision=revision), str) for f in HUB_INDEX_FILES):
            raise FileNotFoundError(
                f"--caption_model {path} is a hub id, HF_HUB_OFFLINE is set and it is not in the local Hugging Face "
                f"cache: run `hf download {path}` on a login node with the same HF_HOME, or `hf download {path} "
                "--local-dir DIR` and pass DIR"
            )
    diffusers = model_file(path, "model_index.json", revision) is not None
    return CaptionerSource(path, revision, "text_encoder" if diffusers else "", diffusers)


def weight_names(source):
    """Names of the captioner's weight tensors, from its safetensors index or the header of its one file."""
    prefix = f"{source.model_subfolder}/" if source.model_subfolder else ""
    index = model_file(source.path, prefix + "model.safetensors.index.json", source.revision)
    if index:
        with open(index) as f:
            return list(json.load(f)["weight_map"])
    single = model_file(source.path, prefix + "model.safetensors", source.revision)
    if single is None:
        raise FileNotFoundError(f"--caption_model {source.path}: no {prefix}model.safetensors(.index.json)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return list(f.keys())


def check_vision_tower(source):
    """Refuse, in one line, a Qwen2.5-VL checkpoint saved without its vision tower (a text-only encoder)."""
    if not any(".visual." in f".{name}" for name in weight_names(source)):
        where = f"{source.path}/{source.model_subfolder}" if source.model_subfolder else source.path
        raise ValueError(
            f"--caption_model {where} holds no vision tower (no visual.* weights), so it cannot see video; "
            f"use {DEFAULT_CAPTION_MODEL}"
        )


def load_processor(source):
    """The model's own processor, or for a diffusers checkpoint (which has none) its tokenizer with Qwen2.5-VL's
    default image and video processors."""
    from transformers import AutoProcessor, AutoTokenizer

    if not source.diffusers:
        return AutoProcessor.from_pretrained(source.path, revision=source.revision)
    tokenizer = AutoTokenizer.from_pretrained(source.path, subfolder="tokenizer", revision=source.revision)
    return qwen25_vl_processor(tokenizer)


def qwen25_vl_processor(tokenizer):
    """A Qwen2.5-VL processor around `tokenizer`, with the default image and video processors (patch 14, merge 2,
    temporal patch 2, CLIP mean and std) and the tokenizer's chat template."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=tokenizer.chat_template,
    )


def load_captioner(source, dtype, device):
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        source.path,
        subfolder=source.model_subfolder,
        revision=source.revision,
        torch_dtype=dtype,
        attn_implementation="sdpa",
    )
    if not hasattr(model, "visual") and not hasattr(getattr(model, "model", None), "visual"):
        raise ValueError(f"--caption_model {source.path} is a {type(model).__name__}, not a Qwen2.5-VL-family model")
    if device.type == "cuda" and varlen_attn is not None:
        use_one_call_window_attention(model)
    return model.to(device).eval().requires_grad_(False)


# transformers' Qwen2.5-VL vision tower passes its attention windows as cumulative lengths (cu_seqlens) only to an
# implementation named "flash..."; to any other it makes one SDPA call per window: 96 windows per 16-frame clip, so
# about 200,000 small calls per batch of 64 clips. Registered under a "flash" name, this function runs all the
# windows of a layer in one call of PyTorch's own FlashAttention varlen kernel (CUDA, PyTorch >= 2.10).
ONE_CALL_WINDOW_ATTENTION = "flash_varlen_torch"


def one_call_window_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Attention within each window [cu_seq_lens_q[i], cu_seq_lens_q[i + 1]) of query/key/value [1, heads, tokens,
    dim]; returns [1, tokens, heads, dim] as transformers' attention functions do."""
    cu_seqlens, max_length = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [tokens, heads, dim]
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, scale=scaling).unsqueeze(0), None


def use_one_call_window_attention(model):
    """Run the vision tower's attention through one_call_window_attention; the language model keeps SDPA."""
    from transformers import AttentionInterface

    AttentionInterface.register(ONE_CALL_WINDOW_ATTENTION, one_call_window_attention)
    visual = model.visual if hasattr(model, "visual") else model.model.visual
    visual.config._attn_implementation = ONE_CALL_WINDOW_ATTENTION


# ----------------------------------------------------------------------------------------------------------------
# Frames for the captioner
# ----------------------------------------------------------------------------------------------------------------
def caption_frame_positions(num_frames, fps, caption_fps):
    """Positions within a clip of the frames shown to the captioner: every fps / caption_fps-th frame from the first,
    spanning the clip's own time window."""
    step = fps / caption_fps
    return [round(k * step) for k in range(int((num_frames - 1) / step + 1e-9) + 1)]


def captioner_size(height, width, max_pixels, multiple):
    """(height, width) at most max_pixels, scaled down keeping the aspect ratio, in multiples of the patch grid."""
    scale = min(1.0, math.sqrt(max_pixels / (height * width)))
    return (
        max(multiple, int(height * scale / multiple) * multiple),
        max(multiple, int(width * scale / multiple) * multiple),
    )


def captioner_frames(frames, size):
    """uint8 [T, H, W, 3] -> uint8 [T, 3, h, w] at the captioner's size."""
    x = frames.permute(0, 3, 1, 2)
    if tuple(x.shape[2:]) == size:
        return x.contiguous()
    x = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


class ClipFrames(torch.utils.data.IterableDataset):
    """Decodes this run's videos in DataLoader workers and yields, for each clip not yet captioned, the captioner's
    inputs for the frames it sees: `{"key", "clip_index", "start_seconds", "bucket", "inputs"}` (`caption_inputs` of
    uint8 frames [T, 3, h, w]), or `{"key", "error"}` for a video that could not be used, or `{"key", "skipped": n}`
    for n clips already captioned.
    """

    def __init__(self, args, layout, done, caption_inputs):
        self.args, self.layout, self.done, self.caption_inputs = args, layout, done, caption_inputs

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        a = self.args
        # Worker w of shard s reads sub-part s + w * num_shards of num_shards * num_workers.
        part, num_parts = a.shard_index + worker * a.num_shards, a.num_shards * num_workers
        seen = set()
        for source in iter_part_videos(a, self.layout, part, num_parts):
            if source.key in seen:
                yield {"key": source.key, "error": "duplicate key: an earlier video of this source has the same key"}
                continue
            seen.add(source.key)
            try:
                if isinstance(source.video, Exception):
                    raise source.video
                for item in self.video_clips(source):
                    yield {"key": source.key} | item
            except Exception as error:  # a corrupt or truncated video is reported, never fatal
                yield {"key": source.key, "error": f"{type(error).__name__}: {error}".splitlines()[0]}

    def video_clips(self, source):
        a = self.args
        with open_video(source.video) as container:
            plan = plan_video(container, a)
            if plan.error:
                yield {"error": plan.error}
                return
            todo = [clip for clip in plan.clips if (source.key, clip.index) not in self.done]
            if len(todo) < len(plan.clips):
                yield {"skipped": len(plan.clips) - len(todo)}
            if not todo:
                return
            picks = {
                clip.index: [
                    clip.indices[p] for p in caption_frame_positions(clip.bucket.num_frames, a.fps, a.caption_fps)
                ]
                for clip in todo
            }
            frames = decode_frames(container, {i for indices in picks.values() for i in indices})
        for clip in todo:
            indices = picks[clip.index]
            if indices[-1] not in frames:
                yield {"error": f"truncated: clip {clip.index} needs frame {indices[-1]}, decoded {len(frames)}"}
                break
            bucket = clip.bucket
            clip_frames = fit_frames(
                torch.stack([torch.from_numpy(frames[i]) for i in indices]), bucket.height, bucket.width, a.resize_mode
            )
            size = captioner_size(bucket.height, bucket.width, a.caption_max_pixels, self.caption_inputs.patch_grid)
            yield {
                "clip_index": clip.index,
                "start_seconds": clip.start_seconds,
                "bucket": bucket,
                "inputs": self.caption_inputs(captioner_frames(clip_frames, size)),
            }


# ----------------------------------------------------------------------------------------------------------------
# Captioning and writing
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptionRow:
    """One line of captions.jsonl: a clip (its video key, place in the plan, start and length) and its caption."""

    key: str
    clip_index: int
    start_seconds: float
    num_frames: int
    bucket: str
    caption: str
    caption_model: str
    caption_model_revision: str | None
    instruction_sha: str
    clip_plan_sha: str


class CaptionInputs:
    """The processor's model inputs for one clip: the chat prompt (a video part and the instruction) with the clip's
    frames, patchified. Called in the DataLoader workers, so this CPU work overlaps with generation."""

    def __init__(self, processor, instruction, caption_fps):
        self.processor, self.caption_fps = processor, caption_fps
        video = processor.video_processor
        self.patch_grid = video.patch_size * video.merge_size  # frame sides are multiples of it (28 pixels)
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": instruction}]}]
        self.prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def __call__(self, frames):
        """uint8 frames [T, 3, h, w] -> {name: tensor} with a batch dimension of 1."""
        inputs = self.processor(
            text=[self.prompt],
            videos=[frames],
            return_tensors="pt",
            do_resize=False,  # frames come at the captioner's size, cropped as the clip is
            do_sample_frames=False,  # and already sampled at --caption_fps, which sets the frames' time positions
            video_metadata=[{"total_num_frames": len(frames), "fps": self.caption_fps}],
        )
        return dict(inputs)


TOKEN_INPUTS = ("input_ids", "attention_mask", "mm_token_type_ids")  # one entry per token: padded on the left


def batch_inputs(clips, pad_token_id):
    """Per-clip inputs (CaptionInputs) -> the inputs of one batch, as the processor makes them for several clips:
    token rows padded on the left to the longest, the video patches and grids concatenated."""
    length = max(clip["input_ids"].shape[1] for clip in clips)
    batch = {}
    for name in clips[0]:
        if name in TOKEN_INPUTS:
            fill = pad_token_id if name == "input_ids" else 0
            batch[name] = torch.cat([F.pad(c[name], (length - c[name].shape[1], 0), value=fill) for c in clips])
        else:
            batch[name] = torch.cat([c[name] for c in clips])
    return batch


class Captioner:
    """Batched greedy generation over clips given as CaptionInputs outputs. A batch that runs out of GPU memory is
    captioned in halves, and every later batch at that size."""

    def __init__(self, model, processor, max_new_tokens):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens
        self.max_batch = None  # the batch size that fits, once one ran out of memory

    def __call__(self, clips):
        """Captions of a batch of clips."""
        size = min(len(clips), self.max_batch or len(clips))
        try:
            return [caption for i in range(0, len(clips), size) for caption in self.generate(clips[i : i + size])]
        except torch.OutOfMemoryError:
            if size == 1:
                raise
        self.max_batch = size // 2  # outside the except block, so the failed call's tensors are freed first
        torch.cuda.empty_cache()
        tqdm.write(f"{size} clips at once ran out of GPU memory; captioning {self.max_batch} at a time from now on")
        return self(clips)

    @torch.no_grad()
    def generate(self, clips):
        inputs = batch_inputs(clips, self.processor.tokenizer.pad_token_id)
        inputs = {name: value.to(self.model.device, non_blocking=True) for name, value in inputs.items()}
        greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # whatever the generation config
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **greedy)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def shard_rows(shard_dir):
    """{(key, clip_index): row} of a shard: captions.jsonl and the part files not yet merged into it."""
    rows = {}
    for path in [os.path.join(shard_dir, CAPTION_SHARD_FILE), *sorted(glob.glob(os.path.join(shard_dir, "part_*")))]:
        if os.path.isfile(path):
            for row in read_caption_rows(path):
                rows[(row["key"], row["clip_index"])] = row
    return rows


class PartWriter:
    """Writes each batch's rows as the shard's next part_NNNNNN.jsonl, atomically."""

    def __init__(self, shard_dir):
        self.shard_dir = shard_dir
        parts = glob.glob(os.path.join(shard_dir, "part_*.jsonl"))
        self.next = 1 + max((int(os.path.basename(p)[5:11]) for p in parts), default=-1)

    def write(self, rows):
        path = os.path.join(self.shard_dir, f"part_{self.next:06d}.jsonl")
        atomic_write_text(path, "".join(json.dumps(asdict(row)) + "\n" for row in rows))
        self.next += 1


def merge_parts(shard_dir):
    """Fold the part files into captions.jsonl (sorted by key and clip), then remove them. A kill between the two
    steps leaves rows twice, which every reader takes once."""
    rows = shard_rows(shard_dir)
    lines = [json.dumps(rows[k]) + "\n" for k in sorted(rows)]
    atomic_write_text(os.path.join(shard_dir, CAPTION_SHARD_FILE), "".join(lines))
    for path in glob.glob(os.path.join(shard_dir, "part_*.jsonl")):
        os.remove(path)
    return len(rows)


@dataclass
class ShardReport:
    """report.json of a shard: what its last run captioned and skipped, and how fast."""

    captioned: int = 0
    already_captioned: int = 0
    empty_captions: int = 0
    failures: list = field(default_factory=list)  # {"key", "reason"} per video that could not be used
    seconds: float = 0.0
    clips_per_second: float = 0.0
    shard_clips: int = 0


def caption_videos(args, layout, source):
    """Caption this shard's clips that have no caption yet with the captioner of `source`; return its report."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    identity = captions_identity(args)
    processor = load_processor(source)
    model = load_captioner(source, model_dtype(args.dtype, device), device)
    shard_dir = os.path.join(args.output_dir, f"shard_{args.shard_index:05d}")
    os.makedirs(shard_dir, exist_ok=True)
    remove_stale_temp_files(shard_dir)
    atomic_write_text(os.path.join(args.output_dir, CAPTIONS_INFO), json.dumps(identity, indent=2))
    done = set(shard_rows(shard_dir))
    caption_inputs = CaptionInputs(processor, args.caption_prompt, args.caption_fps)
    loader = torch.utils.data.DataLoader(
        ClipFrames(args, layout, done, caption_inputs),
        batch_size=None,
        num_workers=args.num_workers,
        worker_init_fn=ignore_stop_signals,
    )
    captioner, writer = Captioner(model, processor, args.max_new_tokens), PartWriter(shard_dir)
    report, batch, start = ShardReport(), [], time.time()
    progress = tqdm(desc=f"shard {args.shard_index}", unit="clip")

    def flush():
        with stage(f"captioning {len(batch)} clips of {batch[0]['key']}"):
            captions = captioner([item["inputs"] for item in batch])
        rows = [
            CaptionRow(
                key=item["key"],
                clip_index=item["clip_index"],
                start_seconds=item["start_seconds"],
                num_frames=item["bucket"].num_frames,
                bucket=item["bucket"].name,
                caption=caption,
                caption_model=identity["caption_model"],
                caption_model_revision=identity["caption_model_revision"],
                instruction_sha=identity["instruction_sha"],
                clip_plan_sha=identity["clip_plan_sha"],
            )
            for item, caption in zip(batch, captions, strict=True)
        ]
        with stage("writing captions"):
            writer.write(rows)
        report.captioned += len(rows)
        report.empty_captions += sum(not row.caption for row in rows)
        progress.update(len(rows))
        progress.set_postfix(clips_per_s=f"{report.captioned / (time.time() - start):.2f}")
        batch.clear()

    for item in loader:
        # A failed video is reported; an already captioned clip counted; a new clip batched.
        if "error" in item:
            report.failures.append({"key": item["key"], "reason": item["error"]})
            tqdm.write(f"skipped video {item['key']}: {item['error']}")
        elif "skipped" in item:
            report.already_captioned += item["skipped"]
        else:
            batch.append(item)
            if len(batch) == args.batch_size:
                flush()
    if batch:
        flush()
    progress.close()
    report.seconds = round(time.time() - start, 2)
    report.clips_per_second = round(report.captioned / max(report.seconds, 1e-9), 3)
    with stage("merging caption parts"):
        report.shard_clips = merge_parts(shard_dir)
    atomic_write_text(os.path.join(shard_dir, "report.json"), json.dumps(asdict(report), indent=2))
    return report


def main(args):
    validate_args(args)
    source = captioner_source(args.caption_model, args.revision)
    check_vision_tower(source)
    layout = probe_layout(args) if not args.video_dir else None  # a dataset's layout, before the model loads
    report = caption_videos(args, layout, source)
    print(
        f"shard {args.shard_index}/{args.num_shards}: captioned {report.captioned} clips in {report.seconds} s "
        f"({report.clips_per_second} clips/s), {report.already_captioned} already captioned, "
        f"{len(report.failures)} videos skipped; the shard holds {report.shard_clips} captions"
    )
    if report.empty_captions:
        print(f"warning: {report.empty_captions} captions are empty (the model stopped at once)")
    if report.failures and not report.captioned and not report.already_captioned:
        print("error: no clip could be captioned")
        return 1
    return 0


if __name__ == "__main__":
    run_main(main, parse_args)
