"""Code shared by cache_latents.py, train_cosmos_lora.py and sample.py.

Only what two scripts truly share lives here: clip geometry checks, frame cropping, T5 prompt encoding,
latent (de)normalization, reading the latent cache, and the temporal adapters with their save/load functions.
"""

import functools
import hashlib
import io
import json
import os
import random
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open

VAE_TEMPORAL_FACTOR = 4  # Wan2.1 VAE: 4x in time (causal), 8x in space
VAE_SPATIAL_FACTOR = 8
SIZE_MULTIPLE = 16  # 8x VAE times the transformer's 2x2 patch
TEXT_MAX_LENGTH = 512
CACHE_INFO = "cache_info.json"
TEXT_EMBEDS_DIR = "text_embeds"


# ----------------------------------------------------------------------------------------------------------------
# Clip geometry
# ----------------------------------------------------------------------------------------------------------------
def nearest_valid_num_frames(num_frames):
    """The Wan VAE needs 4k+1 pixel frames; return the closest such count (ties go down)."""
    k = max(0, round((num_frames - 1) / VAE_TEMPORAL_FACTOR - 1e-9))
    return VAE_TEMPORAL_FACTOR * k + 1


def check_clip_geometry(num_frames, height, width):
    """Raise a one-line ValueError naming the nearest valid value when a clip shape cannot be encoded."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR != 0:
        raise ValueError(f"--num_frames {num_frames} is not 4k+1 as the Wan VAE needs; "
                         f"nearest valid: {nearest_valid_num_frames(num_frames)}")
    for name, value in (("height", height), ("width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE != 0:
            nearest = max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(value / SIZE_MULTIPLE))
            raise ValueError(f"--{name} {value} is not a multiple of {SIZE_MULTIPLE} (8x VAE x 2x2 patch); "
                             f"nearest valid: {nearest}")


def latent_shape(num_frames, height, width, channels=16):
    return [channels, (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1, height // VAE_SPATIAL_FACTOR,
            width // VAE_SPATIAL_FACTOR]


def fit_frames(frames, height, width, mode="crop"):
    """Resize uint8 frames [T, H, W, 3] to [T, height, width, 3].

    `crop` scales to cover the target keeping the aspect ratio, then centre-crops (456x256 -> 448x256 is a pure crop);
    `resize` stretches to the target size.
    """
    frames = torch.as_tensor(frames)
    src_h, src_w = frames.shape[1:3]
    if mode == "crop":
        scale = max(height / src_h, width / src_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    elif mode == "resize":
        new_h, new_w = height, width
    else:
        raise ValueError(f"unknown resize mode {mode!r}; use crop or resize")
    if (new_h, new_w) != (src_h, src_w):
        x = frames.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[:, top:top + height, left:left + width].contiguous()


def frames_to_vae_input(frames):
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1], as the pipeline's video processor produces."""
    return frames.permute(3, 0, 1, 2).float() / 255.0 * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Video decoding and clip planning
# ----------------------------------------------------------------------------------------------------------------
def open_video(video):
    import av  # only the scripts that decode videos need PyAV

    return av.open(io.BytesIO(video) if isinstance(video, (bytes, bytearray)) else video)


def probe_video(container):
    """(frame count, frames per second) of the first video stream, from the container's metadata."""
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate)
    num_frames = stream.frames
    if not num_frames:
        duration = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
        num_frames = int(duration * fps)
    return num_frames, fps


def plan_clips(num_source_frames, source_fps, num_frames, fps, stride_seconds=None, max_clips=None):
    """Source frame indices of every clip: clip c, frame j is the source frame nearest to start_c + j / fps."""
    stride_seconds = stride_seconds or num_frames / fps
    clips = []
    start = 0.0
    while max_clips is None or len(clips) < max_clips:
        indices = [round((start + j / fps) * source_fps) for j in range(num_frames)]
        if indices[-1] >= num_source_frames:
            break
        clips.append(indices)
        start += stride_seconds
    return clips


def decode_frames(container, wanted):
    """{source index: RGB uint8 array [H, W, 3]} for the wanted indices, decoding sequentially once."""
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    last, frames = max(wanted), {}
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24")
        if index >= last:
            break
    return frames


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
    inputs = tokenizer(prompts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True,
                       return_tensors="pt")
    mask = inputs.attention_mask.bool().to(device)
    embeds = text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
    embeds = embeds.to(dtype or text_encoder.dtype)
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        embeds[i, length:] = 0
    return embeds


def caption_hash(caption):
    return hashlib.sha1(caption.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Reading the latent cache
# ----------------------------------------------------------------------------------------------------------------
def read_cache_info(cache_dir):
    path = os.path.join(cache_dir, CACHE_INFO)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no {CACHE_INFO}); run cache_latents.py first")
    with open(path) as f:
        return json.load(f)


def shard_dirs(cache_dir):
    return sorted(os.path.join(cache_dir, d) for d in os.listdir(cache_dir) if d.startswith("shard_"))


