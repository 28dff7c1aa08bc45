#!/usr/bin/env python
"""Parameter-efficient fine-tuning of Cosmos-Predict2 Video2World or Cosmos-Predict2.5 on a latent cache made by
cache_latents.py with the same model (the family is read from the checkpoint's model_index.json).

What trains: LoRA (peft) on the cross-attention projections, one temporal adapter per transformer block, and the
output projection `proj_out` (this project's recipe; `--recipe nvidia` trains NVIDIA's LoRA on every attention and MLP
linear instead). Everything else is frozen. The VAE and the text encoder are not loaded: the cache holds
their outputs.

    accelerate launch --config_file accelerate_configs/fsdp3.yaml train_cosmos_lora.py \\
        --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --cache_dir /scratch/cache --output_dir outputs/ego-lora --max_train_steps 10000

Outputs in --output_dir: checkpoint-STEP/ folders (full training state, written atomically), the final
pytorch_lora_weights.safetensors + temporal_adapters.safetensors + adapter_config.json, training_args.json,
losses.jsonl (one row per optimizer step) and logs for TensorBoard / W&B.
"""

import argparse
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin, set_seed
from tqdm.auto import tqdm

from cosmos_adapters import add_temporal_adapters, lora_config
from cosmos_cache import atomic_write_text, bucket_name, read_clip
from cosmos_cli import (
    HelpFormatter,
    add_config_argument,
    add_model_arguments,
    check_pretrained_model,
    fraction,
    hub_offline,
    int_list,
    non_negative_float,
    non_negative_int,
    parse_with_config,
    positive_float,
    positive_int,
)
from cosmos_data import (
    CachedClips,
    bucket_table,
    build_train_dataloader,
    caption_summary,
    check_clip_frames,
    held_out_summary,
    load_caches,
    split_validation_clips,
)
from cosmos_families import (
    PROJECT_RECIPE,
    RECIPE_NAMES,
    detect_family,
    load_component,
    load_component_config,
    prepare_text_projection,
)
from cosmos_metrics import psnr, ssim
from cosmos_process import RunStopped, StopSignal, run_main, stage
from cosmos_run import (
    Trainables,
    TrainState,
    append_loss_log,
    check_checkpoint,
    export_final_weights,
    load_checkpoint,
    push_to_hub,
    read_json,
    resolve_resume_path,
    save_checkpoint,
    trainable_state_dict,
    truncate_loss_log,
    write_run_record,
)
from cosmos_sampling import predict_velocity
from cosmos_speed import check_fp8_support, convert_frozen_linears_to_fp8, modulate_per_frame
from cosmos_vae import decode_to_frames
from cosmos_video import contact_sheet, write_mp4

logger = get_logger(__name__)
# EX_TEMPFAIL: stopped early by SIGUSR1, SIGTERM or a first Ctrl-C after saving a checkpoint; rerunning the same
# command resumes it, and the SLURM wrappers requeue the job on it.
REQUEUE_EXIT_CODE = 75


def recipe_default(name):
    """Help text for a flag the recipe sets: what `None` becomes."""
    value = PROJECT_RECIPE[name]
    if isinstance(value, list):
        value = " ".join(map(str, value)) if isinstance(value[0], str) else ",".join(map(str, value))
    return f"Default: the --recipe's value, {value} for `default`."


