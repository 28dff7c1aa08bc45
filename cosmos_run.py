"""The files of a training run in its output folder, written by train_cosmos_lora.py and read by sample.py:

    OUTPUT/training_args.json        every setting of the run
    OUTPUT/held_out.json             the clips and videos the run held out (never trained on)
    OUTPUT/checkpoint-STEP/          weights (and their EMA in ema/), optimizer and scheduler states, the data position
    OUTPUT/losses.jsonl              one row per optimizer step
    OUTPUT/pytorch_lora_weights.safetensors, temporal_adapters.safetensors, adapter_config.json, ema/
                                     the final export

Folders and files are written whole or not at all (cosmos_process.folder_written_whole), and a checkpoint is checked
before a resume loads anything: its files are complete, its settings are the run's, and its states hold only tensors
and plain values.
"""

import json
import os
import pickle
import random
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
from accelerate.logging import get_logger

from cosmos_adapters import (
    EMA_DIR,
    check_files,
    file_sizes,
    read_adapter_config,
    read_exported_weights,
    save_finetuned_weights,
)
from cosmos_cache import atomic_write_text
from cosmos_card import write_model_card
from cosmos_process import folder_written_whole

logger = get_logger(__name__)


def hold_out_clips(clips, num_clips, seed):
    """Split whole videos off until num_clips clips are held out, so no held-out video ever trains.

    Videos are taken in a seeded order, first those that bring a clip shape (bucket) not held out yet, so the
    held-out clips cover as many buckets as they can; they are returned round-robin over buckets.
    """
    if num_clips <= 0:
        return clips, []
    keys = sorted({c.key for c in clips})
    random.Random(seed).shuffle(keys)
    clips_per_key = Counter(c.key for c in clips)
    shapes_per_key = defaultdict(set)
    for c in clips:
        shapes_per_key[c.key].add(c.shape)
    held_keys, held, covered = [], 0, set()
    for new_shapes_only in (True, False):
        for key in keys:
            if held >= num_clips:
                break
            if key in held_keys or (new_shapes_only and shapes_per_key[key] <= covered):
                continue
            held_keys.append(key)
            held += clips_per_key[key]
            covered |= shapes_per_key[key]
    train = [c for c in clips if c.key not in held_keys]
    if not train:
        raise ValueError(f"--num_validation_clips {num_clips} leaves no clip to train on")
    by_shape = defaultdict(list)
    for c in clips:
        if c.key in held_keys:
            by_shape[c.shape].append(c)
    queues = list(by_shape.values())
    round_robin = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
    return train, round_robin[:num_clips]


HELD_OUT = "held_out.json"


def write_held_out(directory, cache_dir, clips, train, held, trained_caches):
    """Record in DIRECTORY/held_out.json which clips of `cache_dir` (the first cache, whose clips are `clips`) a run
    held out: the validation clips (files relative to the cache) and every held-out video key, including videos held
    out whose clips are not among the validation clips (none of their clips trained); and every cache the run
    trained on (all clips of the others trained)."""
    trained_keys = {c.key for c in train}
    record = {
        "cache_dir": os.path.realpath(cache_dir),
        "trained_caches": [os.path.realpath(path) for path in trained_caches],
        "keys": sorted({c.key for c in clips} - trained_keys),
        "clips": [os.path.relpath(c.path, cache_dir) for c in held],
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
    by_file = {os.path.relpath(c.path, cache_dir): c for c in clips}
    missing = [f for f in record["clips"] if f not in by_file]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(record['clips'])} held-out clips recorded for {record['cache_dir']} are not "
            f"in {cache_dir} (first: {missing[0]}); give the cache the run was trained on"
        )
    held_keys = set(record["keys"])
    return [c for c in clips if c.key not in held_keys], [by_file[f] for f in record["clips"]]


TRAINING_ARGS = "training_args.json"


TRAINING_STATE = "training_state.json"


OPTIMIZER_STATE = "optimizer.pt"


SCHEDULER_STATE = "scheduler.pt"


# Settings a resumed run may change without --allow_changed_settings: where it writes, how fast it runs, what it logs.
SETTINGS_FREE_ON_RESUME = {
    "output_dir",
    "resume_from_checkpoint",
    "allow_changed_settings",
    "config",
    "dataloader_num_workers",
    "report_to",
    "tracker_project_name",
    "validation_steps",
    "validation_videos",
    "validation_inference_steps",
    "validation_metrics",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "compile",
    "attention_backend",
    "gradient_checkpointing",
    "fp8",
    "push_to_hub",
    "hub_model_id",
}