def read_manifest(shard_dir):
    """Rows of a shard's manifest.jsonl; an empty list when the shard has none yet."""
    path = os.path.join(shard_dir, "manifest.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def list_cached_clips(cache_dir):
    """All clips of a cache as manifest rows, each with `path` set to the clip file."""
    clips = []
    for shard in shard_dirs(cache_dir):
        for row in read_manifest(shard):
            clips.append(dict(row, path=os.path.join(shard, row["file"])))
    return clips


def text_embed_path(cache_dir, hash_):
    return os.path.join(cache_dir, TEXT_EMBEDS_DIR, f"{hash_}.safetensors")


@functools.lru_cache(maxsize=64)
def load_text_embeds(path):
    """A caption's T5 embedding [512, D] (bf16) from a cache. Most clips share a few captions, so recent ones stay
    in memory instead of being read again for every clip. Callers must not change the tensor in place."""
    with safe_open(path, "pt") as f:
        return f.get_tensor("prompt_embeds")


def hold_out_clips(clips, num_clips, seed):
    """Split whole videos off until num_clips clips are held out, so no held-out video ever trains."""
    if num_clips <= 0:
        return clips, []
    keys = sorted({c["key"] for c in clips})
    random.Random(seed).shuffle(keys)
    clips_per_key = Counter(c["key"] for c in clips)
    held_keys, held = set(), 0
    for key in keys:
        if held >= num_clips:
            break
        held_keys.add(key)
        held += clips_per_key[key]
    train = [c for c in clips if c["key"] not in held_keys]
    if not train:
        raise ValueError(f"--num_validation_clips {num_clips} leaves no clip to train on")
    return train, [c for c in clips if c["key"] in held_keys][:num_clips]


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
    for block in transformer.transformer_blocks:
        block.temporal_adapter.num_frames = num_frames


def add_temporal_adapters(transformer, reduction_factor=8):
    """Register one TemporalAdapter inside every CosmosTransformerBlock (so FSDP shards it with its block)."""
    dim = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    for block in transformer.transformer_blocks:
        block.temporal_adapter = TemporalAdapter(dim, reduction_factor).to(transformer.device)
        block.register_forward_hook(_add_adapter_output)
    transformer.register_forward_pre_hook(_record_num_frames, with_kwargs=True)


# ----------------------------------------------------------------------------------------------------------------
# Saving and loading fine-tuned weights
# ----------------------------------------------------------------------------------------------------------------
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
ADAPTER_WEIGHTS = "temporal_adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def lora_config(rank, alpha, target_modules, dropout=0.0):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                      init_lora_weights=True)


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
    """Write pytorch_lora_weights.safetensors (diffusers format), temporal_adapters.safetensors and the config."""
    from diffusers.loaders import CosmosLoraLoaderMixin
    from safetensors.torch import save_file

    lora, other = split_trainable_state_dict(state_dict)
    os.makedirs(output_dir, exist_ok=True)
    if lora:
        metadata = lora_config(config["lora_rank"], config["lora_alpha"], config["lora_target_modules"]).to_dict()
        CosmosLoraLoaderMixin.save_lora_weights(output_dir, transformer_lora_layers=lora,
                                                transformer_lora_adapter_metadata=metadata)
    if other:
        save_file({k: v.contiguous() for k, v in other.items()}, os.path.join(output_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(output_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2)


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
            raise ValueError(f"LoRA for {module_name} has {actual} features where the model has {expected}: "
                             "it was trained on another model size")


def load_finetuned_weights(transformer, path, scale=1.0):
    """Load a training output or checkpoint-STEP dir (LoRA + temporal adapters + proj_out) onto a base transformer.

    `scale` sets the strength of the whole fine-tune: the LoRA scale, the adapters' output scale, and proj_out as
    base + scale * (trained - base). 0 gives the base model back, 1 the trained one. Returns the adapter config.
    The LoRA loads through diffusers' `load_lora_adapter(prefix="transformer")`.
    """
    from safetensors.torch import load_file

    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path} holds no {ADAPTER_CONFIG}: not a train_cosmos_lora.py output or checkpoint")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("use_temporal_adapters"):
        add_temporal_adapters(transformer, config["adapter_reduction_factor"])
    adapter_path = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(adapter_path):
        weights = load_file(adapter_path)
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
        _check_lora_fits(transformer, load_file(lora_path))
        # Naming the directory and weight_name makes diffusers read the LoRA config (alpha, targets) stored in the
        # file; given the file path alone it silently falls back to alpha = rank.
        transformer.load_lora_adapter(path, weight_name=LORA_WEIGHTS, prefix="transformer", adapter_name="default")
        transformer.set_adapters(["default"], weights=[scale])
    return config


# ----------------------------------------------------------------------------------------------------------------
# Video2World sampling (the math of diffusers' Cosmos2VideoToWorldPipeline, with CFG batched)
# ----------------------------------------------------------------------------------------------------------------
SIGMA_MAX = 80.0
SIGMA_CONDITIONING = 1e-4


def set_sampling_schedule(scheduler, num_inference_steps, device):
    """Karras sigmas from 80 down to 0.002 as the pipeline sets them, with the last sigma repeated."""
    scheduler.register_to_config(sigma_max=SIGMA_MAX, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(sigmas=np.linspace(0, 1, num_inference_steps), device=device)
    scheduler.sigmas[-1] = scheduler.sigmas[-2]


@torch.no_grad()
def denoise_video2world(transformer, scheduler, noise, cond_latents, num_cond_latent_frames, prompt_embeds,
                        negative_prompt_embeds=None, guidance_scale=7.0, num_inference_steps=35, pixel_size=None):
    """Generate normalized latents [B, 16, T, h, w] from noise and clean conditioning frames.

    At each Karras sigma, with t = sigma / (sigma + 1): the transformer sees the conditioning frames clean (timestep
    t_cond) and the rest as latents * (1 - t); its velocity F gives x0 = (1 - t) * latents - t * F; the conditioning
    frames of x0 are replaced by the clean ones; CFG is x0_c + g * (x0_c - x0_u); Euler steps on (latents - x0) / sigma.
    `noise` is standard normal; it is scaled by sigma_max here. The transformer gets fps=None, as in training.
    """
    dtype = getattr(transformer, "module", transformer).dtype  # DDP wraps the model in .module
    device = noise.device
    set_sampling_schedule(scheduler, num_inference_steps, device)
    latents = noise.float() * SIGMA_MAX
    cond_latents = cond_latents.float()
    batch, _, frames, height, width = latents.shape
    cond = torch.zeros(1, 1, frames, 1, 1, device=device)
    cond[:, :, :num_cond_latent_frames] = 1.0
    cond_mask = cond.expand(batch, 1, frames, height, width).to(dtype)
    padding_mask = latents.new_zeros(1, 1, *(pixel_size or (height * VAE_SPATIAL_FACTOR, width * VAE_SPATIAL_FACTOR)),
                                     dtype=dtype)
    sigma_cond = torch.tensor(SIGMA_CONDITIONING, dtype=torch.float32, device=device)
    t_cond = sigma_cond / (sigma_cond + 1)
    use_cfg = guidance_scale > 1.0
    text = torch.cat([prompt_embeds, negative_prompt_embeds]) if use_cfg else prompt_embeds
    copies = 2 if use_cfg else 1
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i]
        t = sigma / (sigma + 1)
        model_input = (cond * cond_latents + (1 - cond) * latents * (1 - t)).to(dtype)
        frame_t = (cond * t_cond + (1 - cond) * t.view(1, 1, 1, 1, 1)).expand(batch, 1, frames, 1, 1).to(dtype)
        velocity = transformer(hidden_states=model_input.repeat(copies, 1, 1, 1, 1),
                               timestep=frame_t.repeat(copies, 1, 1, 1, 1), encoder_hidden_states=text, fps=None,
                               condition_mask=cond_mask.repeat(copies, 1, 1, 1, 1), padding_mask=padding_mask,
                               return_dict=False)[0]
        x0 = ((1 - t) * latents.repeat(copies, 1, 1, 1, 1) - t * velocity.float()).to(dtype)
        x0 = cond * cond_latents.repeat(copies, 1, 1, 1, 1) + (1 - cond) * x0
        if use_cfg:
            x0_cond, x0_uncond = x0.chunk(2)
            x0 = x0_cond + guidance_scale * (x0_cond - x0_uncond)
        latents = scheduler.step((latents - x0) / sigma, timestep, latents, return_dict=False)[0]
    return latents


# ----------------------------------------------------------------------------------------------------------------
# Video output
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_to_frames(vae, latents):
    """Normalized latents [B, 16, T, h, w] -> uint8 frames [B, T, H, W, 3]."""
    video = vae.decode(denormalize_latents(latents.float(), vae.config).to(vae.dtype), return_dict=False)[0]
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()


def write_mp4(path, frames, fps):
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 with imageio-ffmpeg, atomically."""
    import imageio_ffmpeg  # imported here: training needs it only for validation videos

    frames = np.ascontiguousarray(frames)
    tmp = f"{path}.tmp.mp4"
    writer = imageio_ffmpeg.write_frames(tmp, (frames.shape[2], frames.shape[1]), fps=fps, codec="libx264",
                                         pix_fmt_out="yuv420p", macro_block_size=1, quality=8,
                                         output_params=["-loglevel", "error"])
    writer.send(None)
    for frame in frames:
        writer.send(frame.tobytes())
    writer.close()
    os.replace(tmp, path)


def contact_sheet(videos, frames_per_row=8):
    """One row of evenly spaced frames per video, as one image."""
    rows = []
    width = max(v.shape[2] for v in videos) * frames_per_row
    for video in videos:
        picks = np.linspace(0, len(video) - 1, frames_per_row).round().astype(int)
        row = np.concatenate(list(video[picks]), axis=1)
        rows.append(np.pad(row, ((0, 2), (0, width - row.shape[1]), (0, 0))))
    return np.concatenate(rows)
