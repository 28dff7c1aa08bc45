"""The model card (README.md) every final export of train_cosmos_lora.py writes beside the weights: base model and
revision, family, recipe and hyperparameters, the data, the validation videos when the run made any, how to load the
LoRA in diffusers (and, for Predict2, in ComfyUI) and the license of the base model.

The loading code in the card is the one tests/test_export.py runs against a real export.
"""

import glob
import json
import os
import re

from cosmos_adapters import ADAPTER_WEIGHTS, EMA_DIR, LORA_WEIGHTS
from cosmos_process import file_written_whole

CARD = "README.md"
LICENSE_URL = "https://www.nvidia.com/en-us/agreements/enterprise-software/nvidia-open-model-license/"
PIPELINES = {"predict2": "Cosmos2VideoToWorldPipeline", "predict2.5": "Cosmos2_5_PredictBasePipeline"}
# The settings a reader needs to judge or repeat the run, in this order (those a run lacks are left out).
HYPERPARAMETERS = [
    "recipe",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "loss_scale",
    "lora_rank",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_temporal_adapters",
    "train_proj_out",
    "ema_decay",
    "text_dropout",
    "conditioning_frames",
    "timestep_shift",
    "high_sigma_ratio",
    "mixed_precision",
    "seed",
]


def write_model_card(folder, args, run_dir=None, repo_id=None):
    """Write FOLDER/README.md for the training run whose settings are `args` (its output folder `run_dir`, by
    default args.output_dir, holds held_out.json and validation/). Its loading code reads the LoRA from the Hub repo
    `repo_id` when given (an upload), else from the run folder."""
    run_dir = run_dir or args.output_dir
    settings = vars(args)
    family = settings.get("family") or "predict2"
    sections = [
        front_matter(settings),
        f"# {os.path.basename(os.path.normpath(run_dir))}\n",
        f"A LoRA fine-tune of {model_link(settings['pretrained_model_name_or_path'])} made with cosmos-finetune's "
        "`train_cosmos_lora.py`.\n",
        base_model_section(settings, family),
        training_section(settings),
        data_section(run_dir),
        validation_section(run_dir),
        diffusers_section(settings, family, repo_id or os.path.abspath(run_dir)),
        comfyui_section(settings, family),
        license_section(),
    ]
    text = "\n".join(section for section in sections if section)
    path = os.path.join(folder, CARD)
    with file_written_whole(path) as tmp, open(tmp, "w") as f:
        f.write(text)
    return path


def model_link(model):
    return f"`{model}`" if os.path.isdir(model) else f"[{model}](https://huggingface.co/{model})"


def front_matter(settings, relation="adapter"):
    """The Hub's metadata block; `relation` is how the folder relates to the base model (adapter or merge)."""
    base = settings["pretrained_model_name_or_path"]
    lines = ["---"]
    if not os.path.isdir(base):
        lines += [f"base_model: {base}", f"base_model_relation: {relation}"]
    lines += [
        "library_name: diffusers",
        "license: other",
        "license_name: nvidia-open-model-license",
        f"license_link: {LICENSE_URL}",
        "pipeline_tag: image-to-video",
        "tags:",
        *(["- lora"] if relation == "adapter" else []),
        "- cosmos",
        "- video2world",
        "- cosmos-finetune",
        "---\n",
    ]
    return "\n".join(lines)


def base_model_section(settings, family):
    return "\n".join(
        [
            "## Base model\n",
            f"- model: `{settings['pretrained_model_name_or_path']}`",
            f"- revision: `{settings.get('revision') or 'main'}`",
            f"- family: {family} (diffusers `{PIPELINES.get(family, '?')}`)\n",
        ]
    )


def training_section(settings):
    rows = [f"| `{name}` | `{json.dumps(settings[name])}` |" for name in HYPERPARAMETERS if name in settings]
    return "\n".join(["## Training\n", "| setting | value |", "|---|---|", *rows, ""])


def data_section(run_dir):
    record_path = os.path.join(run_dir, "held_out.json")
    if not os.path.isfile(record_path):
        return ""
    with open(record_path) as f:
        record = json.load(f)
    caches = [os.path.basename(os.path.normpath(path)) for path in record.get("trained_caches", [])]
    lines = ["## Data\n", f"Trained on the latent cache(s) {', '.join(f'`{c}`' for c in caches)} (cache_latents.py)."]
    held = len(record.get("clips", []))
    if held:
        lines.append(
            f"{held} clips ({len(record.get('keys', []))} whole videos) of `{caches[0]}` were held out and never "
            "trained; they are listed in `held_out.json`."
        )
    return "\n".join(lines) + "\n"


def latest_validation_videos(run_dir):
    steps = glob.glob(os.path.join(run_dir, "validation", "step-*"))
    steps = [s for s in steps if re.fullmatch(r"step-\d+", os.path.basename(s))]
    if not steps:
        return None, []
    latest = max(steps, key=lambda s: int(os.path.basename(s).split("-")[1]))
    return latest, sorted(glob.glob(os.path.join(latest, "*.mp4")))


def validation_section(run_dir):
    latest, videos = latest_validation_videos(run_dir)
    if not videos:
        return ""
    lines = [
        "## Validation\n",
        f"Held-out clips generated from their first latent frame at {os.path.basename(latest)} "
        "(ground truth | generated):\n",
    ]
    lines += [f"- [{os.path.basename(v)}]({os.path.relpath(v, run_dir)})" for v in videos]
    return "\n".join(lines) + "\n"


