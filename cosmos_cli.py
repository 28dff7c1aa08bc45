"""Command-line pieces the scripts share: the help formatter, value types that fail at parse time, the flags several
scripts take (defined once here), a YAML config read through the same parser as the command line and the model-path
check that runs before any model loads.
"""

import argparse
import os
import sys

import yaml

DEFAULT_MODEL = "nvidia/Cosmos-Predict2-2B-Video2World"
# The caption of videos without one (Egocentric-100K has no captions) and the prompt of sample.py's video inputs.
DEFAULT_PROMPT = "An egocentric video from a head-mounted camera of a worker's hands doing manual work in a factory."
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi")
# Column names guessed, in this order, when --video_column / --caption_column / --key_column are not given.
VIDEO_COLUMNS = ("video", "videos", "mp4", "mkv", "webm", "mov", "avi", "video_bytes", "video_path", "path", "file")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt", "description")
KEY_COLUMNS = ("__key__", "key", "id", "video_id", "uid")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default to its help (not to `--no_X` aliases,
    nor to required flags, which have none)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction) or action.required:
            return action.help
        return super()._get_help_string(action)


# ----------------------------------------------------------------------------------------------------------------
# Value types: argparse reports a bad value as `error: argument --flag: ...` before anything else runs.
# ----------------------------------------------------------------------------------------------------------------
def _number(kind, low, low_inclusive=True, high=None):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}") from None
        if (value < low if low_inclusive else value <= low) or (high is not None and value > high):
            bound = f"at least {low}" if low_inclusive else f"above {low}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}{f' and at most {high}' if high is not None else ''}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, low_inclusive=False)
non_negative_float = _number(float, 0.0)
fraction = _number(float, 0.0, high=1.0)


def int_list(text):
    """`0,1,2` -> [0, 1, 2] (non-negative integers)."""
    try:
        values = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return values


# ----------------------------------------------------------------------------------------------------------------
# Flags several scripts take, defined once
# ----------------------------------------------------------------------------------------------------------------
def add_config_argument(parser):
    """`--config FILE`, read by parse_with_config."""
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file of defaults (keys are these flags without dashes); command-line flags win.",
    )


def add_model_arguments(parser):
    """The checkpoint every script loads from: pass the same one (and revision) to all of them."""
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=DEFAULT_MODEL,
        help="Hub id or local diffusers directory of the base model: Cosmos-Predict2 Video2World or "
        "Cosmos-Predict2.5 (the family is read from its model_index.json).",
    )
    parser.add_argument(
        "--revision",
        default=None,
        help="Hub revision (branch, tag or commit) of the model, e.g. diffusers/base/post-trained for "
        "nvidia/Cosmos-Predict2.5-2B.",
    )


def add_source_arguments(parser):
    """Where videos come from: a folder, local WebDataset tars, or a `datasets` dataset (exactly one)."""
    source = parser.add_argument_group("source (exactly one, except with --verify alone)")
    source.add_argument(
        "--video_dir",
        help=f"Local folder searched recursively for {'/'.join(VIDEO_EXTENSIONS)} files.",
    )
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
    source.add_argument(
        "--video_column",
        default=None,
        help="With --tars/--dataset: column (or tar member extension) holding the video as bytes, a path or a "
        '{"bytes", "path"} dict. Default: the first of ' + ", ".join(VIDEO_COLUMNS) + " that the first example has.",
    )
    source.add_argument(
        "--caption_column",
        default=None,
        help="With --tars/--dataset: column (or tar member, e.g. txt) holding the caption. Default: the first of "
        + ", ".join(CAPTION_COLUMNS)
        + ", else --caption_field of a json member, else --prompt.",
    )
    source.add_argument(
        "--key_column",
        default=None,
        help="With --tars/--dataset: column holding a unique, stable id per video (it names the clip files). "
        "Default: the first of " + ", ".join(KEY_COLUMNS) + ", else the video's path without extension, else a "
        "hash of the video's bytes.",
    )
    return source


def add_clip_plan_arguments(parser, description=None):
    """Clip shape, frame rate and fitting, as cache_latents.py cuts clips and sample.py fits its inputs. Returns the
    argument group, to which a script adds its own clip flags."""
    clips = parser.add_argument_group("clips", description)
    clips.add_argument(
        "--num_frames", type=int, default=61, help="Frames per clip; must be 4k+1 (61 -> 16 latent frames)."
    )
    clips.add_argument("--fps", type=positive_float, default=8.0, help="Frame rate the clips are resampled to.")
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
        "--buckets",
        nargs="+",
        default=None,
        help="Clip shapes FRAMESxHEIGHTxWIDTH, e.g. 61x256x448 61x448x256 93x256x448. Each video goes to the "
        "buckets of the nearest aspect ratio; each clip takes the longest of their frame counts that the rest of "
        "the video holds. Default: one clip shape, --num_frames x --height x --width.",
    )
    return clips


def add_rollout_argument(group):
    """`--rollout_chunks N`: long rollouts of chained clips (sample.py's generate_rollouts)."""
    group.add_argument(
        "--rollout_chunks",
        type=positive_int,
        default=1,
        metavar="N",
        help="Generate N chained clips per input: each clip after the first is conditioned on the last "
        "--num_conditioning_frames frames the one before generated (decoded, then encoded again), and those frames "
        "appear once in the output, so N clips of F frames make a video of F + (N-1)(F - 1 or 5) frames. Predict2 "
        "video inputs are scored against the source frames that follow, as far as the video holds them (Predict2.5 "
        "conditions on a video's last frames: no truth). Cached clips are fixed-length, so --from_cache and "
        ".safetensors inputs take only 1.",
    )