VALIDATION_TIMESTEPS = [0.1, 0.3, 0.5, 0.7, 0.9]
VALIDATION_METRICS = {"psnr": psnr, "ssim": ssim}  # --validation_metrics: those that need no network


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_config_argument(parser)
    add_model_arguments(parser)
    parser.add_argument(
        "--cache_dir",
        nargs="+",
        default=None,
        help="One or more latent caches from cache_latents.py, each `PATH`, `PATH:WEIGHT` or "
        "`NAME=PATH:WEIGHT`, e.g. `ego=/c/ego:0.7 other=/c/other:0.3`. Weights set how often each "
        "cache is drawn (default: in proportion to its size).",
    )
    parser.add_argument("--output_dir", default="outputs/cosmos-lora", help="Where checkpoints and weights go.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for data order, noise and held-out clips.")

    parser.add_argument(
        "--recipe",
        choices=RECIPE_NAMES,
        default="default",
        help="Where the flags whose default is `the --recipe's value` take it from when not given (on the command "
        "line or in --config): `default` is this project's (LoRA on the cross-attention, temporal adapters, "
        "proj_out); `nvidia` is NVIDIA's LoRA post-training example for the checkpoint's family: LoRA alone on "
        "every attention and MLP linear, NVIDIA's rank, learning rate, weight decay and linear schedule, power EMA, "
        "and for Predict2.5 also text-only samples (0 conditioning frames). docs/objective.md lists the values.",
    )

    model = parser.add_argument_group("what trains")
    model.add_argument(
        "--lora_rank", type=positive_int, default=None, help="LoRA rank. " + recipe_default("lora_rank")
    )
    model.add_argument(
        "--lora_alpha",
        type=positive_float,
        default=None,
        help="LoRA alpha (the update is scaled by alpha/rank). " + recipe_default("lora_alpha"),
    )
    model.add_argument(
        "--lora_target_modules",
        nargs="+",
        default=None,
        help="Module name suffixes that get LoRA. The list replaces the default: to add self-attention, give all "
        "of them, e.g. `attn2.to_q attn2.to_k attn2.to_v attn2.to_out.0 attn1.to_q ...` or ff.net.0.proj. "
        + recipe_default("lora_target_modules"),
    )
    model.add_argument("--lora_dropout", type=fraction, default=0.0, help="Dropout on the LoRA input.")
    model.add_argument(
        "--use_temporal_adapters",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Add a temporal adapter to every transformer block (--no-use_temporal_adapters to skip). "
        + recipe_default("use_temporal_adapters"),
    )
    model.add_argument(
        "--adapter_reduction_factor",
        type=positive_int,
        default=8,
        help="Temporal adapter bottleneck width is hidden_size / this.",
    )
    model.add_argument(
        "--train_proj_out",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Train the output projection proj_out (--no-train_proj_out freezes it). "
        + recipe_default("train_proj_out"),
    )

    objective = parser.add_argument_group("objective")
    objective.add_argument(
        "--timestep_shift",
        type=timestep_shift_value,
        default=None,
        help="Shift s of the logit-normal noise level: t = s*t0 / (1 + (s-1)*t0). `auto` is sqrt(latent frames of "
        "each clip): 4 for 61-frame clips, sqrt(24) for 93; a number overrides it. Default: the family's, auto for "
        "Predict2, 5 for Predict2.5.",
    )
    objective.add_argument(
        "--high_sigma_ratio",
        type=fraction,
        default=None,
        help="Fraction of samples whose noise level is drawn log-uniform in sigma in [200, 1e5] instead "
        "(t = sigma / (1 + sigma)). Default: the family's, 0.05 for Predict2, 0 for Predict2.5. 0 disables.",
    )
    objective.add_argument(
        "--conditioning_timestep",
        type=float,
        default=None,
        help="Timestep t of the clean conditioning frames. Default: what the family's diffusers pipeline samples "
        "with, so training and sampling agree: 1e-4/(1+1e-4) for Predict2, 1e-4 for Predict2.5.",
    )
    objective.add_argument(
        "--conditioning_frames",
        type=int_list,
        default=None,
        help="Comma-separated choices for the number of clean leading latent frames per sample, e.g. 1,2, drawn "
        "uniformly. 0 (text alone) only for Predict2.5, whose pipeline also generates from text alone. "
        + recipe_default("conditioning_frames"),
    )
    objective.add_argument(
        "--text_dropout",
        type=fraction,
        default=0.2,
        help="Probability of replacing a sample's text embedding with zeros.",
    )

    optim = parser.add_argument_group("optimization")
    optim.add_argument("--train_batch_size", type=positive_int, default=2, help="Clips per GPU per micro-step.")
    optim.add_argument(
        "--gradient_accumulation_steps", type=positive_int, default=1, help="Micro-steps per optimizer step."
    )
    optim.add_argument(
        "--max_train_steps",
        type=positive_int,
        default=None,
        help="Optimizer steps to train; overrides --num_train_epochs.",
    )
    optim.add_argument(
        "--num_train_epochs", type=positive_int, default=1, help="Epochs, used when --max_train_steps is unset."
    )
    optim.add_argument(
        "--learning_rate",
        type=positive_float,
        default=None,
        help="Peak learning rate of AdamW. " + recipe_default("learning_rate"),
    )
    optim.add_argument(
        "--adam_weight_decay",
        type=non_negative_float,
        default=None,
        help="AdamW weight decay. " + recipe_default("adam_weight_decay"),
    )
    optim.add_argument(
        "--lr_scheduler",
        choices=["cosine", "linear", "constant"],
        default=None,
        help="Learning-rate schedule after warmup; cosine and linear decay to --min_lr at the last step. "
        + recipe_default("lr_scheduler"),
    )
    optim.add_argument(
        "--lr_warmup_steps",
        type=non_negative_int,
        default=None,
        help="Linear warmup steps. " + recipe_default("lr_warmup_steps"),
    )
    optim.add_argument(
        "--min_lr",
        type=non_negative_float,
        default=None,
        help="Floor of the cosine and linear schedules. " + recipe_default("min_lr"),
    )
    optim.add_argument(
        "--max_grad_norm",
        type=non_negative_float,
        default=0.1,
        help="Gradient clipping norm (0 disables); 0.1 matches NVIDIA (see docs/objective.md).",
    )
    optim.add_argument(
        "--ema_decay",
        type=ema_decay_value,
        default=None,
        help="Keep an exponential moving average of the trainable weights, exported to OUTPUT/ema/ beside the raw "
        "weights (sample.py --use_ema loads it). A number d in (0, 1) is a constant decay; `power` is a power EMA "
        "with sigma_rel 0.1 (decay (1 - 1/step)^7.94, 0.9992 at step 10k); 0 is off: it costs a second fp32 copy "
        "of the trainable weights. " + recipe_default("ema_decay"),
    )
    optim.add_argument(
        "--mixed_precision",
        choices=["no", "bf16"],
        default=None,
        help="Override the accelerate config's mixed precision. bf16 keeps frozen weights in bf16.",
    )

    speed = parser.add_argument_group("speed and memory")
    speed.add_argument(
        "--gradient_checkpointing",
        choices=["none", "full", "selective"],
        default="none",
        help="Recompute activations in the backward pass, per transformer block: `full` keeps only "
        "block inputs; `selective` keeps matmul and attention outputs and recomputes the cheap "
        "elementwise work. Works under FSDP2.",
    )
    speed.add_argument(
        "--gradient_checkpointing_blocks",
        type=positive_int,
        default=None,
        help="How many transformer blocks --gradient_checkpointing wraps, counted from the first. The others keep "
        "every activation: that fills the memory a mode leaves free, and each block left out skips its "
        "recomputation (docs/training.md: 5.2 GiB a block at 93x704x1280, batch 1). Unset: every "
        "block.",
    )
    speed.add_argument(
        "--compile",
        action="store_true",
        help="Compile each transformer block in place with torch.compile (regional, FSDP2-safe).",
    )
    speed.add_argument(
        "--fp8",
        action="store_true",
        help="Run the frozen linears of the transformer blocks (the LoRA base layers included) in FP8 with "
        "torchao's dynamic tensorwise scaling; LoRA, adapters, AdaLN and proj_out stay as they are, and the export "
        "is unchanged. Needs torchao (requirements-fp8.txt) and an FP8 GPU (compute capability 8.9+); use with "
        "--compile (eager FP8 is slower than bf16). On a CPU the FP8 casts are emulated.",
    )
    speed.add_argument(
        "--attention_backend",
        default=None,
        help="diffusers attention backend, e.g. native, _native_cudnn, _native_flash, flash. Default: native SDPA.",
    )

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataloader_num_workers", type=non_negative_int, default=4, help="DataLoader workers per process."
    )
    data.add_argument(
        "--max_bad_clips",
        type=int,
        default=10,
        help="Clips that fail to load mid-run (damaged files) are replaced by another clip of their bucket, named "
        "and counted in the log; after this many the run stops with their list.",
    )
    data.add_argument(
        "--num_validation_clips",
        type=non_negative_int,
        default=4,
        help="Clips held out from the first cache (whole videos) that never train. They are listed in "
        "OUTPUT/held_out.json (and in every checkpoint), which sample.py --from_cache --lora_path uses.",
    )

    run = parser.add_argument_group("checkpoints, validation, logging")
    run.add_argument("--checkpointing_steps", type=positive_int, default=500, help="Save a checkpoint every N steps.")
    run.add_argument(
        "--checkpoints_total_limit", type=positive_int, default=None, help="Keep at most this many checkpoints."
    )
    run.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="`latest` (the newest checkpoint in --output_dir, if any) or a checkpoint-STEP path. Refused when "
        "a setting that shapes the run differs from the checkpoint's (see --allow_changed_settings).",
    )
    run.add_argument(
        "--allow_changed_settings",
        action="store_true",
        help="Resume even though settings differ from the checkpoint's (they are listed, then used): a new "
        "--max_train_steps, for example, reshapes the learning-rate schedule.",
    )
    run.add_argument(
        "--validation_steps",
        type=positive_int,
        default=500,
        help="Every N steps, compute the held-out loss at fixed noise levels.",
    )
    run.add_argument(
        "--validation_videos",
        type=non_negative_int,
        default=0,
        help="Every --validation_steps, also generate this many held-out clips from their first latent "
        "frame with sample.py's sampler (no CFG: training loads no T5) and write ground truth | "
        "generated mp4s to OUTPUT/validation/step-N/. Loads the VAE.",
    )
    run.add_argument(
        "--validation_inference_steps", type=positive_int, default=35, help="Denoising steps of those videos."
    )
    run.add_argument(
        "--validation_metrics",
        nargs="+",
        choices=VALIDATION_METRICS,
        default=[],
        help="With --validation_videos: score those videos against their clips (the frames after the conditioning "
        "frame) and log val/METRIC, the base model's val/METRIC_base and the paired difference val/METRIC_vs_base. "
        "The base's videos are made once, before the first step (the untrained fine-tune is the base exactly), "
        "from the same clips and noise; OUTPUT/validation/metrics.jsonl keeps every row.",
    )
    run.add_argument(
        "--report_to",
        choices=["tensorboard", "wandb", "all", "none"],
        default="tensorboard",
        help="Experiment tracker. W&B writes under OUTPUT/wandb and runs offline when WANDB_API_KEY is unset, "
        "HF_HUB_OFFLINE is set or its server cannot be reached (`wandb sync` the run later).",
    )
    run.add_argument("--tracker_project_name", default="cosmos-finetune", help="Project name for the tracker.")
    run.add_argument(
        "--push_to_hub",
        action="store_true",
        help="After the final export, upload OUTPUT (weights, model card, records; no checkpoints) to the Hugging "
        "Face Hub, with the token from the environment (HF_TOKEN or `hf auth login`).",
    )
    run.add_argument(
        "--hub_model_id",
        default=None,
        help="With --push_to_hub: the model repo, e.g. `user/ego-lora`. Default: the output folder's name under "
        "the token's account.",
    )

    return parse_with_config(parser, argv)


