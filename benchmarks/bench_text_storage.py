#!/usr/bin/env python
"""Disk per caption of the latent cache's text embeddings, for per-clip captions of 2-4 sentences.

Encodes a set of egocentric captions with a checkpoint's own text encoder (Predict2: T5; Predict2.5: Qwen2.5-VL,
projected by the transformer's crossattn_proj unless --text_embeds full), exactly as cache_latents.py does, and for
each caption measures: its tokens, how many rows are non-zero, and the bytes of each storage option with whether it
rebuilds the embedding bit for bit:

    padded      the [512, D] bf16 tensor as stored up to format 2
    real_rows   the rows of the caption's real tokens only (exact where the padding is zero: T5)
    cache       what cache_latents.py writes now (cosmos_cache.write_text_embeds: real rows, byte planes, zstd,
                XOR with the row before when smaller), and the time to read it back
    pad_tail    Predict2.5 only, lossy and not offered: the real rows kept and every padding row replaced by the first
                one; its relative L2 error over the padding rows says how alike they are

and compares the mean with the latents of one reference clip (61 frames, 256x448: 917,504 bytes) at Egocentric-100K
scale (47 M clips, one caption each). Needs the real checkpoints for real numbers (random weights give random
embeddings); on a tiny random checkpoint it checks that the measurement runs.

    python benchmarks/bench_text_storage.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --out text_storage_predict2.json
    python benchmarks/bench_text_storage.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2.5-2B \\
        --revision diffusers/base/post-trained --out text_storage_predict25.json
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cosmos_cache import bf16_bits, read_text_embeds, write_text_embeds
from cosmos_cli import HelpFormatter, check_pretrained_model
from cosmos_families import (
    QWEN_SYSTEM_PROMPT,
    detect_family,
    load_component,
    load_component_config,
    load_text_projection,
    project_text,
    text_embed_kind,
)
from cosmos_process import run_main

LATENT_BYTES_PER_CLIP = 16 * 16 * 32 * 56 * 2  # the reference clip's bf16 latents
FULL_DATASET_CLIPS = 47_000_000  # Egocentric-100K at the reference clip
# What a VLM writes for egocentric work video: 2-4 factual sentences on the hands, objects, action, camera, setting.
CAPTIONS = [
    "The wearer's hands pick up a metal bracket from a bin and place it on the workbench. The camera looks down "
    "at the bench throughout.",
    "A gloved right hand turns a screwdriver to fasten a screw into a gray plastic housing while the left hand holds "
    "it steady. The camera stays close and still. The housing sits on a blue anti-static mat.",
    "The wearer walks down a narrow aisle between shelves stacked with cardboard boxes, then stops and reaches for a "
    "box on the middle shelf. The camera sways with each step and turns right toward the shelf. Fluorescent lights "
    "line the ceiling.",
    "Both hands fold a sheet of fabric in half and then in half again, smoothing it flat on a wide cutting table. A "
    "pair of scissors and a measuring tape lie to the left. The camera tilts down slightly as the wearer leans "
    "forward. The fold is finished and the fabric is pushed aside.",
    "The right hand pulls a length of wire from a spool and the left hand cuts it with pliers. The camera is steady.",
    "The wearer sorts small brass fittings from a tray into three labeled containers, one fitting at a time, using "
    "both hands. The tray empties from front to back as the work progresses. The camera holds a fixed view of the "
    "bench, which is cluttered with tools and a clipboard.",
    "A hand presses the green button on a drill press and lowers the handle, drilling a hole through a wooden block "
    "held in a vise. Sawdust gathers around the bit. The camera stays level, facing the machine.",
    "The wearer lifts a plastic crate of parts onto a rolling cart and pushes the cart toward an open doorway. The "
    "camera bobs and pans left as the cart turns. Other workers are visible at benches in the background of a large, "
    "bright workshop.",
    "The left hand holds a circuit board while the right hand applies solder to one of its pins with a soldering "
    "iron. A thin line of smoke rises. The camera is very close and moves slightly as the wearer adjusts their grip.",
    "Hands tape the flaps of a filled cardboard box shut with a tape gun, running it along the seam from one end to "
    "the other, then press the tape down. The camera looks straight down at the box on a packing table.",
    "The wearer measures a wooden plank with a tape measure, marks it with a pencil, and sets the pencil down. The "
    "camera follows the hands along the plank.",
    "A worker's hands insert a row of screws into pre-drilled holes along the edge of a metal panel, tightening each "
    "with a power screwdriver. The panel rests on two sawhorses. The camera moves from left to right with the work "
    "and ends on the last screw. Tools hang on a pegboard behind the panel.",
]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--pretrained_model_name_or_path", required=True, help="Hub id or local diffusers folder of either family."
    )
    parser.add_argument("--revision", default=None, help="Hub revision (Predict2.5: diffusers/base/post-trained).")
    parser.add_argument(
        "--text_embeds",
        choices=["projected", "full"],
        default="projected",
        help="Predict2.5: measure the crossattn_proj output (the cache's default) or the full Qwen2.5-VL embedding.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Encoder device.")
    parser.add_argument("--out", default=None, help="Write the per-caption rows and the summary to this JSON file.")
    return parser.parse_args()


def load_encoder(args):
    """The family, and a function from captions to the bf16 [B, 512, D] embeddings cache_latents.py stores."""
    path, revision, device = args.pretrained_model_name_or_path, args.revision, args.device
    family = detect_family(path, revision)
    dtype = torch.bfloat16 if device != "cpu" else torch.float32
    tokenizer = load_component(path, "tokenizer", revision, family=family)
    encoder = load_component(path, "text_encoder", revision, dtype, family=family).to(device).eval()
    kind = text_embed_kind(load_component_config(path, "transformer", revision), args.text_embeds)
    projection, _ = load_text_projection(path, revision, family, kind, device, dtype)

    def encode(captions):
        with torch.no_grad():
            embeds = project_text(projection, family.encode_prompts(tokenizer, encoder, captions, device))
        return embeds.to(torch.bfloat16).cpu()

    return family, tokenizer, kind, encode


def token_count(tokenizer, family, caption):
    """Real tokens of a caption as its family's encoder sees them (Predict2.5: within the chat template)."""
    if family.name == "predict2":
        return len(tokenizer(caption, truncation=True, max_length=512).input_ids)
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": QWEN_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": caption}]},
    ]
    encoded = tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=False, add_vision_id=False, return_dict=True
    )
    return len(encoded["input_ids"])


