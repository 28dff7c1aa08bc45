"""What fine-tuning adds to the transformer and how it is stored: the LoRA config, the temporal adapters, and
exporting, checking and loading the fine-tuned weights (a train_cosmos_lora.py output or checkpoint dir).
"""

import json
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_WEIGHTS = "temporal_adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EMA_DIR = "ema"  # the EMA weights of a run or checkpoint, in the same format (train_cosmos_lora.py --ema_decay)


# ----------------------------------------------------------------------------------------------------------------
# Temporal adapters
# ----------------------------------------------------------------------------------------------------------------
class TemporalAdapter(torch.nn.Module):
    """A bottleneck that mixes each spatial token's features along time, added to a transformer block's output.

    LayerNorm -> down-projection (dim / reduction_factor) -> depthwise temporal convolution (kernel 3) -> GELU ->
    up-projection. The up-projection starts at zero, so a fresh adapter adds exactly nothing.
    `num_frames` is set before every forward by a hook on the transformer (tokens arrive flattened as T*H*W);
    `scale` lets sample.py weaken or switch off a trained adapter.
    """

    def __init__(self, dim, reduction_factor=8, kernel_size=3):
        super().__init__()
        hidden = max(1, dim // reduction_factor)
        self.norm = torch.nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.down = torch.nn.Linear(dim, hidden)
        self.temporal_conv = torch.nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.up = torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)
        self.num_frames = 1
        self.scale = 1.0

    def forward(self, hidden_states):
        batch, tokens, _ = hidden_states.shape
        frames = self.num_frames
        x = self.down(self.norm(hidden_states.to(self.down.weight.dtype)))
        x = x.view(batch, frames, tokens // frames, -1).permute(0, 2, 3, 1).flatten(0, 1)  # [B*HW, C, T]
        x = F.gelu(self.temporal_conv(x))
        x = x.unflatten(0, (batch, tokens // frames)).permute(0, 3, 1, 2).flatten(1, 2)  # [B, THW, C]
        return (self.up(x) * self.scale).to(hidden_states.dtype)


def _add_adapter_output(block, args, output):
    return output + block.temporal_adapter(output)


def _record_num_frames(transformer, args, kwargs):
    hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    num_frames = hidden_states.shape[2] // transformer.config.patch_size[0]
    for module in transformer.frame_counted_modules:
        module.num_frames = num_frames


def count_frames_for(transformer, modules):
    """Set `num_frames` on each of `modules` before every forward of the transformer (its tokens arrive flattened as
    T*H*W, so a module that works per frame needs T)."""
    if not hasattr(transformer, "frame_counted_modules"):
        transformer.frame_counted_modules = []
        transformer.register_forward_pre_hook(_record_num_frames, with_kwargs=True)
    transformer.frame_counted_modules.extend(m for m in modules if m not in transformer.frame_counted_modules)


def add_temporal_adapters(transformer, reduction_factor=8):
    """Register one TemporalAdapter inside every CosmosTransformerBlock (so FSDP shards it with its block)."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for block in transformer.transformer_blocks:
        block.temporal_adapter = TemporalAdapter(dim, reduction_factor).to(transformer.device)
        block.temporal_adapter_hook = block.register_forward_hook(_add_adapter_output)
    count_frames_for(transformer, [block.temporal_adapter for block in transformer.transformer_blocks])


def remove_temporal_adapters(transformer):
    """Undo add_temporal_adapters: the blocks lose their adapters (and their weights), the transformer is stock."""
    for block in transformer.transformer_blocks:
        if hasattr(block, "temporal_adapter"):
            block.temporal_adapter_hook.remove()
            transformer.frame_counted_modules.remove(block.temporal_adapter)
            del block.temporal_adapter, block.temporal_adapter_hook


# ----------------------------------------------------------------------------------------------------------------
# Exporting and loading fine-tuned weights
# ----------------------------------------------------------------------------------------------------------------
def lora_config(rank, alpha, target_modules, dropout=0.0):
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout, init_lora_weights=True
    )


def split_trainable_state_dict(state_dict):
    """Split a trainable state dict into diffusers-format LoRA layers and the rest (adapters, proj_out)."""
    lora, other = {}, {}
    for name, tensor in state_dict.items():
        if ".lora_A." in name or ".lora_B." in name:
            lora[name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = tensor
        else:
            other[name] = tensor
    return lora, other


def save_finetuned_weights(state_dict, output_dir, config):
    """Write pytorch_lora_weights.safetensors (diffusers format), temporal_adapters.safetensors and the config, which
    lists the weight files written with their sizes (`files`), so that a missing or truncated one is refused."""
    from diffusers.loaders import CosmosLoraLoaderMixin
    from safetensors.torch import save_file

    lora, other = split_trainable_state_dict(state_dict)
    os.makedirs(output_dir, exist_ok=True)
    if lora:
        metadata = lora_config(config["lora_rank"], config["lora_alpha"], config["lora_target_modules"]).to_dict()
        CosmosLoraLoaderMixin.save_lora_weights(
            output_dir, transformer_lora_layers=lora, transformer_lora_adapter_metadata=metadata
        )
    if other:
        save_file({k: v.contiguous() for k, v in other.items()}, os.path.join(output_dir, ADAPTER_WEIGHTS))
    names = [name for name, part in ((LORA_WEIGHTS, lora), (ADAPTER_WEIGHTS, other)) if part]
    config = dict(config, files=file_sizes(output_dir, names))
    with open(os.path.join(output_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


def file_sizes(directory, names):
    return {name: os.path.getsize(os.path.join(directory, name)) for name in names}


def check_files(directory, sizes):
    """Refuse, naming the file, when a file of `{name: bytes}` is missing or shorter or longer than written."""
    for name, size in sizes.items():
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (listed in {directory}); the folder is incomplete")
        if os.path.getsize(path) != size:
            raise ValueError(f"{path} is truncated or damaged: {os.path.getsize(path)} bytes, {size} written")


def read_adapter_config(path):
    """The adapter config of an export or checkpoint dir, after checking that every weight file it lists is whole.
    Configs written before `files` existed name their files by what was trained."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} holds no {ADAPTER_CONFIG}: not a train_cosmos_lora.py output or checkpoint")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except ValueError as error:
        raise ValueError(f"{config_path} is unreadable: {error}") from None
    if "files" in config:
        check_files(path, config["files"])
    else:
        trained_other = config.get("use_temporal_adapters") or config.get("train_proj_out")
        for name in [LORA_WEIGHTS] + ([ADAPTER_WEIGHTS] if trained_other else []):
            if not os.path.isfile(os.path.join(path, name)):
                raise FileNotFoundError(f"{os.path.join(path, name)} is missing; the folder is incomplete")
    return config


def load_weight_file(path):
    """load_file, naming the file when it cannot be read."""
    try:
        return load_file(path)
    except Exception as error:
        raise ValueError(f"{path} is unreadable ({type(error).__name__}: {error})".splitlines()[0]) from None


def read_exported_weights(directory):
    """Inverse of save_finetuned_weights: the exported tensors under the model's own (peft) parameter names."""
    state = {}
    if os.path.isfile(os.path.join(directory, LORA_WEIGHTS)):
        for name, tensor in load_weight_file(os.path.join(directory, LORA_WEIGHTS)).items():
            name = re.sub(r"\.lora_([AB])\.", r".lora_\1.default.", name.removeprefix("transformer."))
            state[name] = tensor
    if os.path.isfile(os.path.join(directory, ADAPTER_WEIGHTS)):
        state.update(load_weight_file(os.path.join(directory, ADAPTER_WEIGHTS)))
    return state


def _check_lora_fits(transformer, lora):
    modules = dict(transformer.named_modules())
    for key, tensor in lora.items():
        module_name, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        module = modules.get(module_name)
        if not isinstance(module, torch.nn.Linear):
            raise ValueError(f"LoRA targets {module_name}, which this transformer does not have as a linear layer")
        expected = module.in_features if kind.startswith("A") else module.out_features
        actual = tensor.shape[1] if kind.startswith("A") else tensor.shape[0]
        if actual != expected:
            raise ValueError(
                f"LoRA for {module_name} has {actual} features where the model has {expected}: "
                "it was trained on another model size"
            )


def load_finetuned_weights(transformer, path, scale=1.0):
    """Load a training output or checkpoint-STEP dir (LoRA + temporal adapters + proj_out) onto a base transformer.

    `scale` sets the strength of the whole fine-tune: the LoRA scale, the adapters' output scale, and proj_out as
    base + scale * (trained - base). 0 gives the base model back, 1 the trained one. Returns the adapter config.
    The LoRA loads through diffusers' `load_lora_adapter(prefix="transformer")`.
    """
    config = read_adapter_config(path)
    if config.get("use_temporal_adapters"):
        add_temporal_adapters(transformer, config["adapter_reduction_factor"])
    adapter_path = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(adapter_path):
        weights = load_weight_file(adapter_path)
        own = transformer.state_dict()
        for name, tensor in weights.items():
            if name not in own or own[name].shape != tensor.shape:
                raise ValueError(f"{adapter_path}: {name} {list(tensor.shape)} does not fit this transformer")
            if name.startswith("proj_out.") and scale != 1.0:
                weights[name] = own[name].float() + scale * (tensor - own[name].float())
        transformer.load_state_dict(weights, strict=False)
        for module in transformer.modules():
            if isinstance(module, TemporalAdapter):
                module.scale = scale
    lora_path = os.path.join(path, LORA_WEIGHTS)
    if os.path.isfile(lora_path):
        _check_lora_fits(transformer, load_weight_file(lora_path))
        # Naming the directory and weight_name makes diffusers read the LoRA config (alpha, targets) stored in the
        # file; given the file path alone it silently falls back to alpha = rank.
        transformer.load_lora_adapter(path, weight_name=LORA_WEIGHTS, prefix="transformer", adapter_name="default")
        transformer.set_adapters(["default"], weights=[scale])
    return config
