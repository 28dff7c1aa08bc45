#!/usr/bin/env python
"""Export a train_cosmos_lora.py run (or one of its checkpoints) for use outside this project.

--to comfyui   one .safetensors LoRA under NVIDIA's parameter names with the `diffusion_model.` prefix and an
               `.alpha` per layer, as ComfyUI's LoRA loader reads it (Cosmos-Predict2 only: ComfyUI runs the
               Predict2 DiT under NVIDIA's names; no Predict2.5 support was found). A trained proj_out goes in as
               `diffusion_model.final_layer.linear.diff` (trained - base weight, which ComfyUI's loader adds times
               the LoRA strength; needs the base model). The safetensors metadata names the base model, its
               revision, the rank and alpha. Temporal adapters are not LoRA layers: such a run is refused unless
               --drop_adapters leaves them out (with a warning).
--to merged    a full diffusers checkpoint folder: the base model with the LoRA (at --lora_scale) and proj_out
               folded into the transformer's own weights, and the other components copied. It loads with the
               family's pipeline alone (no peft, no project code). Temporal adapters are modules the stock
               transformer does not have, so they cannot be folded: refused unless --drop_adapters.

python tools/export_lora.py --lora_path outputs/ego-lora --to comfyui --output ego_lora_comfyui.safetensors
python tools/export_lora.py --lora_path outputs/ego-lora --to merged --output outputs/ego-merged
"""

import argparse
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cosmos_adapters import (  # noqa: E402
    ADAPTER_WEIGHTS,
    EMA_DIR,
    LORA_WEIGHTS,
    load_finetuned_weights,
    load_weight_file,
    read_adapter_config,
    remove_temporal_adapters,
)
from cosmos_card import CARD, write_merged_card  # noqa: E402
from cosmos_cli import HelpFormatter, non_negative_float  # noqa: E402
from cosmos_families import detect_family, load_component, recorded_family  # noqa: E402
from cosmos_process import file_written_whole, folder_written_whole, run_main  # noqa: E402

# diffusers' names of the transformer's linear layers -> NVIDIA's (as ComfyUI names the Predict2 DiT): the inverse of
# TRANSFORMER_KEYS_RENAME_DICT_COSMOS_2_0 in diffusers' scripts/convert_cosmos_to_diffusers.py, restricted to the
# linear layers. Block modules sit under `transformer_blocks.N.` (NVIDIA: `blocks.N.`).
BLOCK_LINEARS = {
    "attn1.to_q": "self_attn.q_proj",
    "attn1.to_k": "self_attn.k_proj",
    "attn1.to_v": "self_attn.v_proj",
    "attn1.to_out.0": "self_attn.output_proj",
    "attn2.to_q": "cross_attn.q_proj",
    "attn2.to_k": "cross_attn.k_proj",
    "attn2.to_v": "cross_attn.v_proj",
    "attn2.to_out.0": "cross_attn.output_proj",
    "ff.net.0.proj": "mlp.layer1",
    "ff.net.2": "mlp.layer2",
    "norm1.linear_1": "adaln_modulation_self_attn.1",
    "norm1.linear_2": "adaln_modulation_self_attn.2",
    "norm2.linear_1": "adaln_modulation_cross_attn.1",
    "norm2.linear_2": "adaln_modulation_cross_attn.2",
    "norm3.linear_1": "adaln_modulation_mlp.1",
    "norm3.linear_2": "adaln_modulation_mlp.2",
}
TOP_LINEARS = {
    "proj_out": "final_layer.linear",
    "norm_out.linear_1": "final_layer.adaln_modulation.1",
    "norm_out.linear_2": "final_layer.adaln_modulation.2",
    "patch_embed.proj": "x_embedder.proj.1",
}
COMFYUI_PREFIX = "diffusion_model."
COMFYUI_FAMILIES = ("predict2",)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--lora_path",
        required=True,
        help="A train_cosmos_lora.py output folder or one of its checkpoint-STEP folders.",
    )
    parser.add_argument("--use_ema", action="store_true", help="Export the EMA weights (LORA_PATH/ema/).")
    parser.add_argument("--to", required=True, choices=["comfyui", "merged"], help="What to write (see above).")
    parser.add_argument(
        "--output", required=True, help="comfyui: the .safetensors file to write; merged: the folder to write."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        default=None,
        help="The base model (hub id or local diffusers folder), for merged and for a comfyui export of a trained "
        "proj_out. Default: the one the run recorded.",
    )
    parser.add_argument(
        "--revision", default=None, help="Hub revision of the base model. Default: the one the run recorded."
    )
    parser.add_argument(
        "--lora_scale",
        type=non_negative_float,
        default=1.0,
        help="merged: strength of the whole fine-tune folded in (LoRA, proj_out), as sample.py --lora_scale.",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default="bfloat16",
        help="merged: dtype the merged transformer is written in (the merge itself runs in float32).",
    )
    parser.add_argument(
        "--drop_adapters",
        action="store_true",
        help="Leave out the temporal adapters, which neither target can hold, with a warning, instead of refusing "
        "the run.",
    )
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# Reading the run
# ----------------------------------------------------------------------------------------------------------------
def weights_folder(args):
    path = os.path.join(args.lora_path, EMA_DIR) if args.use_ema else args.lora_path
    if not os.path.isdir(path):
        what = f"has no {EMA_DIR}/ (train with --ema_decay)" if args.use_ema else "is not a directory"
        raise FileNotFoundError(f"--lora_path {args.lora_path} {what}")
    return path


