"""What differs between the two Cosmos model families the scripts fine-tune, in one place, and the one function that
loads a checkpoint's components.

    predict2    nvidia/Cosmos-Predict2-2B-Video2World    Cosmos2VideoToWorldPipeline     T5-XXL [512, 1024]
    predict2.5  nvidia/Cosmos-Predict2.5-2B              Cosmos2_5_PredictBasePipeline   Qwen2.5-VL [512, 100352]
                (revision diffusers/base/post-trained)

The family is read from the checkpoint's model_index.json `_class_name`, never from a flag. Both share the
transformer class, the Wan2.1 VAE, the rectified-flow training objective (they differ in its defaults) and the LoRA
files; they differ in the text encoder, the scheduler and sampling loop, and which input frames condition a video.

Predict2.5's transformer first projects the 100352-wide text embedding to 1024 with its `crossattn_proj`
(Linear + GELU). While that projection is frozen, a cache can hold its output instead (100x smaller):
`take_text_projection` moves it out of the transformer so that projected embeddings pass straight through.
"""

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cosmos_model import (
    SIGMA_CONDITIONING,
    TEXT_MAX_LENGTH,
    conditioning_mask,
    denoise_video2world,
    encode_prompts,
    guidance_text,
    guide,
    predict_velocity_per_text,
)

PREDICT25_CONDITIONING_TIMESTEP = 1e-4
QWEN_SYSTEM_PROMPT = "You are a helpful assistant who will provide prompts to an image generator."


@torch.no_grad()
def encode_qwen_prompts(tokenizer, text_encoder, prompts, device, dtype=None):
    """Qwen2.5-VL embeddings [B, 512, layers * hidden] exactly as Cosmos2_5_PredictBasePipeline computes them.

    Each prompt goes through the chat template with the pipeline's system message (no generation prompt), padded and
    truncated to 512 tokens; the encoder runs without an attention mask; every decoder layer's hidden states
    (hidden_states[1:]) are normalized per token, (h - mean) / (std + 1e-8), and concatenated.
    """
    ids = []
    for prompt in prompts:
        conversation = [
            {"role": "system", "content": [{"type": "text", "text": QWEN_SYSTEM_PROMPT}]},
            {"role": "user", "content": [{"type": "text", "text": prompt}]},
        ]
        encoded = tokenizer.apply_chat_template(
            conversation,
            tokenize=True,
            add_generation_prompt=False,
            add_vision_id=False,
            max_length=TEXT_MAX_LENGTH,
            truncation=True,
            padding="max_length",
            return_dict=True,
        )
        ids.append(encoded["input_ids"])
    hidden_states = text_encoder(torch.tensor(ids, device=device), output_hidden_states=True).hidden_states[1:]
    layers = [(h - h.mean(dim=-1, keepdim=True)) / (h.std(dim=-1, keepdim=True) + 1e-8) for h in hidden_states]
    return torch.cat(layers, dim=-1).to(dtype or text_encoder.dtype)


@torch.no_grad()
def denoise_flow_unipc(
    transformer,
    scheduler,
    noise,
    cond_latents,
    num_cond_latent_frames,
    prompt_embeds,
    negative_prompt_embeds=None,
    guidance_scale=7.0,
    num_inference_steps=36,
):
    """Cosmos-Predict2.5 generation: normalized latents [B, 16, T, h, w] from noise and clean conditioning frames.

    The checkpoint's UniPCMultistepScheduler (flow prediction) walks Karras sigmas from 200 to 0.01 mapped to flow
    sigmas s / (1 + s). At each flow sigma t the transformer sees the conditioning frames clean (timestep 1e-4, the
    pipeline's `conditional_frame_timestep`) and the latents elsewhere (timestep t); on the conditioning frames its
    velocity is replaced by the true one, noise - z_cond (the starting noise); CFG is v_c + g * (v_c - v_u), both
    passes batched.
    `noise` is standard normal and is the starting latent (t = 0.995). The transformer is called by
    `predict_velocity`, as in training.
    """
    device = noise.device
    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = noise.float()
    cond_latents = cond_latents.float()
    batch, _, frames, _, _ = latents.shape
    cond = conditioning_mask(frames, num_cond_latent_frames, device)
    true_velocity = (latents - cond_latents) * cond
    text = guidance_text(prompt_embeds, negative_prompt_embeds, guidance_scale)
    copies = text.shape[0] // batch
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].to(device=device, dtype=torch.float32)
        model_input = cond * cond_latents + (1 - cond) * latents
        frame_t = (cond * PREDICT25_CONDITIONING_TIMESTEP + (1 - cond) * t).expand(batch, 1, frames, 1, 1)
        velocity = predict_velocity_per_text(transformer, model_input, frame_t, text, cond)
        velocity = guide(true_velocity.repeat(copies, 1, 1, 1, 1) + velocity * (1 - cond), guidance_scale)
        latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return latents


