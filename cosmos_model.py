"""The model side shared by the three scripts: latent normalization, prompt encoding, the temporal adapters, per-frame
AdaLN modulation, exporting and loading fine-tuned weights, FP8 matmuls, the transformer's velocity prediction, and
the video2world sampler.
"""

import importlib.util
import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import cosmos_vae
from cosmos_video import VAE_SPATIAL_FACTOR

TEXT_MAX_LENGTH = 512
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_WEIGHTS = "temporal_adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
EMA_DIR = "ema"  # the EMA weights of a run or checkpoint, in the same format (train_cosmos_lora.py --ema_decay)


# ----------------------------------------------------------------------------------------------------------------
# VAE latents and text embeddings
# ----------------------------------------------------------------------------------------------------------------
def vae_normalization(vae_config):
    """The per-channel mean/std the pipeline normalizes latents with, from a VAE config."""
    return {"latents_mean": list(vae_config["latents_mean"]), "latents_std": list(vae_config["latents_std"])}


def normalize_latents(latents, vae_config):
    mean, std = _mean_std(latents, vae_config)
    return (latents - mean) / std


def denormalize_latents(latents, vae_config):
    mean, std = _mean_std(latents, vae_config)
    return latents * std + mean


def _mean_std(latents, vae_config):
    shape = (1, -1, 1, 1, 1) if latents.ndim == 5 else (-1, 1, 1, 1)
    mean = torch.tensor(vae_config["latents_mean"], dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae_config["latents_std"], dtype=latents.dtype, device=latents.device).view(shape)
    return mean, std


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device, dtype=None):
    """T5 embeddings [B, 512, D] with the positions past each prompt's length zeroed, as the pipeline does."""
    inputs = tokenizer(prompts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.bool().to(device)
    embeds = text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
    embeds = embeds.to(dtype or text_encoder.dtype)
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        embeds[i, length:] = 0
    return embeds


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
        block.register_forward_hook(_add_adapter_output)
    count_frames_for(transformer, [block.temporal_adapter for block in transformer.transformer_blocks])


# ----------------------------------------------------------------------------------------------------------------
# Per-frame AdaLN modulation
# ----------------------------------------------------------------------------------------------------------------
class FrameModulation:
    """Mixed into Cosmos' AdaLN-Zero norm: its shift, scale and gate are computed once per latent frame.

    With a timestep per frame ([B, 1, T, 1, 1], as `predict_velocity` passes it) the transformer repeats the timestep
    embeddings over each frame's H*W tokens, so the stock norm runs SiLU -> linear_1 -> linear_2 -> + temb on every
    token: about a tenth of a forward's matmul FLOPs, all on rows that repeat. Here it runs on one row per frame and
    is broadcast over the frame's tokens; the numbers are the same. Parameters and their names are unchanged, so
    checkpoints, LoRA targets and FSDP sharding see the stock module. Any other timestep goes the stock way.
    (A mixin, so that importing this module does not import diffusers.)
    """

    num_frames = 1

    def forward(self, hidden_states, embedded_timestep, temb=None):
        if embedded_timestep.ndim != 3:
            return super().forward(hidden_states, embedded_timestep, temb)
        batch, tokens, dim = hidden_states.shape
        frame_tokens = tokens // self.num_frames

        def first_token_of_each_frame(x):  # [B, T*H*W, C] -> [B, T, 1, C]
            return x.unflatten(1, (self.num_frames, frame_tokens))[:, :, :1]

        modulation = self.linear_2(self.linear_1(self.activation(first_token_of_each_frame(embedded_timestep))))
        if temb is not None:
            modulation = modulation + first_token_of_each_frame(temb)
        shift, scale, gate = modulation.chunk(3, dim=-1)
        hidden_states = self.norm(hidden_states).unflatten(1, (self.num_frames, frame_tokens)) * (1 + scale) + shift
        gate = gate.expand(batch, self.num_frames, frame_tokens, dim)
        return hidden_states.flatten(1, 2), gate.flatten(1, 2)


_FRAME_MODULATED_CLASSES = {}


def adaln_norms(transformer):
    """The three AdaLN-Zero norms of every block (before self-attention, cross-attention and the MLP)."""
    return [norm for block in transformer.transformer_blocks for norm in (block.norm1, block.norm2, block.norm3)]


def modulate_per_frame(transformer):
    """Give every block's three AdaLN norms the per-frame computation of FrameModulation, in place."""
    norms = [norm for norm in adaln_norms(transformer) if not isinstance(norm, FrameModulation)]
    for norm in norms:
        stock = type(norm)
        if stock not in _FRAME_MODULATED_CLASSES:
            _FRAME_MODULATED_CLASSES[stock] = type(f"FrameModulated{stock.__name__}", (FrameModulation, stock), {})
        norm.__class__ = _FRAME_MODULATED_CLASSES[stock]
    count_frames_for(transformer, norms)
    return transformer


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


# ----------------------------------------------------------------------------------------------------------------
# FP8 matmuls (--fp8)
# ----------------------------------------------------------------------------------------------------------------
def check_fp8_support():
    if importlib.util.find_spec("torchao") is None:
        raise ValueError("--fp8 needs torchao: pip install -r requirements-fp8.txt")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        name = torch.cuda.get_device_name()
        raise ValueError(f"--fp8 needs a GPU with FP8 matmuls (compute capability 8.9+); {name} has none")


def convert_frozen_linears_to_fp8(transformer, emulate=False):
    """--fp8 of training and sampling: swap the frozen nn.Linear layers inside the transformer blocks for torchao's
    Float8Linear (dynamic tensorwise scales, e4m3 forward, e5m2 gradients). The LoRA A/B, the temporal adapters and
    the AdaLN linears (one row per frame) keep their precision; dimensions not divisible by 16 are left alone.
    Weights stay the same bf16 parameters, so checkpoints and exports do not change."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    def frozen_block_linear(module, name):
        return (
            name.startswith("transformer_blocks.")
            and not re.search(r"lora_|norm|temporal_adapter", name)
            and not module.weight.requires_grad
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    config = Float8LinearConfig(emulate=emulate)
    return convert_to_float8_training(transformer, module_filter_fn=frozen_block_linear, config=config)


# ----------------------------------------------------------------------------------------------------------------
# Velocity prediction and video2world sampling (the math of diffusers' Cosmos2VideoToWorldPipeline, CFG batched)
# ----------------------------------------------------------------------------------------------------------------
SIGMA_MAX = 80.0


SIGMA_CONDITIONING = 1e-4


def set_sampling_schedule(scheduler, num_inference_steps, device):
    """Karras sigmas from 80 down to 0.002 as the pipeline sets them, with the last sigma repeated."""
    scheduler.register_to_config(sigma_max=SIGMA_MAX, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(sigmas=np.linspace(0, 1, num_inference_steps), device=device)
    scheduler.sigmas[-1] = scheduler.sigmas[-2]


def predict_velocity(transformer, model_input, timestep, prompt_embeds, condition_mask):
    """The transformer's velocity F ~ eps - z0 [B, C, T, h, w], called exactly alike in training and sampling.

    `timestep` is t in [0, 1] per frame [B, 1, T, 1, 1]; `condition_mask` [B, 1, T, 1, 1] marks clean conditioning
    frames. The transformer gets fps=None (NVIDIA's checkpoints were trained without fps-scaled RoPE) and a zero
    padding mask [1, 1, H, W] at pixel size. Inputs are cast to the transformer's dtype; the output is float32.
    """
    dtype = getattr(transformer, "module", transformer).dtype  # DDP wraps the model in .module
    batch, _, frames, height, width = model_input.shape
    padding_mask = model_input.new_zeros(1, 1, height * VAE_SPATIAL_FACTOR, width * VAE_SPATIAL_FACTOR, dtype=dtype)
    velocity = transformer(
        hidden_states=model_input.to(dtype),
        timestep=timestep.to(dtype),
        encoder_hidden_states=prompt_embeds.to(dtype),
        fps=None,
        condition_mask=condition_mask.expand(batch, 1, frames, height, width).to(dtype),
        padding_mask=padding_mask,
        return_dict=False,
    )[0]
    return velocity.float()


def conditioning_mask(frames, num_cond_latent_frames, device):
    """[1, 1, T, 1, 1]: 1 on the clean conditioning latent frames, 0 on the frames to generate."""
    cond = torch.zeros(1, 1, frames, 1, 1, device=device)
    cond[:, :, :num_cond_latent_frames] = 1.0
    return cond


def guidance_text(prompt_embeds, negative_prompt_embeds, guidance_scale):
    """The text of a sampling step's one batched call: the prompts, then under CFG (scale > 1) the negative ones."""
    return torch.cat([prompt_embeds, negative_prompt_embeds]) if guidance_scale > 1.0 else prompt_embeds


def predict_velocity_per_text(transformer, model_input, timestep, text, condition_mask):
    """predict_velocity with the latents [B, ...] repeated for each of the B-sized text batches (twice under CFG)."""
    copies = text.shape[0] // model_input.shape[0]
    batch, _, frames, _, _ = model_input.shape
    return predict_velocity(
        transformer,
        model_input.repeat(copies, 1, 1, 1, 1),
        timestep.repeat(copies, 1, 1, 1, 1),
        text,
        condition_mask.expand(batch * copies, 1, frames, 1, 1),
    )


def guide(x, guidance_scale):
    """CFG on the stacked conditional and unconditional halves of x: x_c + g * (x_c - x_u); x as it is without CFG."""
    if guidance_scale <= 1.0:
        return x
    x_cond, x_uncond = x.chunk(2)
    return x_cond + guidance_scale * (x_cond - x_uncond)


@torch.no_grad()
def denoise_video2world(
    transformer,
    scheduler,
    noise,
    cond_latents,
    num_cond_latent_frames,
    prompt_embeds,
    negative_prompt_embeds=None,
    guidance_scale=7.0,
    num_inference_steps=35,
):
    """Generate normalized latents [B, 16, T, h, w] from noise and clean conditioning frames.

    At each Karras sigma, with t = sigma / (sigma + 1): the transformer sees the conditioning frames clean (timestep
    t_cond) and the rest as latents * (1 - t); its velocity F gives x0 = (1 - t) * latents - t * F; the conditioning
    frames of x0 are replaced by the clean ones; CFG is x0_c + g * (x0_c - x0_u); Euler steps on
    (latents - x0) / sigma. The schedule ends on a repeated sigma (dt = 0), so num_inference_steps - 1 steps change
    the latents and the model is called that many times; the result is the pipeline's to the bit.
    `noise` is standard normal; it is scaled by sigma_max here. The transformer is called by `predict_velocity`.
    """
    dtype = getattr(transformer, "module", transformer).dtype  # DDP wraps the model in .module
    device = noise.device
    set_sampling_schedule(scheduler, num_inference_steps, device)
    latents = noise.float() * SIGMA_MAX
    cond_latents = cond_latents.float()
    batch, _, frames, _, _ = latents.shape
    cond = conditioning_mask(frames, num_cond_latent_frames, device)
    sigma_cond = torch.tensor(SIGMA_CONDITIONING, dtype=torch.float32, device=device)
    t_cond = sigma_cond / (sigma_cond + 1)
    text = guidance_text(prompt_embeds, negative_prompt_embeds, guidance_scale)
    copies = text.shape[0] // batch
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        # the last sigma is repeated: its Euler step (dt = 0) leaves the latents as they are, so skip its model call
        if scheduler.sigmas[i + 1] == sigma:
            break
        t = sigma / (sigma + 1)
        model_input = (cond * cond_latents + (1 - cond) * latents * (1 - t)).to(dtype)
        frame_t = (cond * t_cond + (1 - cond) * t.view(1, 1, 1, 1, 1)).expand(batch, 1, frames, 1, 1).to(dtype)
        velocity = predict_velocity_per_text(transformer, model_input, frame_t, text, cond)
        x0 = ((1 - t) * latents.repeat(copies, 1, 1, 1, 1) - t * velocity).to(dtype)
        x0 = guide(cond * cond_latents.repeat(copies, 1, 1, 1, 1) + (1 - cond) * x0, guidance_scale)
        latents = scheduler.step((latents - x0) / sigma, timestep, latents, return_dict=False)[0]
    return latents


@torch.no_grad()
def decode_to_frames(vae, latents, compiled=False):
    """Normalized latents [B, 16, T, h, w] -> uint8 frames [B, T, H, W, 3] (`compiled`: see cosmos_vae.decode)."""
    video = cosmos_vae.decode(vae, denormalize_latents(latents.float(), vae.config).to(vae.dtype), compiled)
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()
