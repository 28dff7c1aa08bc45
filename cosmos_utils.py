"""Code shared by cache_latents.py, train_cosmos_lora.py and sample.py.

Only what two scripts truly share lives here: clip geometry checks, frame cropping, T5 prompt encoding,
latent (de)normalization, reading the latent cache, and the temporal adapters with their save/load functions.
"""

import hashlib
import json
import os

import torch
import torch.nn.functional as F

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