@dataclass(frozen=True)
class ModelFamily:
    """Everything that differs between Cosmos-Predict2 and Cosmos-Predict2.5."""

    name: str
    pipeline_class: str  # model_index.json `_class_name`, also the diffusers pipeline the parity tests compare with
    pipeline_module: str  # where that pipeline and its DEFAULT_NEGATIVE_PROMPT live
    text_encoder_class: str  # transformers class of text_encoder/
    scheduler_class: str  # diffusers class of scheduler/
    encode_prompts: Callable  # (tokenizer, text_encoder, prompts, device, dtype=None) -> [B, 512, D]
    denoise: Callable  # the sampling loop, see denoise_video2world / denoise_flow_unipc
    num_inference_steps: int  # the pipeline's default
    conditioning_side: str  # which frames of an input video condition the generation: "first" or "last"
    conditioning_posterior: str  # VAE posterior the sampler encodes conditioning frames with: "sample" or "mode"
    conditioning_timestep: float  # t on clean conditioning frames, in training and in the pipeline's sampler
    timestep_shift: float | str  # training noise level t = s*t0 / (1 + (s-1)*t0), t0 = sigmoid(N(0, 1))
    high_sigma_ratio: float  # NVIDIA's share of samples at sigma in [200, 1e5] (--high_sigma_ratio)

    def default_negative_prompt(self):
        import importlib

        return importlib.import_module(self.pipeline_module).DEFAULT_NEGATIVE_PROMPT


FAMILIES = {
    "Cosmos2VideoToWorldPipeline": ModelFamily(
        name="predict2",
        pipeline_class="Cosmos2VideoToWorldPipeline",
        pipeline_module="diffusers.pipelines.cosmos.pipeline_cosmos2_video2world",
        text_encoder_class="T5EncoderModel",
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        encode_prompts=encode_prompts,
        denoise=denoise_video2world,
        num_inference_steps=35,
        conditioning_side="first",
        conditioning_posterior="sample",
        conditioning_timestep=SIGMA_CONDITIONING / (1 + SIGMA_CONDITIONING),
        timestep_shift="auto",  # sqrt(latent frames of each clip): NVIDIA's sqrt(state_t)
        high_sigma_ratio=0.05,
    ),
    "Cosmos2_5_PredictBasePipeline": ModelFamily(
        name="predict2.5",
        pipeline_class="Cosmos2_5_PredictBasePipeline",
        pipeline_module="diffusers.pipelines.cosmos.pipeline_cosmos2_5_predict",
        text_encoder_class="Qwen2_5_VLForConditionalGeneration",
        scheduler_class="UniPCMultistepScheduler",
        encode_prompts=encode_qwen_prompts,
        denoise=denoise_flow_unipc,
        num_inference_steps=36,
        conditioning_side="last",
        conditioning_posterior="mode",
        conditioning_timestep=PREDICT25_CONDITIONING_TIMESTEP,
        timestep_shift=5.0,
        high_sigma_ratio=0.0,
    ),
}
FAMILY_NAMES = {family.name: family for family in FAMILIES.values()}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------
def detect_family(path, revision=None):
    """The family of a diffusers checkpoint (hub id or local dir), from its model_index.json `_class_name`."""
    from diffusers import DiffusionPipeline

    try:
        index = DiffusionPipeline.load_config(path, revision=revision)
    except OSError as error:
        raise FileNotFoundError(f"{path} is not a diffusers checkpoint: {str(error).splitlines()[0]}") from None
    name = index.get("_class_name")
    if name not in FAMILIES:
        raise ValueError(f"{path} is a {name} checkpoint; these scripts take {' or '.join(FAMILIES)}")
    return FAMILIES[name]


