#!/usr/bin/env python
"""Video2World generation with a Cosmos-Predict2 or Cosmos-Predict2.5 model fine-tuned by train_cosmos_lora.py.

Each input is a job: a video, an image, or a cached clip from cache_latents.py (its first 1 or 2 latent frames
condition it; the rest is the ground truth). A video conditions on 1 or 5 of its frames: its first ones for Predict2
(the rest of the clip is ground truth), its last ones for Predict2.5 (as Cosmos2_5_PredictBasePipeline does: the
generation continues the video, without ground truth). Each family samples with its own pipeline's math: Predict2
Euler on Karras sigmas 80 -> 0.002 (35 steps), Predict2.5 UniPC on flow sigmas (36 steps). Writes one mp4 per job,
a ground truth | generated mp4 where ground truth exists, video_grid.mp4, contact_sheet.png and results.json with the
settings and PSNR/SSIM against the ground truth, per video and per frame.

--rollout_chunks N generates N chained clips per video or image input (generate_rollouts): each clip after the first
is conditioned on the last frames the one before generated, and the output is the joined rollout.

    python sample.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --lora_path outputs/ego-lora --from_cache /scratch/cache --num_videos 8 --output_dir samples/

`accelerate launch sample.py ...` splits the jobs across processes; a job's result does not depend on how many.
"""

import argparse
import importlib.util
import json
import os
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm.auto import tqdm