def check_droppable(config, args):
    """Refuse a run with temporal adapters (modules neither target can hold) unless --drop_adapters: then warn that
    they are lost. Returns what is left out, in words."""
    if not config.get("use_temporal_adapters"):
        return []
    if not args.drop_adapters:
        where = "a ComfyUI LoRA" if args.to == "comfyui" else "the stock diffusers transformer"
        raise ValueError(
            f"{args.lora_path} trained temporal adapters, which {where} cannot hold; pass --drop_adapters to export "
            "without them (the export then differs from sample.py --lora_path)"
        )
    print(f"warning: --drop_adapters: the temporal adapters of {args.lora_path} are left out of the export")
    return ["temporal adapters"]


def base_model(args, config):
    """(model, revision): the flags', else the base model the run recorded."""
    given = args.pretrained_model_name_or_path or args.revision
    base = args.pretrained_model_name_or_path or config.get("base_model")
    if not base:
        raise ValueError(f"{args.lora_path} records no base model: pass --pretrained_model_name_or_path")
    return base, args.revision if given else config.get("base_revision")


# ----------------------------------------------------------------------------------------------------------------
# --to comfyui
# ----------------------------------------------------------------------------------------------------------------
def nvidia_module_name(module):
    """NVIDIA's name of a diffusers transformer module (`transformer_blocks.3.attn2.to_q` ->
    `blocks.3.cross_attn.q_proj`); ValueError for a module without one here."""
    parts = module.split(".")
    if parts[0] == "transformer_blocks" and ".".join(parts[2:]) in BLOCK_LINEARS:
        return f"blocks.{parts[1]}.{BLOCK_LINEARS['.'.join(parts[2:])]}"
    if module in TOP_LINEARS:
        return TOP_LINEARS[module]
    raise ValueError(f"the LoRA targets {module}, which has no NVIDIA name in this exporter's table")