def timestep_shift_value(text):
    return "auto" if text == "auto" else positive_float(text)


def ema_decay_value(text):
    if text == "power":
        return text
    value = fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be below 1 (or `power`), got {text}")
    return value


def validate_args(args):
    """Checks that need more than one flag; single values are checked by their argparse types."""
    if not args.cache_dir:
        raise ValueError("give at least one --cache_dir")
    check_pretrained_model(args.pretrained_model_name_or_path, ["transformer", "vae"])
    if args.fp8:
        check_fp8_support()
    if args.push_to_hub and hub_offline():
        raise ValueError("--push_to_hub needs the network, and HF_HUB_OFFLINE is set")
    if args.gradient_checkpointing_blocks:
        check_checkpointed_blocks(args)
    if args.validation_metrics and not args.validation_videos:
        raise ValueError("--validation_metrics scores the validation videos: give --validation_videos N too")


def check_checkpointed_blocks(args):
    """--gradient_checkpointing_blocks needs a mode, and no more blocks than the transformer has."""
    if args.gradient_checkpointing == "none":
        raise ValueError("--gradient_checkpointing_blocks needs --gradient_checkpointing full or selective")
    config = load_component_config(args.pretrained_model_name_or_path, "transformer", args.revision)
    if args.gradient_checkpointing_blocks > config["num_layers"]:
        raise ValueError(
            f"--gradient_checkpointing_blocks {args.gradient_checkpointing_blocks}: the transformer has "
            f"{config['num_layers']} blocks"
        )


# ----------------------------------------------------------------------------------------------------------------
# The run: set-up, then the training loop
# ----------------------------------------------------------------------------------------------------------------
def main(args):
    """Check everything that can fail before a model loads, write the run's record, then train."""
    validate_args(args)
    family = resolve_family_defaults(args)
    caches, info = load_caches(args.cache_dir, args.pretrained_model_name_or_path, args.revision, family=family)
    check_clip_frames(caches, args)
    resume_path = resolve_resume_path(args)
    if resume_path:
        check_checkpoint(resume_path, args, defaults=vars(parse_args([])))
    first_cache_clips = caches[0].clips
    train_clips, validation_clips = split_validation_clips(caches[0], resume_path, args)
    caches[0].clips = train_clips

    shapes = {clip.shape for clip in [*validation_clips, *(c for cache in caches for c in cache.clips)]}
    accelerator = build_accelerator(args, len(shapes))
    set_seed(args.seed)
    if accelerator.is_main_process:
        write_run_record(args, caches, first_cache_clips, train_clips, validation_clips)
    accelerator.print(held_out_summary(first_cache_clips, train_clips, validation_clips))
    accelerator.print(caption_summary(caches))
    accelerator.wait_for_everyone()
    stop = StopSignal()
    try:
        return run_training(args, family, accelerator, caches, info, validation_clips, resume_path, stop)
    finally:
        stop.restore()