def add_video_clip_arguments(clips):
    """How clips are taken from each video (cache_latents.py and caption_clips.py: one plan for both), added to the
    group add_clip_plan_arguments returns."""
    clips.add_argument(
        "--clip_stride_seconds",
        type=float,
        default=None,
        help="Seconds between clip starts within a video. Default: the clip length (back to back).",
    )
    clips.add_argument(
        "--max_clips_per_video", type=positive_int, default=None, help="Cap on clips taken from one video."
    )


def add_shard_arguments(group, verb):
    """--num_shards / --shard_index: which disjoint part of the videos this run `verb`s (SLURM array defaults)."""
    group.add_argument(
        "--num_shards",
        type=positive_int,
        default=None,
        help="Split the videos into this many disjoint shards. Default: SLURM_ARRAY_TASK_COUNT or 1.",
    )
    group.add_argument(
        "--shard_index",
        type=int,
        default=None,
        help=f"Which shard this run {verb} (0-based). Default: SLURM_ARRAY_TASK_ID minus SLURM_ARRAY_TASK_MIN, or 0.",
    )


# ----------------------------------------------------------------------------------------------------------------
# YAML configs
# ----------------------------------------------------------------------------------------------------------------
BOOLEAN_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def _yaml_boolean(path, key, value):
    if isinstance(value, bool):
        return value
    if str(value).lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[str(value).lower()]
    raise ValueError(f"{path}: {key}: {value!r} is not a boolean (true/false, yes/no)")


def yaml_to_argv(path, parser):
    """A YAML file of `flag_without_dashes: value` as command-line tokens, so that argparse checks types, choices,
    lists and booleans exactly as for the command line. Lists become several tokens (or `1,2` for a flag that takes
    one comma-separated value); booleans become `--flag` / `--no-flag`; null keeps the default."""
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if f"--{a.dest}" in a.option_strings}  # not the --no_X aliases
    unknown = sorted(set(values) - set(actions) | ({"config"} & set(values)))
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    argv = []
    for key, value in values.items():
        action, flag = actions[key], f"--{key}"
        if value is None:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            argv.append(flag if _yaml_boolean(path, key, value) else f"--no-{key}")
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [flag] if _yaml_boolean(path, key, value) else []
        elif isinstance(value, list):
            tokens = [str(v) for v in value]
            argv += [flag, *tokens] if action.nargs in ("+", "*") else [f"{flag}={','.join(tokens)}"]
        elif isinstance(value, dict):
            raise ValueError(f"{path}: {key}: a mapping is not a flag value")
        else:
            argv.append(f"{flag}={value}")  # `=`: a value such as -1 is not taken for a flag
    return argv


def parse_with_config(parser, argv):
    """Parse argv; with `--config FILE`, the file's values come first, so the command line wins."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    first = argparse.ArgumentParser(add_help=False)  # --config alone: a required flag may come from the file
    first.add_argument("--config", default=None)
    known, _ = first.parse_known_args(argv)
    if not known.config:
        return parser.parse_args(argv)
    return parser.parse_args(yaml_to_argv(known.config, parser) + argv)


# ----------------------------------------------------------------------------------------------------------------
# Model paths
# ----------------------------------------------------------------------------------------------------------------
def hub_offline():
    """HF_HUB_OFFLINE as huggingface_hub reads it (at import) or as the environment has it now."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _looks_like_hub_id(path):
    return not path.startswith(("/", ".", "~")) and path.count("/") == 1 and not path.endswith("/")


def check_pretrained_model(path, subfolders, flag="--pretrained_model_name_or_path"):
    """Fail in one line, before any model loads, when the model cannot be opened: a local directory that is missing
    or not a diffusers checkpoint, or a hub id that is not in the local cache while the hub is offline."""
    download = f"download it on a login node with `hf download {DEFAULT_MODEL} --local-dir DIR` and pass DIR"
    if os.path.isdir(path):
        missing = [sub for sub in subfolders if not os.path.isdir(os.path.join(path, sub))]
        if missing:
            raise FileNotFoundError(
                f"{flag} {path} is a local directory without {', '.join(s + '/' for s in missing)}: not a diffusers "
                f"Cosmos checkpoint; {download}"
            )
        return
    if not _looks_like_hub_id(path):
        raise FileNotFoundError(f"{flag} {path} does not exist (a local path); {download}")
    from huggingface_hub import constants, try_to_load_from_cache

    if hub_offline() and not isinstance(try_to_load_from_cache(path, "model_index.json"), str):
        raise FileNotFoundError(
            f"{flag} {path} is a hub id, HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): run `hf download {path}` on a login node with the same HF_HOME, or "
            f"`hf download {path} --local-dir DIR` and pass DIR"
        )


def model_dtype(choice, device):
    """The torch dtype of a `--dtype`/`--vae_dtype` choice: auto is bfloat16 on GPU and float32 on CPU."""
    import torch

    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[choice]
