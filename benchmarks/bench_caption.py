#!/usr/bin/env python
"""Captioning speed of caption_clips.py's generate path with a random-weight Qwen2.5-VL-7B (the configuration of
nvidia/Cosmos-Reason1-7B and Qwen/Qwen2.5-VL-7B-Instruct) on one GPU: clips/s, prefill time and decode step time over
batch sizes, as one JSON line per batch size.

Random weights never stop early: every caption runs to --max_new_tokens (a worst case; real captions of 2-4 sentences
stop at about 60-100 tokens). Each clip is what caption_clips.py shows the captioner by default: 16 frames (a 61-frame
clip at 8 fps, sampled at 2 fps) of 252x448, i.e. 8 x 9 x 16 = 1152 video tokens, plus the default instruction.
The decode step is compared with the bound of reading the language model's bf16 weights once per step at
--bandwidth_tb_s (H200: 4.8 TB/s; 15.2 GB of weights: about 3.2 ms).

Variants (--variants, each over --batch_sizes, one model):
- per_window: transformers' own vision attention, one SDPA call per window (caption_clips.py before it used varlen);
- one_call: caption_clips.py's default on CUDA, every window of a layer in one varlen call;
- one_call_static: the same with a static KV cache (transformers then compiles the decode step).
Before the sweep: the processor's CPU time per clip on one thread (caption_clips.py runs it in the DataLoader
workers), and how far the one-call vision tower's output is from the per-window one.

    python benchmarks/bench_caption.py --batch_sizes 1 8 16 32 64 128 --max_new_tokens 128
    python benchmarks/bench_caption.py --variants per_window one_call --batch_sizes 64 --profile
    python benchmarks/bench_caption.py --size tiny --batch_sizes 1 2 --max_new_tokens 4   # CPU smoke test
"""

import argparse
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
from bench_decode import one_torch_thread  # noqa: E402

import caption_clips  # noqa: E402
import make_random_cosmos  # noqa: E402
from caption_clips import DEFAULT_INSTRUCTION, Captioner, CaptionInputs  # noqa: E402
from cosmos_cli import HelpFormatter

VARIANTS = ["per_window", "one_call", "one_call_static"]

# Qwen2.5-VL-7B-Instruct's configuration (Cosmos-Reason1-7B is a fine-tune of it: the same shapes), as its
# config.json gives it and its module printout shows it: a 28-layer decoder of width 3584 (28 query heads, 4 key/value
# heads, MLP 18944, vocabulary 152064, untied head, M-RoPE sections 16/24/24, rope theta 1e6) and a 32-block vision
# transformer of width 1280 (16 heads, MLP 3420, window attention of 112 pixels with full attention in blocks
# 7/15/23/31, 14-pixel patches, 2x2 merge, 2-frame temporal patches) projected to 3584.
QWEN25_VL_7B = {
    "text": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    "vision": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=3584,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    ),
}
# A CPU-sized stand-in for the smoke test: the same classes and code path.
TINY = {
    "text": dict(make_random_cosmos.QWEN_TEXT_CONFIGS["tiny"], vocab_size=400, max_position_embeddings=4096,
                 rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    "vision": dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32,
                   fullatt_block_indexes=[0]),
}  # fmt: skip


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=["7b", "tiny"], default="7b", help="Qwen2.5-VL-7B, or a tiny CPU model.")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128], help="Clips per call.")
    parser.add_argument("--max_new_tokens", type=int, default=128, help="Caption length (every caption runs to it).")
    parser.add_argument("--frames", type=int, default=16, help="Frames shown per clip (caption_clips.py: 16).")
    parser.add_argument("--height", type=int, default=252, help="Frame height shown to the captioner.")
    parser.add_argument("--width", type=int, default=448, help="Frame width shown to the captioner.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed calls per batch size (after one warm-up).")
    parser.add_argument(
        "--variants", choices=VARIANTS, nargs="+", default=["per_window", "one_call"], help="What to time, in order."
    )
    parser.add_argument("--bandwidth_tb_s", type=float, default=4.8, help="GPU memory bandwidth for the bound.")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="After each variant's sweep, profile a 1-token call (everything before the first new token) and a "
        "9-token call at the largest batch size that fit: the top operators by device time and the share of the call "
        "the GPU was busy (what bounds clips/s).",
    )
    return parser.parse_args(argv)


def build_model(size, tokenizer, device):
    """A random-weight Qwen2_5_VLForConditionalGeneration, built in bf16 on the device (no checkpoint on disk)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    shapes = QWEN25_VL_7B if size == "7b" else TINY
    token = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(shapes["text"], bos_token_id=0, eos_token_id=2),
        vision_config=shapes["vision"],
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )
    config._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def build_processor():
    """caption_clips.py's processor for a checkpoint without one, around the offline Qwen tokenizer of the tiny
    checkpoints (with the vision tokens)."""
    return caption_clips.qwen25_vl_processor(make_random_cosmos.build_qwen_tokenizer())


def timed(function, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def language_model_bytes(model):
    """Bytes of weights one decode step reads: everything but the vision tower."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "visual" not in name)