def run_training(args, family, accelerator, caches, info, validation_clips, resume_path, stop):
    """Load the model, then loop: data, noise, forward, loss, backward, step, log, validate, checkpoint."""
    train_dataloader, groups = build_train_dataloader(caches, args, accelerator.num_processes)
    batch_sampler = train_dataloader.batch_sampler
    accelerator.print(bucket_table(groups, args.train_batch_size))
    weight_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    transformer = load_transformer(args, weight_dtype, family)
    if args.fp8:
        convert_frozen_linears_to_fp8(transformer, emulate=accelerator.device.type != "cuda")
    null_text = prepare_text_projection(transformer, info["text_embeds"])
    if accelerator.is_main_process:
        print(trainable_parameter_table(transformer))
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    transformer, optimizer, train_dataloader = accelerator.prepare(transformer, optimizer, train_dataloader)
    params = [p for p in transformer.parameters() if p.requires_grad]  # FSDP2 replaced them with sharded ones
    ema = EMA(params, args.ema_decay) if args.ema_decay else None

    batches_per_epoch = len(train_dataloader)
    steps_per_epoch = max(1, batches_per_epoch // args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lr_lambda(args, max_steps))
    accelerator.print(
        f"num_processes={accelerator.num_processes} ({accelerator.distributed_type.value}), "
        f"{sum(len(cache.clips) for cache in caches)} training clips, {len(validation_clips)} held out, "
        f"{max_steps} steps of {args.train_batch_size} x {args.gradient_accumulation_steps} x "
        f"{accelerator.num_processes} clips"
    )

    parts = Trainables(transformer, optimizer, lr_scheduler, ema, adapter_config(args))
    state = TrainState()
    if resume_path:
        state = load_checkpoint(resume_path, parts)
        accelerator.print(f"resumed from {resume_path} at step {state.global_step}")
    loss_log = os.path.join(args.output_dir, "losses.jsonl")
    if accelerator.is_main_process:
        truncate_loss_log(loss_log, state.global_step)
    if args.report_to != "none":
        init_trackers(accelerator, args)

    validation_set = CachedClips(validation_clips)
    decoder = None
    if validation_clips and args.validation_videos > 0:
        decoder = load_validation_decoder(args, weight_dtype, accelerator.device, family)
    if decoder and args.validation_metrics and state.global_step == 0:
        with stage("the base model's validation videos"):
            base_validation_scores(transformer, validation_set, decoder, args, accelerator)
    progress = tqdm(
        total=max_steps, initial=state.global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
    clock = StepClock()
    memory_warned = False  # memory_full_warning is said once per run
    transformer.train()
    while state.global_step < max_steps:
        # Data: resume mid-epoch at the exact batch (accelerate ends an accumulation window at each epoch's end,
        # so the position counts batches, not steps).
        epoch, skip = divmod(state.batches_consumed, batches_per_epoch)
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        # accelerate's loader re-sets its sampler's epoch to its own count at each pass, and does not reach a batch
        # sampler it wraps for several processes: set both.
        loader.set_epoch(epoch)
        batch_sampler.set_epoch(epoch)
        micro_step, loss_sum, tokens = 0, 0.0, 0
        for batch in timed(loader, clock):
            # Noise: every random draw of this micro-step depends only on its position, so resume is exact.
            torch.manual_seed(step_seed(args.seed, state.global_step, micro_step, accelerator.process_index))
            with accelerator.accumulate(transformer), stage(f"training step {state.global_step + 1}"):
                # Forward and loss.
                loss = training_loss(transformer, batch, args, null_text)
                stats = reduce_micro_step(accelerator, loss, batch, stop)
                check_bad_clips(batch, stats, state, args)
                check_finite(stats.loss, state)
                # Backward, clip, update (accelerate skips the update until the accumulation window ends).
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += stats.loss
            tokens += stats.tokens
            micro_step += 1
            state.batches_consumed += 1
            if not accelerator.sync_gradients:
                continue

            # Step: schedule, EMA and bookkeeping once per optimizer step.
            lr_scheduler.step()
            state.global_step += 1
            if ema:
                ema.update(state.global_step)
            step_loss = loss_sum / micro_step
            samples = micro_step * args.train_batch_size * accelerator.num_processes  # short at an epoch's end
            step_tokens, micro_step, loss_sum, tokens = tokens, 0, 0.0, 0

            # Log.
            logs = step_logs(step_loss, lr_scheduler, grad_norm, clock, samples, step_tokens)
            if not memory_warned and (warning := memory_full_warning(logs, state.global_step)):
                logger.warning(warning, main_process_only=False)
                memory_warned = True
            if accelerator.is_main_process:
                append_loss_log(loss_log, state.global_step, logs)
            accelerator.log(logs, step=state.global_step)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")

            # Validate.
            if validation_clips and state.global_step % args.validation_steps == 0:
                with stage(f"validation at step {state.global_step}"):
                    run_validation(transformer, validation_set, decoder, args, state.global_step, accelerator)

            # Checkpoint, and stop for a requeue when asked.
            if state.global_step % args.checkpointing_steps == 0 or stats.stop_requested:
                with stage(f"saving the checkpoint of step {state.global_step}"):
                    state.last_checkpoint = save_checkpoint(accelerator, parts, state, args)
            if stats.stop_requested:
                accelerator.print(
                    f"{stop.received or 'a stop signal on another rank'}: saved {state.last_checkpoint}; exiting with "
                    f"{REQUEUE_EXIT_CODE} (run the same command again to resume; the SLURM scripts requeue)"
                )
                accelerator.end_training()
                return REQUEUE_EXIT_CODE
            if state.global_step >= max_steps:
                break
            clock.restart()  # validation and checkpoints do not count as step time

    # Export the final weights (and their EMA).
    with stage("exporting the final weights"):
        export_final_weights(accelerator, parts, args)
    if args.push_to_hub and accelerator.is_main_process:
        with stage("uploading to the Hub"):
            repo_id = push_to_hub(args)
            print(f"uploaded {args.output_dir} to https://huggingface.co/{repo_id}")
    accelerator.end_training()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Set-up: the family's defaults, the accelerator, the experiment tracker
# ----------------------------------------------------------------------------------------------------------------
def resolve_family_defaults(args):
    """The checkpoint's family, its defaults for the objective flags left unset and the --recipe's values for the
    flags it sets, then the checks those values need (before any model loads)."""
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    if args.timestep_shift is None:
        args.timestep_shift = family.timestep_shift
    if args.conditioning_timestep is None:
        args.conditioning_timestep = family.conditioning_timestep
    if args.high_sigma_ratio is None:
        args.high_sigma_ratio = family.high_sigma_ratio
    for name, value in family.recipe(args.recipe).items():
        if getattr(args, name) is None:
            value = value(args) if callable(value) else value
            setattr(args, name, list(value) if isinstance(value, list) else value)
    if min(args.conditioning_frames) < family.min_conditioning_frames:
        raise ValueError(
            f"--conditioning_frames {','.join(map(str, args.conditioning_frames))}: {family.name} "
            f"({family.pipeline_class}) generates only from an image or a video, so it trains with at least "
            f"{family.min_conditioning_frames} conditioning frame; 0 (text alone) is for Predict2.5"
        )
    args.family = family.name
    return family


def build_accelerator(args, num_shapes):
    """Under --compile, each clip shape compiles its own static graph the first time a batch of it comes (warming
    each bucket once) instead of one dynamic-shape graph; the recompile limit leaves room for every shape, at the
    training batch size and at validation's batch of one."""
    if args.compile:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * num_shapes)
    dynamo = TorchDynamoPlugin(backend="inductor", use_regional_compilation=True, dynamic=False)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dataloader_config=DataLoaderConfiguration(non_blocking=True),  # batches come pinned: copy them asynchronously
        dynamo_plugin=dynamo if args.compile else None,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, "logs")
        ),
    )


