"""Command-line pieces the three scripts share: the help formatter, value types that fail at parse time, a YAML
config read through the same parser as the command line, and the model-path check that runs before any model loads.
"""

import argparse
import os
import sys

import yaml

DEFAULT_MODEL = "nvidia/Cosmos-Predict2-2B-Video2World"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the module docstring's layout and appends each flag's default to its help (not to `--no_X` aliases)."""

    def _get_help_string(self, action):
        if isinstance(action, argparse._StoreFalseAction):
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
    """`1,2` -> [1, 2] (positive integers)."""
    try:
        values = [int(part) for part in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return values


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
    known, _ = parser.parse_known_args(argv)
    if not getattr(known, "config", None):
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