def comfyui_state_dict(lora, alpha):
    """diffusers-format LoRA tensors (`transformer.X.lora_A.weight`) -> ComfyUI's
    (`diffusion_model.NVIDIA_X.lora_A.weight`, `...lora_B.weight`, `...alpha`). ComfyUI scales by alpha / rank as
    peft does, so the same alpha gives the same strength."""
    out = {}
    for key, tensor in lora.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        name = COMFYUI_PREFIX + nvidia_module_name(module)
        out[f"{name}.lora_{kind}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch_scalar(alpha)
    return out


def torch_scalar(value):
    import torch

    return torch.tensor(float(value))


def base_tensor(base, revision, name):
    """One tensor of the base transformer, read from its safetensors file (or shard) without loading the model."""
    from safetensors import safe_open

    folder = os.path.join(base_model_folder(base, revision, ["transformer/*"]), "transformer")
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    file = "diffusion_pytorch_model.safetensors"
    if os.path.isfile(index):
        with open(index) as f:
            file = json.load(f)["weight_map"][name]
    with safe_open(os.path.join(folder, file), "pt") as f:
        return f.get_tensor(name)


def proj_out_diff(args, config, folder):
    """{`diffusion_model.final_layer.linear.diff`: trained - base} for a run that trained proj_out, else {}."""
    path = os.path.join(folder, ADAPTER_WEIGHTS)
    trained = load_weight_file(path) if os.path.isfile(path) else {}
    if "proj_out.weight" not in trained:
        return {}
    if {name for name in trained if name.startswith("proj_out.")} != {"proj_out.weight"}:
        raise ValueError(f"{path} holds proj_out tensors beside its weight; this exporter writes only the weight")
    base, revision = base_model(args, config)
    original = base_tensor(base, revision, "proj_out.weight").float()
    if original.shape != trained["proj_out.weight"].shape:
        raise ValueError(f"{args.lora_path} trained proj_out for another model than {base}")
    name = COMFYUI_PREFIX + TOP_LINEARS["proj_out"] + ".diff"
    return {name: (trained["proj_out.weight"].float() - original).contiguous()}


def comfyui_metadata(config, dropped):
    """safetensors metadata (strings only): what the LoRA is for and how it was made."""
    return {
        "format": "pt",
        "base_model": str(config.get("base_model")),
        "base_model_revision": str(config.get("base_revision")),
        "family": recorded_family(config),
        "lora_rank": str(config["lora_rank"]),
        "lora_alpha": str(config["lora_alpha"]),
        "lora_target_modules": json.dumps(config["lora_target_modules"]),
        "proj_out": "final_layer.linear.diff (trained - base)" if config.get("train_proj_out") else "base",
        "left_out": json.dumps(dropped),
        "exported_by": "cosmos-finetune tools/export_lora.py",
    }


def export_comfyui(args, folder, config):
    from safetensors.torch import save_file

    family = recorded_family(config)
    if family not in COMFYUI_FAMILIES:
        raise ValueError(
            f"{args.lora_path} is a {family} fine-tune and ComfyUI runs no Cosmos-Predict2.5 model; use --to merged "
            "or load it in diffusers with load_lora_weights"
        )
    dropped = check_droppable(config, args)
    if not os.path.isfile(os.path.join(folder, LORA_WEIGHTS)):
        raise ValueError(f"{folder} holds no {LORA_WEIGHTS}: the run trained no LoRA")
    tensors = comfyui_state_dict(load_weight_file(os.path.join(folder, LORA_WEIGHTS)), config["lora_alpha"])
    tensors.update(proj_out_diff(args, config, folder))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with file_written_whole(args.output) as tmp:
        save_file(tensors, tmp, metadata=comfyui_metadata(config, dropped))
    layers = sum(name.endswith(".alpha") for name in tensors)
    extra = " and the proj_out difference" if len(tensors) > 3 * layers else ""
    print(f"wrote {args.output}: {layers} LoRA layers{extra} under NVIDIA's names for ComfyUI")


# ----------------------------------------------------------------------------------------------------------------
# --to merged
# ----------------------------------------------------------------------------------------------------------------
def merged_transformer(base, revision, family, folder, scale, drop_adapters):
    """The base transformer (float32) with the fine-tune loaded as sample.py loads it, the LoRA folded into the
    linear weights and the peft layers removed: the stock class with the stock parameter names."""
    import torch

    transformer = load_component(base, "transformer", revision, torch.float32, family=family)
    load_finetuned_weights(transformer, folder, scale=scale)
    if drop_adapters:
        remove_temporal_adapters(transformer)
    if getattr(transformer, "peft_config", None):
        transformer.fuse_lora(adapter_names=["default"])
        transformer.unload_lora()
    return transformer


def base_model_folder(path, revision, allow_patterns=None):
    """A local folder holding the base checkpoint's files (a hub id is resolved through the local cache or a
    download of the files matching `allow_patterns`)."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, revision=revision, allow_patterns=allow_patterns)


def copy_components(base_folder, output):
    """Every file of the base checkpoint but its transformer, as real copies (never links): a folder users move."""
    for name in os.listdir(base_folder):
        if name in ("transformer", CARD) or name.startswith("."):
            continue
        source = os.path.join(base_folder, name)
        if os.path.isdir(source):
            shutil.copytree(source, os.path.join(output, name), symlinks=False)
        else:
            shutil.copyfile(source, os.path.join(output, name))


def export_merged(args, folder, config):
    import torch

    if os.path.isfile(args.output) or (os.path.isdir(args.output) and os.listdir(args.output)):
        raise ValueError(f"--output {args.output} exists and is not empty; a merged export goes to a new folder")
    base, revision = base_model(args, config)
    family = detect_family(base, revision)
    trained_on = recorded_family(config)
    if trained_on != family.name:
        raise ValueError(f"{args.lora_path} was trained on a {trained_on} model, {base} is {family.name}")
    dropped = check_droppable(config, args)
    transformer = merged_transformer(base, revision, family, folder, args.lora_scale, bool(dropped))
    transformer = transformer.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[args.dtype])
    base_folder = base_model_folder(base, revision)
    with folder_written_whole(args.output) as tmp:
        os.makedirs(tmp)
        copy_components(base_folder, tmp)
        transformer.save_pretrained(os.path.join(tmp, "transformer"))
        write_merged_card(tmp, args.output, base, revision, family.name, args.lora_path, args.lora_scale, dropped)
    print(
        f"wrote {args.output}: {base} with {args.lora_path} folded in at scale {args.lora_scale}"
        + (f", without its {' and '.join(dropped)}" if dropped else "")
    )


def main(args):
    folder = weights_folder(args)
    config = read_adapter_config(folder)
    if args.to == "comfyui":
        export_comfyui(args, folder, config)
    else:
        export_merged(args, folder, config)
    return 0


if __name__ == "__main__":
    run_main(main, parse_args)