def configure_wandb(output_dir):
    """W&B writes under OUTPUT/wandb and runs offline without WANDB_API_KEY, or with a key when HF_HUB_OFFLINE is
    set or its server does not answer within 3 s (compute nodes are usually offline). Returns the warning, if any."""
    os.environ.setdefault("WANDB_DIR", os.path.abspath(output_dir))
    if os.environ.get("WANDB_MODE"):
        return None
    if not os.environ.get("WANDB_API_KEY"):
        os.environ["WANDB_MODE"] = "offline"
        return None
    host = urllib.parse.urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else None if wandb_reachable(host) else f"{host} is unreachable"
    if reason is None:
        return None
    os.environ["WANDB_MODE"] = "offline"
    return (
        f"warning: W&B runs offline ({reason}); `wandb sync {os.path.join(output_dir, 'wandb')}/offline-run-*` later"
    )


def wandb_reachable(host, timeout=3.0):
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def init_trackers(accelerator, args):
    if args.report_to in ("wandb", "all"):
        os.makedirs(args.output_dir, exist_ok=True)
        warning = configure_wandb(args.output_dir) if accelerator.is_main_process else None
        if warning:
            print(warning, file=sys.stderr, flush=True)
    config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
    accelerator.init_trackers(args.tracker_project_name, config=config)


# ----------------------------------------------------------------------------------------------------------------
# Model: the frozen transformer and what trains in it
# ----------------------------------------------------------------------------------------------------------------
def load_transformer(args, weight_dtype, family):
    """Frozen base transformer in weight_dtype with LoRA, temporal adapters and proj_out trainable in fp32, and its
    AdaLN modulation computed per frame."""
    transformer = load_component(
        args.pretrained_model_name_or_path, "transformer", args.revision, weight_dtype, family=family
    )
    modulate_per_frame(transformer)
    transformer.requires_grad_(False)
    transformer.add_adapter(lora_config(args.lora_rank, args.lora_alpha, args.lora_target_modules, args.lora_dropout))
    if args.use_temporal_adapters:
        add_temporal_adapters(transformer, args.adapter_reduction_factor)
    transformer.proj_out.requires_grad_(args.train_proj_out)
    for param in transformer.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    if args.attention_backend:
        transformer.set_attention_backend(args.attention_backend)
    if args.gradient_checkpointing != "none":
        apply_gradient_checkpointing(transformer, args.gradient_checkpointing, args.gradient_checkpointing_blocks)
    return transformer


def apply_gradient_checkpointing(transformer, mode, num_blocks=None):
    """Wrap the first num_blocks transformer blocks (all when None) in torch's non-reentrant checkpoint wrapper, as
    accelerate does for FSDP2; the blocks after them keep their activations.

    diffusers' own `enable_gradient_checkpointing()` fails under FSDP2 at the first backward; wrapping the blocks
    before `prepare` works, and the exported weights keep clean names because saving goes through
    torch.distributed.checkpoint's state-dict API.
    """
    import functools

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    kwargs = {"checkpoint_impl": CheckpointImpl.NO_REENTRANT}
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, selective_checkpoint_policy)
    wrapped = {id(block) for block in transformer.transformer_blocks[:num_blocks]}
    apply_activation_checkpointing(
        transformer,
        checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, **kwargs),
        check_fn=lambda module: id(module) in wrapped,
    )


