"""The transformer's velocity prediction, called alike in training and by both families' samplers, and the pieces
the samplers share: the conditioning mask, the batched classifier-free guidance.
"""

import torch

from cosmos_video import VAE_SPATIAL_FACTOR


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