@dataclass
class TrainState:
    """Where the run stands: optimizer steps done, batches drawn (the data position) and the last checkpoint."""

    global_step: int = 0
    batches_consumed: int = 0
    last_checkpoint: str | None = None
    num_bad_clips: int = 0  # over all processes, since this run started
    bad_clips: list = field(default_factory=list)  # this process's


def trainable_state_dict(model):
    """Full fp32 trainable weights with clean names on CPU. A collective under FSDP: call it on every rank."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(model, options=options)


def load_trainable_state_dict(model, directory):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(
        model, read_exported_weights(directory), options=StateDictOptions(full_state_dict=True, strict=False)
    )


def optimizer_state_dict(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@dataclass
class Trainables:
    """What a checkpoint saves beside the TrainState: the model's trainable weights and their EMA, the optimizer, the
    learning-rate schedule, and the adapter config the weights are written with."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of it
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: object | None  # train_cosmos_lora.EMA
    adapter_config: dict


def gather_weights(parts):
    """(weights, EMA weights or None), full, fp32 and on the CPU. A collective under FSDP: call it on every rank."""
    weights = trainable_state_dict(parts.model)
    return weights, parts.ema.state_dict(parts.model) if parts.ema else None


def write_weights(folder, weights, ema_weights, adapter_config):
    """The fine-tuned weights as sample.py loads them, and their EMA in ema/ in the same format."""
    save_finetuned_weights(weights, folder, adapter_config)
    if ema_weights is not None:
        save_finetuned_weights(ema_weights, os.path.join(folder, EMA_DIR), adapter_config)


def save_checkpoint(accelerator, parts, state, args):
    """Write OUTPUT/checkpoint-STEP whole: trainable weights (and their EMA in ema/), optimizer, scheduler, data
    position, the run's settings and its held-out clips. training_state.json lists the state files with their sizes."""
    weights, ema_weights = gather_weights(parts)
    optim_state = optimizer_state_dict(parts.model, parts.optimizer.optimizer)
    final = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
    if accelerator.is_main_process:
        with folder_written_whole(final) as tmp:
            write_weights(tmp, weights, ema_weights, parts.adapter_config)
            torch.save(optim_state, os.path.join(tmp, OPTIMIZER_STATE))
            torch.save(parts.lr_scheduler.state_dict(), os.path.join(tmp, SCHEDULER_STATE))
            for name in (TRAINING_ARGS, HELD_OUT):
                shutil.copy(os.path.join(args.output_dir, name), tmp)
            position = {
                "global_step": state.global_step,
                "batches_consumed": state.batches_consumed,
                "files": file_sizes(tmp, [OPTIMIZER_STATE, SCHEDULER_STATE]),
            }
            with open(os.path.join(tmp, TRAINING_STATE), "w") as f:
                json.dump(position, f)
        prune_checkpoints(args.output_dir, args.checkpoints_total_limit)
        logger.info(f"saved {final}")
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(output_dir):
    """Complete checkpoint dirs, oldest first (a `.tmp` dir is an interrupted save and never counts)."""
    if not os.path.isdir(output_dir):
        return []
    steps = [int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"checkpoint-(\d+)", d))]
    return [os.path.join(output_dir, f"checkpoint-{s}") for s in sorted(steps)]


def prune_checkpoints(output_dir, limit):
    if limit:
        for path in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(path)


def resolve_resume_path(args):
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(args.output_dir)
        return checkpoints[-1] if checkpoints else None
    if not os.path.isdir(args.resume_from_checkpoint):
        raise FileNotFoundError(f"--resume_from_checkpoint {args.resume_from_checkpoint} is not a checkpoint dir")
    return args.resume_from_checkpoint


def read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(f"{path} is unreadable: {error}") from None


def check_checkpoint(path, args, defaults):
    """Before any model loads: every file of the checkpoint is there and whole, and its settings are these.
    `defaults` are the flags' defaults (vars of the parsed empty command line)."""
    state = read_json(os.path.join(path, TRAINING_STATE))
    check_files(path, state.get("files", {}))
    for name in (OPTIMIZER_STATE, SCHEDULER_STATE):
        if not os.path.isfile(os.path.join(path, name)):
            raise FileNotFoundError(f"{os.path.join(path, name)} is missing; the checkpoint is incomplete")
        load_state_file(os.path.join(path, name), mmap=True)  # refused here, before any model loads
    read_adapter_config(path)
    if os.path.isdir(os.path.join(path, EMA_DIR)):
        read_adapter_config(os.path.join(path, EMA_DIR))
    changed = changed_settings(path, args, defaults)
    if changed and not args.allow_changed_settings:
        raise ValueError(
            f"{path} was trained with other settings ({'; '.join(changed)}): resume with the same flags, or pass "
            "--allow_changed_settings to continue with the new ones"
        )
    if changed:
        print(f"resuming {path} with changed settings: {'; '.join(changed)}")