def selective_checkpoint_policy(ctx, op, *args, **kwargs):
    """Keep the outputs of matmuls and attention kernels; recompute norms, activations and other elementwise ops."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    saved = {
        aten.mm.default,
        aten.addmm.default,
        aten.bmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
    }
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def parameter_group(name):
    if ".lora_" in name:
        return "LoRA"
    if "temporal_adapter" in name:
        return "temporal adapters"
    return "proj_out" if name.startswith("proj_out") else "frozen"


def trainable_parameter_table(model):
    counts = {}
    for name, param in model.named_parameters():
        group = parameter_group(name) if param.requires_grad else "frozen"
        counts[group] = counts.get(group, 0) + param.numel()
    total = sum(counts.values())
    trainable = total - counts.get("frozen", 0)
    lines = [f"{'group':<20}{'parameters':>15}{'% of model':>12}"]
    for group in ("LoRA", "temporal adapters", "proj_out"):
        if group in counts:
            lines.append(f"{group:<20}{counts[group]:>15,}{100 * counts[group] / total:>11.3f}%")
    lines.append(f"{'trainable total':<20}{trainable:>15,}{100 * trainable / total:>11.3f}%")
    lines.append(f"{'model total':<20}{total:>15,}")
    return "\n".join(lines)


def adapter_config(args):
    return {
        "base_model": args.pretrained_model_name_or_path,
        "base_revision": args.revision,
        "family": args.family,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "lora_target_modules": args.lora_target_modules,
        "lora_dropout": args.lora_dropout,
        "use_temporal_adapters": args.use_temporal_adapters,
        "adapter_reduction_factor": args.adapter_reduction_factor,
        "train_proj_out": args.train_proj_out,
    }


# ----------------------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------------------
def flow_matching_loss(transformer, latents, prompt_embeds, t, noise, num_cond_frames, t_cond):
    """Cosmos video2world objective (Predict2 and Predict2.5): uniform MSE on the rectified-flow velocity.

    For clean latents z0 [B, C, T, H, W], noise level t in (0, 1) per sample and noise eps ~ N(0, I):
        x_t     = (1 - t) * z0 + t * eps
        input   = z0 on the first `num_cond_frames` latent frames (clean conditioning), x_t elsewhere
        timestep: t per frame, t_cond on conditioning frames (--conditioning_timestep); condition_mask = 1 there
        target  = eps - z0   (the velocity; the sampler's x0 = (1 - t) * x_t - t * F inverts it exactly)
        loss    = mean over non-conditioning frames of (F(input, t) - target)^2, in fp32
    This equals NVIDIA's ||x0 - x0_hat||^2 * (1 + sigma)^2 / sigma^2 with sigma = t / (1 - t).
    t is drawn by `sample_timesteps`, as NVIDIA draws sigma (cosmos-predict2 `video2world_model.py`,
    `draw_training_sigma_and_epsilon`):
        t0 = sigmoid(N(0, 1)),  t = s * t0 / (1 + (s - 1) * t0),  i.e. sigma = s * exp(N(0, 1)),
        with the shift s = sqrt(latent frames of the clip) (`--timestep_shift auto`, `default_timestep_shift`);
        and for a fraction `--high_sigma_ratio` (0.05, NVIDIA's 2B config) of the samples instead
        sigma ~ log-uniform in [200, 1e5],  t = sigma / (1 + sigma).
    The transformer is called by `predict_velocity`, as in the sampler.
    """
    batch, _, frames, height, width = latents.shape
    frame_index = torch.arange(frames, device=latents.device).view(1, 1, frames, 1, 1)
    cond = (frame_index < num_cond_frames.view(-1, 1, 1, 1, 1)).float()  # [B, 1, T, 1, 1]
    t = t.view(-1, 1, 1, 1, 1)
    noisy = (1 - t) * latents + t * noise
    model_input = cond * latents + (1 - cond) * noisy
    timestep = cond * t_cond + (1 - cond) * t
    velocity = predict_velocity(transformer, model_input, timestep, prompt_embeds, cond)
    squared_error = (velocity - (noise - latents)) ** 2 * (1 - cond)
    return squared_error.sum() / ((1 - cond).sum() * squared_error.shape[1] * height * width)


HIGH_SIGMA_RANGE = (200.0, 1e5)  # NVIDIA's LOGUNIFORM200_100000 high-sigma strategy


def default_timestep_shift(latent_frames):
    """NVIDIA's noise-level shift for clips of this many latent frames: sqrt(latent frames) (its
    `video_noise_multiplier = sqrt(state_t)`): 4 for 61 pixel frames, sqrt(24) for 93."""
    return math.sqrt(latent_frames)


def sample_timesteps(batch, shift, device, high_sigma_ratio=0.0):
    """Logit-normal t0 = sigmoid(N(0, 1)), shifted towards noise: t = shift * t0 / (1 + (shift - 1) * t0); a fraction
    high_sigma_ratio of the samples get t = sigma / (1 + sigma) with sigma log-uniform in [200, 1e5] instead."""
    t0 = torch.sigmoid(torch.randn(batch, device=device))
    t = shift * t0 / (1 + (shift - 1) * t0)
    if high_sigma_ratio > 0:
        high = torch.rand(batch, device=device) < high_sigma_ratio
        low, top = (math.log(v) for v in HIGH_SIGMA_RANGE)
        sigma = torch.exp(torch.rand(batch, device=device) * (top - low) + low)
        t = torch.where(high, sigma / (1 + sigma), t)
    return t


def clip_timestep_shift(shift, latents):
    """The shift of each clip of a batch [B]: a number, or `auto`, the square root of the clip's latent frames
    (NVIDIA's sqrt(state_t): 4 for 61 frames, sqrt(24) for 93). A batch holds one bucket, so one frame count."""
    value = default_timestep_shift(latents.shape[2]) if shift == "auto" else float(shift)
    return torch.full((latents.shape[0],), value, device=latents.device)


def training_loss(transformer, batch, args, null_text=None):
    """Draw noise level, noise, conditioning frames and text dropout for a batch and return the loss.

    A dropped caption's embedding is `null_text` (crossattn_proj(0) for projected Predict2.5 caches), else zeros.
    """
    latents, prompt_embeds = batch["latents"], batch["prompt_embeds"]
    size, device = latents.shape[0], latents.device
    t = sample_timesteps(size, clip_timestep_shift(args.timestep_shift, latents), device, args.high_sigma_ratio)
    noise = torch.randn_like(latents)
    choices = torch.tensor(args.conditioning_frames, device=device)
    num_cond = choices[torch.randint(len(choices), (size,), device=device)]
    keep_text = (torch.rand(size, device=device) >= args.text_dropout).float().view(-1, 1, 1)
    prompt_embeds = prompt_embeds * keep_text
    if null_text is not None:
        prompt_embeds = prompt_embeds + null_text.to(prompt_embeds.device) * (1 - keep_text)
    return flow_matching_loss(transformer, latents, prompt_embeds, t, noise, num_cond, args.conditioning_timestep)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step: data wait, seeds, the per-step reduction and checks, schedule, EMA, logs
# ----------------------------------------------------------------------------------------------------------------
def lr_lambda(args, total_steps):
    def factor(step):
        if step < args.lr_warmup_steps:
            return (step + 1) / args.lr_warmup_steps
        if args.lr_scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - args.lr_warmup_steps) / max(1, total_steps - args.lr_warmup_steps))
        floor = args.min_lr / args.learning_rate
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if args.lr_scheduler == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return factor