def measure(embeds, tokens, caption, workdir):
    """One caption's bytes per storage option, exactness, and the cache format's read time."""
    bits = bf16_bits(embeds)
    path = os.path.join(workdir, "ab", "caption.safetensors")
    start = time.perf_counter()
    write_text_embeds(path, embeds, caption)
    write_ms = (time.perf_counter() - start) * 1e3
    start = time.perf_counter()
    rebuilt = read_text_embeds(path)
    read_ms = (time.perf_counter() - start) * 1e3
    row_bytes = bits.shape[1] * 2
    return {
        "nonzero_rows": int(np.flatnonzero(bits.any(axis=1))[-1]) + 1 if bits.any() else 0,
        "padded_bytes": bits.nbytes,
        "real_rows_bytes": tokens * row_bytes,
        "real_rows_exact": not bits[tokens:].any(),
        "cache_bytes": os.path.getsize(path),
        "cache_exact": bool(np.array_equal(bf16_bits(rebuilt), bits)),
        "cache_write_ms": round(write_ms, 2),
        "cache_read_ms": round(read_ms, 2),
    }


def pad_tail_error(embeds, real_tokens):
    """Relative L2 error over the padding rows when each is replaced by the first padding row (lossy, Predict2.5)."""
    pad = embeds[real_tokens:].float()
    if len(pad) == 0:
        return 0.0
    return float((pad - pad[:1]).norm() / pad.norm().clamp_min(1e-12))


def summarize(rows):
    """Means over the captions, and each option's share of a clip's latents at Egocentric-100K scale."""
    summary = {"captions": len(rows), "tokens_mean": statistics.mean(r["tokens"] for r in rows)}
    summary["tokens_range"] = [min(r["tokens"] for r in rows), max(r["tokens"] for r in rows)]
    for option in ("padded", "real_rows", "cache"):
        mean = statistics.mean(r[f"{option}_bytes"] for r in rows)
        summary[option] = {
            "bytes_per_caption": round(mean),
            "exact": all(r[f"{option}_exact"] for r in rows) if option != "padded" else True,
            "share_of_latents": round(mean / LATENT_BYTES_PER_CLIP, 3),
            "tb_at_47m_clips": round(mean * FULL_DATASET_CLIPS / 1e12, 2),
        }
    summary["cache"]["read_ms_mean"] = round(statistics.mean(r["cache_read_ms"] for r in rows), 2)
    summary["cache"]["write_ms_mean"] = round(statistics.mean(r["cache_write_ms"] for r in rows), 2)
    if "pad_tail_error" in rows[0]:
        summary["pad_tail_error_mean"] = statistics.mean(r["pad_tail_error"] for r in rows)
    return summary


def main(args):
    check_pretrained_model(args.pretrained_model_name_or_path, ["tokenizer", "text_encoder", "transformer"])
    family, tokenizer, kind, encode = load_encoder(args)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        # encode each caption alone (as the cache does) and measure every storage option on it
        for caption in CAPTIONS:
            embeds = encode([caption])[0]
            tokens = token_count(tokenizer, family, caption)
            row = {"tokens": tokens, **measure(embeds, tokens, caption, workdir)}
            if family.name == "predict2.5":
                row["pad_tail_error"] = pad_tail_error(embeds, row["tokens"])
            rows.append(row)
    result = {
        "model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "family": family.name,
        "text_embeds": kind,
        "latent_bytes_per_clip": LATENT_BYTES_PER_CLIP,
        "summary": summarize(rows),
        "per_caption": rows,
    }
    print(json.dumps(result["summary"], indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_main(main, parse_args)