def changed_settings(path, args, defaults):
    """`name: old -> new` for every setting that shapes the run and differs from the checkpoint's. A setting the
    checkpoint predates (a flag added since) is a change only when it is set to other than its default."""
    args_path = os.path.join(path, TRAINING_ARGS)
    if not os.path.isfile(args_path):
        return [f"{TRAINING_ARGS}: not in the checkpoint, so its settings cannot be compared"]
    saved, current = read_json(args_path), json.loads(json.dumps(vars(args)))
    names = sorted((saved.keys() | current.keys()) - SETTINGS_FREE_ON_RESUME)
    missing = "(unset)"
    predated = {name for name in names if name not in saved and current.get(name) == defaults.get(name)}
    return [
        f"{name}: {saved.get(name, missing)} -> {current.get(name, missing)}"
        for name in names
        if saved.get(name, missing) != current.get(name, missing) and name not in predated
    ]


def load_state_file(path, mmap=False):
    """An optimizer or scheduler state written by torch.save, read with weights_only=True: tensors, numbers, strings
    and containers only, so a crafted file in a checkpoint folder is refused and never runs code."""
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{path} holds more than tensors and plain values, so it is not loaded "
            f"({str(error).splitlines()[0]}); resume only from checkpoints this script wrote"
        ) from None


def load_checkpoint(path, parts):
    """Load a checked checkpoint into the trainables; return the TrainState it was saved at."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if parts.ema:  # the EMA goes through the model's own parameters, which the raw weights then overwrite
        if os.path.isdir(os.path.join(path, EMA_DIR)):
            load_trainable_state_dict(parts.model, os.path.join(path, EMA_DIR))
        parts.ema.copy_from_model()
    load_trainable_state_dict(parts.model, path)
    optim_state = load_state_file(os.path.join(path, OPTIMIZER_STATE))
    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(parts.model, parts.optimizer.optimizer, optim_state, options=options)
    parts.lr_scheduler.load_state_dict(load_state_file(os.path.join(path, SCHEDULER_STATE)))
    position = read_json(os.path.join(path, TRAINING_STATE))
    return TrainState(position["global_step"], position["batches_consumed"], last_checkpoint=path)


def truncate_loss_log(path, step):
    """Drop loss rows after `step` (written by a run that died after its last checkpoint)."""
    if os.path.isfile(path):
        with open(path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(path, "w") as f:
            f.writelines(rows)


def append_loss_log(path, step, logs):
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, **logs}) + "\n")


def write_run_record(args, caches, first_cache_clips, train_clips, validation_clips):
    """training_args.json and held_out.json in OUTPUT (copied into every checkpoint), once every check has passed."""
    os.makedirs(args.output_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.output_dir, TRAINING_ARGS), json.dumps(vars(args), indent=2))
    paths = [c.path for c in caches]
    write_held_out(args.output_dir, caches[0].path, first_cache_clips, train_clips, validation_clips, paths)


def export_final_weights(accelerator, parts, args):
    """Write the final weights (and their EMA in ema/) and their model card (README.md) next to the checkpoints. The
    export is written whole in a folder of its own first, then each of its files or folders replaces the one of a
    previous export."""
    weights, ema_weights = gather_weights(parts)
    if not accelerator.is_main_process:
        return
    staging = os.path.join(args.output_dir, ".export")
    with folder_written_whole(staging) as tmp:
        write_weights(tmp, weights, ema_weights, parts.adapter_config)
        write_model_card(tmp, args)
    for name in os.listdir(staging):
        target = os.path.join(args.output_dir, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging, name), target)
    os.rmdir(staging)
    print(f"saved {', '.join(sorted(os.listdir(args.output_dir)))} in {args.output_dir}")


# What --push_to_hub leaves out of the upload: the training state, the trackers' logs and unfinished writes.
HUB_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "logs/**", "wandb/**", ".export*", "*.tmp", "*.tmp/**"]


def push_to_hub(args):
    """Upload the final export (weights, ema/, README.md, training_args.json, held_out.json, losses.jsonl,
    validation videos) to the Hub as the diffusers examples do: create the model repo (--hub_model_id, default the
    output folder's name), point the model card's loading code at it, then upload the folder. Returns the repo id."""
    import huggingface_hub

    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    repo_id = huggingface_hub.create_repo(repo_id=repo_id, exist_ok=True).repo_id
    write_model_card(args.output_dir, args, repo_id=repo_id)
    huggingface_hub.upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="End of training",
        ignore_patterns=HUB_IGNORE_PATTERNS,
    )
    return repo_id