@dataclass
class StepClock:
    """Wall time of the current optimizer step and the part of it spent waiting for batches."""

    start: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0

    def restart(self):
        self.start, self.data_wait = time.perf_counter(), 0.0


def timed(loader, clock):
    """Iterate a dataloader, adding the seconds spent waiting for each batch to clock.data_wait."""
    iterator = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            with stage("reading a batch of cached clips"):
                batch = next(iterator)
        except StopIteration:
            return
        clock.data_wait += time.perf_counter() - start
        yield batch


def step_seed(seed, step, micro_step, process_index):
    """Per-micro-step seed: noise and dropout depend only on position, which makes resume exact."""
    return (seed * 1_000_003 + step * 1009 + micro_step * 31 + process_index) % (2**63)


@dataclass
class MicroStepStats:
    """A micro-step summed over processes: mean loss, latent tokens, clips that failed to load, a stop request."""

    loss: float
    tokens: int
    bad_clips: int
    stop_requested: bool


def reduce_micro_step(accelerator, loss, batch, stop):
    """One small collective per micro-step. Tokens are counted from each rank's own batch, whose shape varies."""
    latents = batch["latents"]
    tokens = latents.shape[0] * math.prod(latents.shape[2:]) // 4  # 2x2 spatial patches
    local = [
        loss.detach().float(),
        *(torch.tensor(float(v), device=loss.device) for v in (tokens, len(batch["bad_clips"]), bool(stop.received))),
    ]
    total = accelerator.reduce(torch.stack(local).double(), reduction="sum").tolist()
    return MicroStepStats(total[0] / accelerator.num_processes, int(total[1]), int(total[2]), total[3] > 0)


def check_bad_clips(batch, stats, state, args):
    """Name each clip that failed to load (it was replaced by another of its bucket); stop past --max_bad_clips."""
    for name in batch["bad_clips"]:
        logger.warning(f"skipped a clip that failed to load: {name}", main_process_only=False)
    state.bad_clips += batch["bad_clips"]
    state.num_bad_clips += stats.bad_clips
    if state.num_bad_clips > args.max_bad_clips:
        raise RunStopped(
            f"{state.num_bad_clips} clips failed to load, more than --max_bad_clips {args.max_bad_clips}; stopping "
            f"at step {state.global_step + 1}. This process's: {'; '.join(state.bad_clips)}"
        )


def check_finite(loss, state):
    if not math.isfinite(loss):
        raise RunStopped(
            f"loss is {loss} at step {state.global_step + 1}; stopping before the update "
            f"(last checkpoint: {state.last_checkpoint or 'none'})"
        )


def step_logs(loss, lr_scheduler, grad_norm, clock, samples, tokens):
    """Metrics of one optimizer step (samples and latent tokens summed over processes); restarts the step clock."""
    elapsed = time.perf_counter() - clock.start
    logs = {
        "loss": loss,
        "lr": lr_scheduler.get_last_lr()[0],
        "step_time_s": elapsed,
        "samples_per_s": samples / elapsed,
        "latent_tokens_per_s": tokens / elapsed,
        "data_wait_fraction": clock.data_wait / elapsed,
    }
    if grad_norm is not None:
        logs["grad_norm"] = float(grad_norm)
    if torch.cuda.is_available():
        logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        logs["allocator_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    clock.restart()
    return logs


def memory_full_warning(logs, step):
    """One line when the CUDA allocator has had to free its cache and retry an allocation (`allocator_retries` in
    the step's logs, counted since the run started): memory is nearly full, and each step that does so runs far
    slower than one with room, without running out. None otherwise."""
    retries = logs.get("allocator_retries", 0)
    if not retries:
        return None
    return (
        f"GPU memory is full at step {step}: the CUDA allocator freed its cache and retried an allocation {retries} "
        "times so far, which slows every step that does so; lower --train_batch_size or use --gradient_checkpointing"
    )


POWER_EMA_SIGMA_REL = 0.1  # NVIDIA's PowerEMAConfig rate, enabled in its LoRA examples


def power_ema_exponent(sigma_rel):
    """gamma of the power EMA (Karras et al. 2024) of relative width sigma_rel: NVIDIA's `ema_exp_coefficient`."""
    import numpy as np

    return float(np.roots([1, 7, 16 - sigma_rel**-2, 12 - sigma_rel**-2]).real.max())


class EMA:
    """Exponential moving average of the trainable weights, updated after every optimizer step n = 1, 2, ...:
        ema = d * ema + (1 - d) * weights
    with d constant (--ema_decay D), or NVIDIA's power EMA d = (1 - 1/n)^(gamma + 1), gamma = 6.94 for sigma_rel 0.1
    (cosmos-predict2 `ema_beta`): a plain average at first that narrows to about the last tenth of the run.
    The averages are clones of the (under FSDP2, sharded) parameters, so they are sharded alike.
    """

    def __init__(self, params, decay):
        self.params, self.decay = params, decay
        self.exponent = power_ema_exponent(POWER_EMA_SIGMA_REL) + 1 if decay == "power" else None
        self.average = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self, step):
        decay = (1 - 1 / step) ** self.exponent if self.decay == "power" else self.decay
        for average, param in zip(self.average, self.params, strict=True):
            average.lerp_(param.detach(), 1 - decay)

    @torch.no_grad()
    def copy_from_model(self):
        for average, param in zip(self.average, self.params, strict=True):
            average.copy_(param.detach())

    @torch.no_grad()
    def state_dict(self, model):
        """The averages under the model's clean parameter names. A collective under FSDP: call it on every rank."""
        raw = [param.detach().clone() for param in self.params]
        for average, param in zip(self.average, self.params, strict=True):
            param.copy_(average)
        try:  # on one CPU process the state dict holds the parameters themselves: copy it before they return
            return {name: tensor.clone() for name, tensor in trainable_state_dict(model).items()}
        finally:
            for value, param in zip(raw, self.params, strict=True):
                param.copy_(value)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