def component_class(family, name):
    import diffusers
    import transformers

    classes = {
        "transformer": diffusers.CosmosTransformer3DModel,
        "vae": diffusers.AutoencoderKLWan,
        "scheduler": getattr(diffusers, family.scheduler_class),
        "text_encoder": getattr(transformers, family.text_encoder_class),
        "tokenizer": transformers.AutoTokenizer,
    }
    return classes[name]


def load_component(path, name, revision=None, dtype=None, family=None):
    """One component (transformer, vae, text_encoder, tokenizer, scheduler) of a checkpoint; every script loads
    through here. `dtype` applies to the models."""
    family = family or detect_family(path, revision)
    kwargs = {"subfolder": name, "revision": revision}
    if dtype is not None and name in ("transformer", "vae", "text_encoder"):
        kwargs["torch_dtype"] = dtype
    return component_class(family, name).from_pretrained(path, **kwargs)


def load_component_config(path, name, revision=None):
    """The config dict of the transformer or the VAE, without loading weights."""
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel

    cls = {"transformer": CosmosTransformer3DModel, "vae": AutoencoderKLWan}[name]
    return cls.load_config(path, subfolder=name, revision=revision)


# ----------------------------------------------------------------------------------------------------------------
# The text projection of Predict2.5
# ----------------------------------------------------------------------------------------------------------------
TEXT_EMBED_KINDS = ("t5", "projected", "full")


def text_embed_kind(transformer_config, choice):
    """What a cache stores: "t5" (Predict2), else "projected" (crossattn_proj output) or "full" (raw Qwen)."""
    if not transformer_config.get("use_crossattn_projection"):
        return "t5"
    return choice


def text_embed_width(transformer_config, kind):
    if kind == "full":
        return transformer_config["crossattn_proj_in_channels"]
    if kind == "projected":
        return transformer_config["encoder_hidden_states_channels"]
    return transformer_config["text_embed_dim"]


def projection_sha(projection):
    """sha256 of a crossattn_proj's weights rounded to bfloat16, so fp32 and bf16 loads of one checkpoint agree."""
    digest = hashlib.sha256()
    for name, tensor in sorted(projection.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def take_text_projection(transformer):
    """Move Predict2.5's `crossattn_proj` out of the transformer (an Identity takes its place) and return it.

    The transformer then takes already-projected [B, 512, 1024] embeddings; `project_text` projects raw ones. For
    Predict2 (no projection) this changes nothing and returns None.
    """
    projection = getattr(transformer, "crossattn_proj", None)
    if projection is not None:
        transformer.crossattn_proj = torch.nn.Identity()
    return projection


def project_text(projection, embeds):
    """Project raw Qwen embeddings with a taken-out crossattn_proj; projected (or T5) embeddings pass unchanged."""
    if projection is None or embeds.shape[-1] != projection[0].in_features:
        return embeds
    weight = projection[0].weight
    return projection(embeds.to(weight.device, weight.dtype))


def null_text_embedding(transformer, kind):
    """The embedding of a dropped caption, [1, 1, D]: zeros before the projection, so crossattn_proj(0) when the
    cache holds projected embeddings (GELU of its bias), zeros otherwise."""
    projection = getattr(transformer, "crossattn_proj", None)
    if kind != "projected":
        return None
    zeros = torch.zeros(1, 1, projection[0].in_features, device=projection[0].weight.device)
    with torch.no_grad():
        return projection(zeros.to(projection[0].weight.dtype)).float()