from cosmos_adapters import ADAPTER_CONFIG, EMA_DIR, load_finetuned_weights, read_adapter_config
from cosmos_cache import (
    atomic_write_text,
    list_cached_clips,
    load_text_embeds,
    read_cache_info,
    read_clip,
    text_embed_path,
)
from cosmos_cli import (
    DEFAULT_PROMPT,
    VIDEO_EXTENSIONS,
    HelpFormatter,
    add_clip_plan_arguments,
    add_config_argument,
    add_model_arguments,
    add_rollout_argument,
    check_pretrained_model,
    model_dtype,
    non_negative_float,
    parse_with_config,
    positive_int,
)
from cosmos_families import (
    ModelFamily,
    detect_family,
    load_component,
    project_text,
    projection_sha,
    recorded_family,
    take_text_projection,
)
from cosmos_metrics import frame_metrics
from cosmos_process import run_main, stage
from cosmos_run import HELD_OUT, hold_out_clips, read_held_out, split_by_record
from cosmos_speed import check_fp8_support, convert_frozen_linears_to_fp8, modulate_per_frame
from cosmos_vae import decode_to_frames, normalize_latents
from cosmos_video import (
    VAE_TEMPORAL_FACTOR,
    check_clip_geometry,
    contact_sheet,
    decode_frames,
    fit_frames,
    frames_to_vae_input,
    latent_shape,
    nearest_bucket_size,
    open_video,
    parse_bucket,
    plan_bucket_clips,
    probe_video,
    read_mp4,
    video_grid,
    video_size,
    write_mp4,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def build_parser(description=__doc__, conflict_handler="error"):
    """sample.py's flags; evaluate.py builds on them (with conflict_handler="resolve" to redefine a few)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=HelpFormatter, conflict_handler=conflict_handler
    )
    add_config_argument(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--lora_path",
        default=None,
        help="A train_cosmos_lora.py output dir or one of its checkpoint-STEP dirs. Default: the base model alone.",
    )
    parser.add_argument(
        "--use_ema",
        action="store_true",
        help="Load the EMA of the weights (LORA_PATH/ema/, written by train_cosmos_lora.py --ema_decay) instead.",
    )
    parser.add_argument(
        "--lora_scale",
        type=float,
        default=1.0,
        help="Strength of the fine-tune (LoRA, adapters and proj_out): 0 is the base model.",
    )
    parser.add_argument(
        "--fuse_lora", action="store_true", help="Fuse the LoRA (at --lora_scale) into the weights for speed."
    )
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument(
        "--input",
        nargs="*",
        default=[],
        help="Videos, images, cached clip .safetensors files, or folders of them; one job each.",
    )
    inputs.add_argument(
        "--from_cache",
        default=None,
        help="A latent cache: generate from clips held out of training. With --lora_path, exactly the clips the run "
        "recorded in held_out.json (never a training clip); without, the choice train_cosmos_lora.py makes "
        "with the same --seed and --num_validation_clips.",
    )
    inputs.add_argument("--num_videos", type=positive_int, default=4, help="With --from_cache: how many clips.")
    inputs.add_argument(
        "--num_conditioning_frames",
        type=int,
        choices=[1, 5],
        default=1,
        help="Video inputs condition on 1 or 5 frames (1 or 2 latent frames): their first ones for Predict2, their "
        "last ones for Predict2.5 (as each family's pipeline does); cached clips on their first 1 or 2 latent frames.",
    )
    gen = parser.add_argument_group("generation")
    gen.add_argument(
        "--prompt", default=None, help=f"Text prompt. Default: a cached clip's own caption, else {DEFAULT_PROMPT!r}."
    )
    gen.add_argument("--negative_prompt", default=None, help="Negative prompt. Default: the diffusers pipeline's.")
    gen.add_argument(
        "--guidance_scale", type=non_negative_float, default=7.0, help="Classifier-free guidance (1 disables it)."
    )
    gen.add_argument(
        "--num_inference_steps",
        type=positive_int,
        default=None,
        help="Denoising steps. Default: 35 (Predict2), 36 (Predict2.5).",
    )
    gen.add_argument("--seed", type=int, default=0, help="Job i uses seed + i, whatever the batch or process count.")
    gen.add_argument("--batch_size", type=positive_int, default=1, help="Jobs per denoising batch.")
    add_rollout_argument(gen)
    gen.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="Model dtype; auto is bfloat16 on GPU and float32 on CPU.",
    )
    gen.add_argument(
        "--compile",
        action="store_true",
        help="Compile each transformer block and the VAE decode with torch.compile (with --attention_backend "
        "_native_cudnn, 1.9-2x the diffusers pipeline on an H200; the first video of each shape compiles).",
    )
    gen.add_argument(
        "--attention_backend",
        default=None,
        help="diffusers attention backend, e.g. _native_cudnn or flash. Default: native SDPA.",
    )
    gen.add_argument(
        "--fp8",
        action="store_true",
        help="Run the linears of the transformer blocks (the LoRA base layers included) in FP8 with torchao's "
        "dynamic tensorwise scaling, as train_cosmos_lora.py --fp8 does; AdaLN, LoRA A/B, adapters and proj_out stay "
        "as they are. Faster, not bit-equal: benchmarks/RESULTS.md gives its PSNR against the bf16 output. Needs "
        "torchao (requirements-fp8.txt) and an FP8 GPU (compute capability 8.9+); use with --compile. On a CPU "
        "the FP8 casts are emulated.",
    )
    clips = add_clip_plan_arguments(
        parser,
        "The shape and frame rate of generation for video and image inputs; cached clips keep their own.\n"
        "--buckets is the list --bucket auto chooses from (default: the buckets of --from_cache).",
    )
    clips.add_argument(
        "--bucket",
        default=None,
        help="Shape FRAMESxHEIGHTxWIDTH for video and image inputs, or `auto`: of --buckets, the one nearest each "
        "input's aspect ratio, with the longest frame count the video holds (images: the longest). Default: "
        "--num_frames x --height x --width.",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", required=True, help="Where the mp4s, grid, contact sheet and JSON go.")
    out.add_argument(
        "--disable_safety_checker",
        action="store_true",
        help="Skip NVIDIA's Cosmos guardrail (cosmos-guardrail). Only for offline tests; the model "
        "license does not allow bypassing it in use.",
    )
    return parser


def parse_args(argv=None):
    return parse_with_config(build_parser(), argv)


# ----------------------------------------------------------------------------------------------------------------
# Jobs
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Job:
    name: str
    kind: str  # video, image or cached
    source: str
    cond_frames: torch.Tensor = None  # uint8 [n, H, W, 3] for video and image jobs
    truth_frames: torch.Tensor = None  # uint8 [T, H, W, 3] where the input holds ground truth
    latents: torch.Tensor = None  # cached clip latents [16, T, h, w]
    prompt_embeds: torch.Tensor = None  # a cached clip's own caption embedding
    caption: str = None  # a cached clip's own caption (on the contact sheet)
    projection_sha: str = None  # the crossattn_proj a projected cached embedding was made with
    shape: tuple = field(default=None)  # (num_frames, height, width) of the generation
    fps: float = 8.0


def expand_inputs(paths):
    files = []
    for path in paths:
        if os.path.isdir(path):
            files += sorted(
                os.path.join(root, f)
                for root, _, names in os.walk(path)
                for f in names
                if f.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS + (".safetensors",))
            )
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"--input {path} does not exist")
    return files


def input_shape(args, height, width, num_source_frames=None, source_fps=None):
    """(num_frames, height, width) to generate an input of this size at: --bucket, or with `auto` the nearest bucket
    by aspect ratio and the longest frame count the video holds (an image or a too-short video: the longest)."""
    if args.bucket != "auto":
        return (args.num_frames, args.height, args.width)
    size = nearest_bucket_size(args.buckets, height, width)
    candidates = [b for b in args.buckets if (b.height, b.width) == size]
    fits = plan_bucket_clips(candidates, num_source_frames or 0, source_fps or 1.0, args.fps, max_clips=1)
    bucket = fits[0][0] if fits else max(candidates, key=lambda b: b.num_frames)
    return (bucket.num_frames, bucket.height, bucket.width)


def video_job(path, args, family):
    """A video input: the family picks which of its frames condition (ModelFamily.video_frames); where they are its
    first frames, the frames that follow them are the ground truth, over the whole rollout or as far as the video
    holds them (then said here)."""
    n = args.num_conditioning_frames
    with open_video(path) as container:
        num_source_frames, source_fps = probe_video(container)
        _, height, width = shape = input_shape(args, *video_size(container), num_source_frames, source_fps)
        length = rollout_length(shape[0], n, args.rollout_chunks)
        indices, follows = family.video_frames(num_source_frames, source_fps, length, n, args.fps)
        if indices is None:
            raise ValueError(f"{path} has fewer than {n} frames at {args.fps} fps")
        decoded = decode_frames(container, set(indices))
    frames = torch.stack([torch.from_numpy(decoded[i]) for i in indices])
    frames = fit_frames(frames, height, width, args.resize_mode)
    has_truth = follows and len(frames) > n  # frames after the conditioning ones
    if has_truth and len(frames) < length:
        print(
            f"note: {path} holds {len(frames)} of the {length} frames generated at {args.fps} fps; "
            f"PSNR/SSIM cover those {len(frames)}"
        )
    return Job(
        name=os.path.splitext(os.path.basename(path))[0],
        kind="video",
        source=path,
        cond_frames=frames[:n],
        truth_frames=frames if has_truth else None,
        shape=shape,
        fps=args.fps,
    )


def rollout_length(num_frames, num_cond_frames, chunks):
    """Frames of a rollout of `chunks` clips of `num_frames`, each after the first starting with the last
    `num_cond_frames` of the one before (kept once)."""
    return num_frames + (chunks - 1) * (num_frames - num_cond_frames)


def image_job(path, args):
    image = torch.from_numpy(np.array(Image.open(path).convert("RGB")))[None]
    shape = input_shape(args, *image.shape[1:3])
    return Job(
        name=os.path.splitext(os.path.basename(path))[0],
        kind="image",
        source=path,
        cond_frames=fit_frames(image, shape[1], shape[2], args.resize_mode),
        shape=shape,
        fps=args.fps,
    )


def cached_job(path, family, cache_dir=None):
    latents, meta = read_clip(path)
    latents = latents.float()
    if "caption_hash" not in meta:
        raise ValueError(f"{path} is not a clip file of cache_latents.py")
    cache_dir = cache_dir or os.path.dirname(os.path.dirname(path))
    info = read_cache_info(cache_dir)
    if info["family"] != family.name:
        raise ValueError(f"{path} was cached with a {info['family']} model, the model is {family.name}")
    embeds_path = text_embed_path(cache_dir, meta["caption_hash"])
    embeds = load_text_embeds(embeds_path).float() if os.path.isfile(embeds_path) else None
    return Job(
        name=os.path.splitext(os.path.basename(path))[0],
        kind="cached",
        source=path,
        latents=latents,
        prompt_embeds=embeds,
        caption=meta.get("caption"),
        projection_sha=info["text_embeds"]["projection_sha"],
        shape=(int(meta["num_frames"]), int(meta["height"]), int(meta["width"])),
        fps=float(meta["fps"]),
    )


def collect_jobs(args, family):
    """Read every input into a job; bad inputs fail here, before any model loads."""
    jobs = []
    for path in expand_inputs(args.input):
        lower = path.lower()
        try:
            if lower.endswith(".safetensors"):
                check_no_rollout(args, f"--input {path} is a cached clip")
                jobs.append(cached_job(path, family))
            elif lower.endswith(IMAGE_EXTENSIONS):
                jobs.append(image_job(path, args))
            elif lower.endswith(VIDEO_EXTENSIONS):
                jobs.append(video_job(path, args, family))
            else:
                raise ValueError("unknown file type")
        except (ValueError, FileNotFoundError):
            raise
        except Exception as error:
            raise ValueError(f"cannot read --input {path}: {type(error).__name__}: {error}".splitlines()[0]) from None
    if args.from_cache:
        held = sorted(held_out_clips_to_sample(args), key=lambda clip: clip.shape)  # one bucket after another
        jobs += [cached_job(clip.path, family, args.from_cache) for clip in held]
    if not jobs:
        raise ValueError("nothing to generate: give --input or --from_cache")
    names = [job.name for job in jobs]
    for i, job in enumerate(jobs):
        if names.count(job.name) > 1:
            job.name = f"{i:03d}_{job.name}"
    return jobs


def check_no_rollout(args, what):
    """Refuse rollouts of cached clips (`what` names them)."""
    if args.rollout_chunks > 1:
        raise ValueError(
            f"--rollout_chunks {args.rollout_chunks}: {what}, and cached clips are fixed-length "
            "(a clip's latents hold that clip and nothing after it to score a rollout against); roll out from the "
            "source video with --input"
        )


def held_out_clips_to_sample(args):
    """--num_videos clips of --from_cache that never trained. With --lora_path and the cache the run held clips out
    of, exactly the clips its held_out.json records; another cache it trained on has none; a cache the run never saw,
    and no --lora_path, give the seeded choice train_cosmos_lora.py makes with the same --seed."""
    read_cache_info(args.from_cache)
    clips = list_cached_clips(args.from_cache)
    record = read_held_out(args.lora_path) if args.lora_path else None
    if args.lora_path and record is None:
        raise FileNotFoundError(
            f"--lora_path {args.lora_path} has no {HELD_OUT}, so its held-out clips are unknown; pass clips with "
            "--input instead"
        )
    cache = os.path.realpath(args.from_cache)
    if record is None or cache not in [record["cache_dir"], *record.get("trained_caches", [])]:
        if record is not None:
            print(f"note: {args.lora_path} was not trained on {args.from_cache}; taking clips held out by --seed")
        return hold_out_clips(clips, args.num_videos, args.seed)[1]
    if cache != record["cache_dir"]:
        raise ValueError(
            f"{args.lora_path} trained on every clip of {args.from_cache}; it held clips out of {record['cache_dir']}"
        )
    _, held = split_by_record(clips, args.from_cache, record)
    if len(held) < args.num_videos:
        raise ValueError(
            f"--num_videos {args.num_videos}, but the run at {args.lora_path} held out only {len(held)} clips "
            f"(train with --num_validation_clips {args.num_videos}, or ask for at most {len(held)})"
        )
    return held[: args.num_videos]


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Components:
    """What sample.py generates with, loaded once: the family's models and its sampler's scheduler."""

    family: ModelFamily
    transformer: torch.nn.Module  # fine-tuned weights loaded, crossattn_proj taken out
    text_projection: torch.nn.Module | None  # Predict2.5's crossattn_proj; None for Predict2
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    safety_checker: object | None  # None with --disable_safety_checker


def load_pipeline_components(args, device, family):
    """The models, with Predict2.5's crossattn_proj taken out of the transformer (`text_projection`): every
    embedding is projected before the transformer sees it, so cached projected ones and fresh raw ones batch alike."""
    dtype = model_dtype(args.dtype, device)
    path, revision = args.pretrained_model_name_or_path, args.revision

    def load(name, dtype=None):
        return load_component(path, name, revision, dtype, family=family)

    transformer = load_transformer(args, device, family)
    return Components(
        family=family,
        transformer=transformer,
        text_projection=take_text_projection(transformer),
        vae=load("vae", dtype).to(device).eval().requires_grad_(False),
        text_encoder=load("text_encoder", dtype).to(device).requires_grad_(False),
        tokenizer=load("tokenizer"),
        scheduler=load("scheduler"),
        safety_checker=None if args.disable_safety_checker else load_safety_checker(),
    )


def load_transformer(args, device, family):
    """The transformer with the fine-tune of --lora_path (if any) loaded, set up for sampling on `device`."""
    dtype = model_dtype(args.dtype, device)
    transformer = modulate_per_frame(
        load_component(args.pretrained_model_name_or_path, "transformer", args.revision, dtype, family=family)
    )
    if args.lora_path:
        # The scale reaches the LoRA, the adapters and proj_out; fusing then merges the LoRA at that scale.
        load_finetuned_weights(transformer, weights_path(args), scale=args.lora_scale)
        if args.fuse_lora and getattr(transformer, "peft_config", None):
            transformer.fuse_lora()
    transformer.eval().requires_grad_(False)
    if args.attention_backend:
        transformer.set_attention_backend(args.attention_backend)
    if args.fp8:
        convert_frozen_linears_to_fp8(transformer, emulate=device.type != "cuda")
    if args.compile:
        for block in transformer.transformer_blocks:
            block.compile()
    return transformer.to(device)


def weights_path(args):
    return os.path.join(args.lora_path, EMA_DIR) if args.use_ema else args.lora_path


def load_safety_checker():
    try:
        from cosmos_guardrail import CosmosSafetyChecker
    except ImportError:
        raise ValueError(
            "the Cosmos guardrail is not installed: `pip install cosmos-guardrail`, or pass "
            "--disable_safety_checker for offline tests (the model license requires it in use)"
        ) from None
    return CosmosSafetyChecker()


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
def check_lora_family(lora_path, family):
    """A fine-tune loads only onto the family it was trained on (the 2B shapes of both families are the same)."""
    path = os.path.join(lora_path, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{lora_path} holds no {ADAPTER_CONFIG}: not a train_cosmos_lora.py output or checkpoint"
        )
    with open(path) as f:
        trained_on = recorded_family(json.load(f))
    if trained_on != family.name:
        raise ValueError(f"--lora_path {lora_path} was trained on a {trained_on} model, the model is {family.name}")


def check_projected_embeddings(jobs, projection):
    """Cached projected embeddings are valid only with the crossattn_proj (base weights, no LoRA) they came from."""
    sha = projection_sha(projection) if projection is not None else None
    for job in jobs:
        if job.projection_sha and job.projection_sha != sha:
            raise ValueError(
                f"{job.source}: its cached text embedding was projected with another crossattn_proj than this "
                "model's; pass --prompt or re-cache with this model"
            )


def conditioning_latents(job, vae, generator, device, family):
    """Clean latents [1, z, T, h, w] the generation is conditioned on, and how many latent frames of them count.

    Image and video jobs follow the family's pipeline, which pads the conditioning frames to the clip length with
    the last frame, encodes that whole clip with the VAE posterior (drawn as ModelFamily.conditioning_latents
    says), normalizes it and then uses only the conditioning latent frames. The VAE is causal in time, so those
    latent frames depend on the conditioning frames alone: only they are encoded, and the other latent frames are
    zero (the conditioning mask multiplies them by 0).
    """
    if job.kind == "cached":
        return job.latents[None].to(device), None
    frames = job.cond_frames
    num_cond = (len(frames) - 1) // VAE_TEMPORAL_FACTOR + 1
    dist = vae.encode(frames_to_vae_input(frames)[None].to(device, vae.dtype)).latent_dist
    clip_shape = (1, *latent_shape(*job.shape, channels=dist.mean.shape[1]))
    latents = family.conditioning_latents(dist, clip_shape, num_cond, generator)
    latents = normalize_latents(latents.float(), vae.config)
    rest = latents.new_zeros(*clip_shape[:2], clip_shape[2] - num_cond, *clip_shape[3:])
    return torch.cat([latents, rest], dim=2), num_cond


CHUNK_SEED_STRIDE = 1_000_003  # a prime far above any job count, so no two (job, chunk) pairs share a seed


def chunk_seed(job_seed, chunk):
    """The seed of clip `chunk` of a rollout: the job's own seed for the first (a 1-clip rollout is the single clip),
    then job_seed + chunk * CHUNK_SEED_STRIDE (NVIDIA's chained inference uses seed + chunk, which the next job's
    seed would repeat)."""
    return job_seed + chunk * CHUNK_SEED_STRIDE


@torch.no_grad()
def generate_latents(jobs, components, args, first_index, chunk=0):
    """Generate one batch of jobs of equal shape (clip `chunk` of their rollouts); returns normalized latents and the
    conditioning latent frames."""
    from diffusers.utils.torch_utils import randn_tensor

    family, transformer, vae = components.family, components.transformer, components.vae
    device, dtype = transformer.device, transformer.dtype
    num_frames, height, width = jobs[0].shape
    cond_latents, noises, num_cond = [], [], []
    for offset, job in enumerate(jobs):
        generator = torch.Generator(device="cpu").manual_seed(chunk_seed(args.seed + first_index + offset, chunk))
        latents, n = conditioning_latents(job, vae, generator, device, family)
        n = n or (1 if args.num_conditioning_frames == 1 else 2)
        cond_latents.append(latents)
        noises.append(randn_tensor(latents.shape, generator=generator, device=device, dtype=torch.float32))
        num_cond.append(n)
    if len(set(num_cond)) > 1:
        raise ValueError("a batch mixes 1 and 2 conditioning latent frames; use --batch_size 1")
    prompt_embeds = torch.cat([prompt_embeddings(job, components, args) for job in jobs]).to(device, dtype)
    negative = None
    if args.guidance_scale > 1.0:
        text = [args.negative_prompt or family.default_negative_prompt()] * len(jobs)
        negative = family.encode_prompts(components.tokenizer, components.text_encoder, text, device)
        negative = project_text(components.text_projection, negative).to(dtype)
    latents = family.denoise(
        transformer,
        components.scheduler,
        torch.cat(noises),
        torch.cat(cond_latents),
        num_cond[0],
        prompt_embeds,
        negative,
        args.guidance_scale,
        args.num_inference_steps or family.num_inference_steps,
    )
    return latents, num_cond[0]


@dataclass
class RolloutChunk:
    """One clip of a rollout. It covers rollout frames [first, first + len(frames)); its first `num_cond_frames`
    frames re-create the frames it was conditioned on, which are the rollout's frames there already."""

    cond_frames: torch.Tensor | None  # uint8 [n, H, W, 3] encoded to condition it; None: a cached clip's latents
    frames: torch.Tensor  # uint8 [F, H, W, 3], decoded
    num_cond_frames: int  # pixel frames
    first: int  # the rollout frame index of frames[0]

    def span(self):
        """Its frames and its conditioning frames, as [start, end) rollout frame indices."""
        end, cond_end = self.first + len(self.frames), self.first + self.num_cond_frames
        return {"frames": [self.first, end], "conditioning_frames": [self.first, cond_end]}


@dataclass
class Rollout:
    """The chained clips of one job; `video()` joins them, each frame once."""

    chunks: list

    def video(self):
        """uint8 [T, H, W, 3]: the first clip whole, then each next clip without its conditioning frames (the
        previous clip's last frames, kept as that clip generated them)."""
        first, *rest = self.chunks
        return torch.cat([first.frames, *(c.frames[c.num_cond_frames :] for c in rest)])

    def spans(self):
        return [chunk.span() for chunk in self.chunks]


def pixel_frames(num_latent_frames):
    """Pixel frames of the first `num_latent_frames` latent frames of a clip (the causal VAE: 1, then 4 each)."""
    return 1 + VAE_TEMPORAL_FACTOR * (num_latent_frames - 1)


@torch.no_grad()
def generate_rollouts(jobs, components, args, first_index):
    """Generate one batch of jobs of equal shape as rollouts of --rollout_chunks chained clips (1: the single clip).

    Clip k+1 of a job is conditioned on the last --num_conditioning_frames frames clip k generated: decoded to uint8
    and encoded again by the VAE like any conditioning video, as NVIDIA's chained (autoregressive) Video2World
    inference does. Each clip has its own seed (chunk_seed).
    """
    num_frames = jobs[0].shape[0]
    rollouts = [Rollout(chunks=[]) for _ in jobs]
    conditioning = jobs
    for chunk in range(args.rollout_chunks):
        # Generate and decode clip `chunk` of every job in the batch.
        with stage(f"generating clip {chunk + 1} of {args.rollout_chunks}"):
            latents, num_cond = generate_latents(conditioning, components, args, first_index, chunk)
            videos = decode_to_frames(components.vae, latents, compiled=args.compile)
        # Add it to each rollout: its conditioning frames are the previous clip's last ones.
        n = pixel_frames(num_cond)
        for rollout, job, video in zip(rollouts, conditioning, videos, strict=True):
            first = rollout.chunks[-1].first + num_frames - n if rollout.chunks else 0
            rollout.chunks.append(RolloutChunk(job.cond_frames, video, n, first))
        # The next clip of each job is conditioned on this one's last frames.
        tail = args.num_conditioning_frames
        conditioning = [replace(job, cond_frames=video[-tail:]) for job, video in zip(jobs, videos, strict=True)]
    return rollouts


def prompt_embeddings(job, components, args):
    """A job's text embedding as the transformer takes it (projected for Predict2.5)."""
    if args.prompt is None and job.prompt_embeds is not None:
        return project_text(components.text_projection, job.prompt_embeds[None])
    prompt = args.prompt or DEFAULT_PROMPT
    checker = components.safety_checker
    if checker is not None and not checker.check_text_safety(prompt):
        raise ValueError(f"the guardrail rejected the prompt {prompt!r}")
    device = components.transformer.device
    embeds = components.family.encode_prompts(components.tokenizer, components.text_encoder, [prompt], device)
    return project_text(components.text_projection, embeds)


def ground_truth(job, vae, compiled=False):
    if job.kind == "cached":
        return decode_to_frames(vae, job.latents[None].to(vae.device), compiled)[0]
    return job.truth_frames


# ----------------------------------------------------------------------------------------------------------------
# Outputs and metrics
# ----------------------------------------------------------------------------------------------------------------


def shape_batches(jobs, indices, batch_size):
    """Consecutive jobs in batches of up to batch_size, a new batch wherever the shape changes."""
    batches = []
    for job, index in zip(jobs, indices, strict=True):
        if batches and len(batches[-1][0]) < batch_size and batches[-1][0][-1].shape == job.shape:
            batches[-1][0].append(job)
            batches[-1][1].append(index)
        else:
            batches.append(([job], [index]))
    return batches


def generate_videos(jobs, components, args, first_index):
    """One batch of jobs of equal shape as rollouts of --rollout_chunks clips (1: the single clip) and their joined
    uint8 videos [T, H, W, 3] (numpy), each passed through the guardrail where it is on. Job i of the batch uses
    seed + first_index + i."""
    rollouts = generate_rollouts(jobs, components, args, first_index)
    videos = [rollout.video().numpy() for rollout in rollouts]
    if components.safety_checker is not None:
        videos = [components.safety_checker.check_video_safety(video) for video in videos]
    return rollouts, videos


def side_by_side(truth, video):
    """Ground truth | generated, as long as the generated video (black where the ground truth ends)."""
    shown = np.zeros_like(video)
    shown[: len(truth)] = truth[: len(video)]
    return np.concatenate([shown, video], axis=2)


def run_jobs(jobs, indices, components, args, progress):
    """Generate the given jobs in batches of equal shape; write their mp4s; return their results."""
    results = []
    for batch, batch_indices in shape_batches(jobs, indices, args.batch_size):
        # Generate, decode and check the batch, one clip of its rollouts after another.
        with stage(f"generating {', '.join(job.name for job in batch)}"):
            rollouts, videos = generate_videos(batch, components, args, batch_indices[0])
        # Write and score each video.
        for job, index, rollout, video in zip(batch, batch_indices, rollouts, videos, strict=True):
            result = {
                "index": index,
                "name": job.name,
                "input": job.source,
                "kind": job.kind,
                "fps": job.fps,
                "video": f"{job.name}.mp4",
                "chunks": rollout.spans(),
            }
            if job.caption:
                result["caption"] = job.caption
            with stage(f"writing {job.name}"):
                write_mp4(os.path.join(args.output_dir, result["video"]), video, job.fps)
                truth = ground_truth(job, components.vae, compiled=args.compile)
                if truth is not None:
                    num_cond = rollout.chunks[0].num_cond_frames
                    result.update(frame_metrics(torch.from_numpy(video), truth, num_cond))
                    result["truth_frames"] = len(truth)
                    result["side_by_side"] = f"{job.name}_truth_vs_generated.mp4"
                    result["truth"] = "VAE reconstruction" if job.kind == "cached" else "source frames"
                    path = os.path.join(args.output_dir, result["side_by_side"])
                    write_mp4(path, side_by_side(truth.numpy(), video), job.fps)
            results.append(result)
            progress.update(1)
    return results


def frame_captions(result, length):
    """The caption under each generated frame on the contact sheet: its index, its clip of the rollout and, where
    it has ground truth, its PSNR and SSIM."""
    clip = [0] * length
    for k, span in enumerate(result["chunks"][1:], start=1):
        for t in range(span["conditioning_frames"][1], span["frames"][1]):
            clip[t] = k
    per_frame = result.get("per_frame", {"frame": [], "psnr": [], "ssim": []})
    scores = zip(per_frame["frame"], per_frame["psnr"], per_frame["ssim"], strict=True)
    scored = {t: f" {psnr_db:.1f}dB {ssim_value:.2f}" for t, psnr_db, ssim_value in scores}
    return [f"{t} c{clip[t]}{scored.get(t, '')}" for t in range(length)]


def contact_sheet_rows(results, videos, args):
    """Labelled rows: each job's ground truth (source frames, or the VAE reconstruction of a cached clip's latents),
    read back from its side-by-side mp4, above what was generated, captioned frame by frame (frame_captions)."""
    rows, labels, captions = [], [], []
    for result, video in zip(results, videos, strict=True):
        if "side_by_side" in result:
            both = read_mp4(os.path.join(args.output_dir, result["side_by_side"]))
            rows.append(both[:, :, : both.shape[2] // 2])
            labels.append(f"{result['name']}: {result['truth']}")
            captions.append(None)
        rows.append(video)
        caption = f" from its caption: {result['caption']}" if "caption" in result else ""
        labels.append(f"{result['name']}: generated{caption}")
        captions.append(frame_captions(result, len(video)))
    return rows, labels, captions


def summarize(results, args):
    videos = [read_mp4(os.path.join(args.output_dir, r["video"])) for r in results]
    write_mp4(os.path.join(args.output_dir, "video_grid.mp4"), video_grid(videos), results[0]["fps"])
    rows, labels, captions = contact_sheet_rows(results, videos, args)
    sheet = contact_sheet(rows, labels, frame_captions=captions)
    Image.fromarray(sheet).save(os.path.join(args.output_dir, "contact_sheet.png"))
    scored = [r for r in results if "psnr" in r]
    summary = {"settings": vars(args), "videos": results}
    if scored:
        summary["mean_psnr"] = sum(r["psnr"] for r in scored) / len(scored)
        summary["mean_ssim"] = sum(r["ssim"] for r in scored) / len(scored)
    atomic_write_text(os.path.join(args.output_dir, "results.json"), json.dumps(summary, indent=2, default=str))
    for r in scored:
        print(f"{r['name']}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}")
    if scored:
        print(f"mean over {len(scored)} videos: PSNR {summary['mean_psnr']:.2f} dB, SSIM {summary['mean_ssim']:.4f}")
    print(f"wrote {len(results)} videos, video_grid.mp4, contact_sheet.png and results.json to {args.output_dir}")
    return summary


def resolve_buckets(args):
    """--bucket FxHxW sets --num_frames/--height/--width; --bucket auto needs a bucket list (--buckets or the
    --from_cache cache's)."""
    if args.bucket and args.bucket != "auto":
        bucket = parse_bucket(args.bucket)
        args.num_frames, args.height, args.width = bucket.num_frames, bucket.height, bucket.width
    if args.buckets:
        args.buckets = [parse_bucket(b) for b in args.buckets]
    elif args.bucket == "auto" and args.from_cache:
        args.buckets = [parse_bucket(b) for b in read_cache_info(args.from_cache).get("buckets", [])]
    if args.bucket == "auto" and not args.buckets:
        raise ValueError("--bucket auto needs a bucket list: --buckets, or --from_cache with a bucketed cache")


def validate_args(args):
    """Everything that can fail before a model loads: the guardrail, the model path, the geometry, the weights."""
    if not args.disable_safety_checker and importlib.util.find_spec("cosmos_guardrail") is None:
        load_safety_checker()  # raises its one-line error
    if args.from_cache:
        check_no_rollout(args, f"--from_cache {args.from_cache} gives cached clips")
    resolve_buckets(args)
    check_clip_geometry(args.num_frames, args.height, args.width)
    check_rollout_frames(args)
    check_pretrained_model(
        args.pretrained_model_name_or_path, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"]
    )
    validate_lora_args(args)
    if args.fp8:
        check_fp8_support()


def validate_lora_args(args, flag="--lora_path"):
    """--lora_path (named `flag` in errors) is a fine-tune whose files, EMA included with --use_ema, are whole."""
    if args.lora_path and not os.path.isdir(args.lora_path):
        raise FileNotFoundError(f"{flag} {args.lora_path} is not a directory")
    if args.use_ema and not args.lora_path:
        raise ValueError("--use_ema needs --lora_path")
    if args.use_ema and not os.path.isdir(weights_path(args)):
        raise FileNotFoundError(f"--use_ema: {args.lora_path} has no {EMA_DIR}/ (train with --ema_decay)")
    if args.lora_path:
        read_adapter_config(weights_path(args))  # every weight file it lists is there and whole


def check_rollout_frames(args):
    """Each clip of a rollout after the first must generate frames beyond its conditioning frames."""
    shortest = min(b.num_frames for b in args.buckets) if args.bucket == "auto" else args.num_frames
    if args.rollout_chunks > 1 and shortest <= args.num_conditioning_frames:
        raise ValueError(
            f"--rollout_chunks {args.rollout_chunks} needs clips longer than --num_conditioning_frames "
            f"{args.num_conditioning_frames}; the shortest is {shortest} frames"
        )


def main(args):
    from accelerate.utils import gather_object

    validate_args(args)
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    args.num_inference_steps = args.num_inference_steps or family.num_inference_steps
    if args.lora_path:
        check_lora_family(args.lora_path, family)
    jobs = collect_jobs(args, family)
    state = Accelerator()  # reads the launcher's settings (incl. ACCELERATE_USE_CPU), unlike PartialState
    os.makedirs(args.output_dir, exist_ok=True)
    components = load_pipeline_components(args, state.device, family)
    check_projected_embeddings(jobs, components.text_projection)
    progress = tqdm(total=len(jobs), desc="videos", disable=not state.is_local_main_process)
    indexed = list(enumerate(jobs))
    with state.split_between_processes(indexed) as mine:
        results = run_jobs([job for _, job in mine], [i for i, _ in mine], components, args, progress)
    progress.close()
    results = sorted(gather_object(results), key=lambda r: r["index"])
    if state.is_main_process:
        return summarize(results, args)
    return None


if __name__ == "__main__":
    run_main(main, parse_args)