def run_validation(transformer, validation_set, decoder, args, step, accelerator):
    """Held-out losses at fixed noise levels, then (with --validation_videos) generated held-out clips."""
    transformer.eval()
    losses, per_bucket = validation_losses(
        transformer, validation_set, accelerator.device, args.seed, args.conditioning_timestep
    )
    logs = {f"val/loss_t{t}": v for t, v in losses.items()} | {"val/loss": sum(losses.values()) / len(losses)}
    logs |= {f"val/loss_{bucket}": v for bucket, v in per_bucket.items()}
    accelerator.log(logs, step=step)
    if decoder:
        scores = validation_videos(transformer, decoder, validation_set, args, step, accelerator)
        if args.validation_metrics and accelerator.is_main_process:
            log_validation_metrics(accelerator, scores, args, step)
    transformer.train()


@torch.no_grad()
def validation_losses(transformer, dataset, device, seed, t_cond):
    """Held-out loss at fixed noise levels and fixed noise (one conditioning frame, no text dropout): the mean per
    noise level over all held-out clips, and the mean over noise levels per bucket."""
    per_clip = []
    for index in range(len(dataset)):
        item = dataset[index]
        latents, embeds = item["latents"][None].to(device), item["prompt_embeds"][None].to(device)
        generator = torch.Generator().manual_seed(seed + index)
        noise = torch.randn(latents.shape, generator=generator).to(device)
        one = torch.ones(1, device=device, dtype=torch.long)
        per_clip.append(
            [
                flow_matching_loss(
                    transformer, latents, embeds, torch.full((1,), t, device=device), noise, one, t_cond
                ).item()
                for t in VALIDATION_TIMESTEPS
            ]
        )
    by_t = {t: sum(row[i] for row in per_clip) / len(per_clip) for i, t in enumerate(VALIDATION_TIMESTEPS)}
    by_bucket = {}
    for clip, row in zip(dataset.clips, per_clip, strict=True):
        by_bucket.setdefault(bucket_name(clip.shape), []).append(sum(row) / len(row))
    return by_t, {bucket: sum(v) / len(v) for bucket, v in by_bucket.items()}


@dataclass
class ValidationDecoder:
    """What validation videos need beside the transformer: the VAE to decode, the sampler's scheduler and loop."""

    vae: torch.nn.Module
    scheduler: object
    denoise: Callable


@torch.no_grad()
def validation_videos(transformer, decoder, dataset, args, step, accelerator):
    """Generate held-out clips from their first latent frame; the main process writes truth | generated mp4s.
    The held-out clips come round-robin over buckets (hold_out_clips), so the first N cover as many as they can."""
    paths, sheets, labels, scores = [], [], [], {metric: [] for metric in args.validation_metrics}
    directory = os.path.join(args.output_dir, "validation", f"step-{step}")
    for index in range(min(args.validation_videos, len(dataset))):
        item = dataset[index]
        truth = item["latents"][None].to(accelerator.device)
        noise = torch.randn(truth.shape, generator=torch.Generator().manual_seed(args.seed + index))
        latents = decoder.denoise(
            transformer,
            decoder.scheduler,
            noise.to(truth.device),
            truth,
            1,
            item["prompt_embeds"][None].to(truth.device),
            guidance_scale=1.0,
            num_inference_steps=args.validation_inference_steps,
        )
        truth_frames, generated = decode_to_frames(decoder.vae, truth)[0], decode_to_frames(decoder.vae, latents)[0]
        for metric in args.validation_metrics:  # the frames after the one conditioning frame
            scores[metric].append(VALIDATION_METRICS[metric](generated[1:], truth_frames[1:]))
        frames = torch.cat([truth_frames, generated], dim=2).numpy()
        if accelerator.is_main_process:
            os.makedirs(directory, exist_ok=True)
            bucket = bucket_name(dataset.clips[index].shape)
            paths.append(os.path.join(directory, f"{index:02d}_{bucket}_truth_vs_generated.mp4"))
            write_mp4(paths[-1], frames, fps=8)
            sheets.append(frames)
            caption = read_clip(dataset.clips[index].path)[1].get("caption", "")
            labels.append(f"{bucket} truth | generated: {caption}")
    if accelerator.is_main_process and sheets:
        log_validation_videos(accelerator, paths, contact_sheet(sheets, labels), step)
    return scores


BASE_VALIDATION_SCORES = "base_metrics.json"


def base_validation_scores(transformer, validation_set, decoder, args, accelerator):
    """Before the first step the fine-tune adds exactly nothing (LoRA B, adapters' up-projections at zero, proj_out
    as loaded): its validation videos are the base model's. Their per-video scores go to
    OUTPUT/validation/base_metrics.json, which every later validation (resumed runs too) compares against."""
    transformer.eval()
    scores = validation_videos(transformer, decoder, validation_set, args, 0, accelerator)
    transformer.train()
    if accelerator.is_main_process:
        atomic_write_text(
            os.path.join(args.output_dir, "validation", BASE_VALIDATION_SCORES), json.dumps(scores, indent=2)
        )


def log_validation_metrics(accelerator, scores, args, step):
    """val/METRIC, val/METRIC_base and val/METRIC_vs_base (the mean paired difference over the same clips and
    noise) to the trackers and OUTPUT/validation/metrics.jsonl."""
    path = os.path.join(args.output_dir, "validation", BASE_VALIDATION_SCORES)
    base = read_json(path) if os.path.isfile(path) else {}
    logs = {}
    for metric, values in scores.items():
        logs[f"val/{metric}"] = sum(values) / len(values)
        if len(base.get(metric, [])) == len(values):
            logs[f"val/{metric}_base"] = sum(base[metric]) / len(values)
            logs[f"val/{metric}_vs_base"] = sum(v - b for v, b in zip(values, base[metric], strict=True)) / len(values)
    accelerator.log(logs, step=step)
    with open(os.path.join(args.output_dir, "validation", "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def log_validation_videos(accelerator, paths, sheet, step):
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"val/truth_vs_generated": sheet[None]}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"val/truth_vs_generated": [wandb.Video(path, format="mp4") for path in paths]}, step=step)


def load_validation_decoder(args, dtype, device, family):
    path, revision = args.pretrained_model_name_or_path, args.revision
    vae = load_component(path, "vae", revision, dtype, family=family)
    scheduler = load_component(path, "scheduler", revision, family=family)
    return ValidationDecoder(vae.to(device).eval(), scheduler, family.denoise)


if __name__ == "__main__":
    run_main(main, parse_args)