def loading_code(settings, family, location):
    """The diffusers code that loads the base pipeline and the LoRA at `location` (a folder or a Hub repo; tests run
    it)."""
    base, revision = settings["pretrained_model_name_or_path"], settings.get("revision")
    pipeline = PIPELINES.get(family, PIPELINES["predict2"])
    revision_arg = f", revision={revision!r}" if revision else ""
    proj_out = settings.get("train_proj_out") and not settings.get("use_temporal_adapters")
    imports = ["import torch", f"from diffusers import {pipeline}"]
    if proj_out:
        imports.insert(0, "import os" if os.path.isdir(location) else "from huggingface_hub import hf_hub_download")
        imports.append("from safetensors.torch import load_file")
    lines = [*imports, "", f"pipe = {pipeline}.from_pretrained({base!r}{revision_arg}, torch_dtype=torch.bfloat16)"]
    if family == "predict2":
        lines.append("# Cosmos2VideoToWorldPipeline has no load_lora_weights; its transformer loads the LoRA")
        lines.append(
            f"pipe.transformer.load_lora_adapter({location!r}, weight_name={LORA_WEIGHTS!r}, prefix='transformer')"
        )
    else:
        lines.append(f"pipe.load_lora_weights({location!r}, weight_name={LORA_WEIGHTS!r})")
    if proj_out:
        lines.append("# the fully trained proj_out")
        lines.append(f"pipe.transformer.load_state_dict(load_file({weights_file_expr(location)}), strict=False)")
    return "\n".join(lines)


def weights_file_expr(location):
    if os.path.isdir(location):
        return f"os.path.join({location!r}, {ADAPTER_WEIGHTS!r})"
    return f"hf_hub_download({location!r}, {ADAPTER_WEIGHTS!r})"


def diffusers_section(settings, family, location):
    lines = ["## Use in diffusers\n", "```python", loading_code(settings, family, location), "```\n"]
    if settings.get("use_temporal_adapters"):
        lines.append(
            f"The run also trained temporal adapters (`{ADAPTER_WEIGHTS}`): modules the stock diffusers "
            "transformer does not have. They load only with cosmos-finetune (`sample.py --lora_path`, or "
            "`cosmos_adapters.load_finetuned_weights`); the code above runs the model without them.\n"
        )
    if settings.get("ema_decay"):
        lines.append(f"The EMA of the weights is in `{EMA_DIR}/`, in the same format (`subfolder='{EMA_DIR}'`).\n")
    lines.append(
        "`python tools/export_lora.py --lora_path THIS_FOLDER --to merged --output MERGED` writes a full diffusers "
        "checkpoint with the fine-tune folded in.\n"
    )
    return "\n".join(lines)


def comfyui_section(settings, family):
    if family != "predict2":
        return ""
    return "\n".join(
        [
            "## Use in ComfyUI\n",
            "ComfyUI names the Cosmos-Predict2 model's layers as NVIDIA does. Convert the LoRA with "
            "`python tools/export_lora.py --lora_path THIS_FOLDER --to comfyui --output cosmos_lora.safetensors`, "
            "put the file in `ComfyUI/models/loras/` and load it with a LoRA loader node on the Cosmos-Predict2 "
            "model. A trained proj_out goes in as a weight difference (`final_layer.linear.diff`); temporal adapters "
            "are not LoRA layers and do not carry over (`--drop_adapters`).\n",
        ]
    )


def license_section():
    return "\n".join(
        [
            "## License\n",
            f"The base model is released under the [NVIDIA Open Model License]({LICENSE_URL}); this fine-tune is a "
            "derivative of it and is used under the same terms. The license requires the Cosmos guardrail (the "
            "pipeline's safety checker) to stay on in use.\n",
        ]
    )


def write_merged_card(folder, location, base, revision, family, lora_path, scale, left_out):
    """README.md in FOLDER, the merged checkpoint of tools/export_lora.py that will be at `location`: what was folded
    into which base model, and how to load it."""
    pipeline = PIPELINES.get(family, PIPELINES["predict2"])
    location = os.path.abspath(location)
    code = "\n".join(
        [
            "import torch",
            f"from diffusers import {pipeline}",
            "",
            f"pipe = {pipeline}.from_pretrained({location!r}, torch_dtype=torch.bfloat16)",
        ]
    )
    dropped = f" Left out: {', '.join(left_out)} (not foldable into the stock transformer)." if left_out else ""
    sections = [
        front_matter({"pretrained_model_name_or_path": base}, relation="merge"),
        f"# {os.path.basename(location)}\n",
        f"{model_link(base)} (revision `{revision or 'main'}`, {family}) with the fine-tune of `{lora_path}` folded "
        f"into the transformer's weights at scale {scale} (LoRA and proj_out) by cosmos-finetune's "
        f"`tools/export_lora.py --to merged`.{dropped} It loads with the stock pipeline, without peft:\n",
        "```python",
        code,
        "```\n",
        license_section(),
    ]
    path = os.path.join(folder, CARD)
    with file_written_whole(path) as tmp, open(tmp, "w") as f:
        f.write("\n".join(sections))
    return path