def measure(captioner, clips, tokens, args, device):
    """Seconds of one generate call of `tokens` new tokens (median over --repeats, after a warm-up)."""
    captioner.max_new_tokens = tokens
    captioner.model.generation_config.min_new_tokens = tokens  # never stop early, even on an end token
    captioner(clips)
    times = sorted(timed(lambda: captioner(clips), device) for _ in range(args.repeats))
    return times[len(times) // 2]


def use_variant(model, variant):
    """Set the vision attention and the KV cache of one variant."""
    if variant == "per_window":
        model.model.visual.config._attn_implementation = "sdpa"
    else:
        caption_clips.use_one_call_window_attention(model)
    model.generation_config.cache_implementation = "static" if variant.endswith("static") else None


def processor_ms_per_clip(caption_inputs, videos):
    """CPU milliseconds of CaptionInputs per clip on one thread, as in a DataLoader worker."""
    with one_torch_thread():
        start = time.perf_counter()
        for video in videos:
            caption_inputs(video)
        return (time.perf_counter() - start) / len(videos) * 1e3


def one_call_error(model, clip):
    """Relative L2 distance of the vision tower's output with one-call window attention from the per-window one."""
    visual = model.model.visual
    pixels, grid = clip["pixel_values_videos"].to(model.device, model.dtype), clip["video_grid_thw"].to(model.device)
    outputs = []
    with torch.no_grad():
        for variant in ("per_window", "one_call"):
            use_variant(model, variant)
            output = visual(pixels, grid_thw=grid)
            outputs.append(getattr(output, "pooler_output", output).float())
    return ((outputs[1] - outputs[0]).norm() / outputs[0].norm()).item()


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    processor = build_processor()
    model = build_model(args.size, processor.tokenizer, device)
    caption_inputs = CaptionInputs(processor, DEFAULT_INSTRUCTION, caption_fps=2.0)
    captioner = Captioner(model, processor, args.max_new_tokens)
    weights = language_model_bytes(model)
    bound_ms = weights / (args.bandwidth_tb_s * 1e12) * 1e3
    frames = [
        torch.randint(0, 256, (args.frames, 3, args.height, args.width), dtype=torch.uint8)
        for _ in range(max(args.batch_sizes))
    ]
    before = {
        "processor_ms_per_clip_one_thread": round(processor_ms_per_clip(caption_inputs, frames[:16]), 1),
        "one_call_vs_per_window_rel_l2": one_call_error(model, caption_inputs(frames[0]))
        if device.type == "cuda" and caption_clips.varlen_attn is not None
        else None,
    }
    print(json.dumps(before), flush=True)
    all_clips = [caption_inputs(video) for video in frames]
    for variant in args.variants:
        if variant != "per_window" and (device.type != "cuda" or caption_clips.varlen_attn is None):
            print(json.dumps({"variant": variant, "skipped": "needs CUDA and PyTorch >= 2.10"}), flush=True)
            continue
        use_variant(model, variant)
        fitted = None  # the largest batch that fit, for --profile
        for batch_size in args.batch_sizes:
            clips = all_clips[:batch_size]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                prefill = measure(captioner, clips, 1, args, device)
                full = measure(captioner, clips, args.max_new_tokens, args, device)
            except torch.OutOfMemoryError:
                print(json.dumps({"variant": variant, "batch_size": batch_size, "out_of_memory": True}), flush=True)
                break
            step_ms = (full - prefill) / max(args.max_new_tokens - 1, 1) * 1e3
            row = {
                "variant": variant,
                "size": args.size,
                "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                "batch_size": batch_size,
                "max_new_tokens": args.max_new_tokens,
                "clips_per_s": round(batch_size / full, 3),
                "seconds_per_call": round(full, 3),
                "prefill_s": round(prefill, 4),
                "decode_step_ms": round(step_ms, 3),
                "weight_read_bound_ms": round(bound_ms, 3),
                "language_model_gb": round(weights / 1e9, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device.type == "cuda" else None,
            }
            print(json.dumps(row), flush=True)
            fitted = clips
        if args.profile and fitted is not None:
            for tokens in (1, 9):
                profile_call(captioner, fitted, tokens, variant, device)


def profile_call(captioner, clips, tokens, variant, device):
    """One generate call of `tokens` new tokens under torch.profiler: top operators by device time, and the GPU's busy
    share."""
    from torch.profiler import ProfilerActivity, profile

    captioner.max_new_tokens = captioner.model.generation_config.min_new_tokens = tokens
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        seconds = timed(lambda: captioner(clips), device)
    table = prof.key_averages()
    sort = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    print(table.table(sort_by=sort, row_limit=15), flush=True)
    kernels = [e for e in table if e.key != "Command Buffer Full"]  # a profiler marker: the host waited, not a kernel
    busy = sum(e.self_device_time_total for e in kernels) / 1e6 if device.type == "cuda" else None
    share = round(busy / seconds, 3) if busy is not None else None
    summary = {
        "variant": variant,
        "profile_batch_size": len(clips),
        "new_tokens": tokens,
        "seconds": round(seconds, 3),
    }
    print(json.dumps(summary | {"gpu_busy_share": share}), flush=True)


if __name__ == "__main__":
    main(parse_args())
