"""Everything the two Cosmos model families the scripts fine-tune differ in, in one place: each family's prompt
encoder and sampler, and the `ModelFamily` the scripts ask (never testing which family they hold).

    predict2    nvidia/Cosmos-Predict2-2B-Video2World    Cosmos2VideoToWorldPipeline     T5-XXL [512, 1024]
    predict2.5  nvidia/Cosmos-Predict2.5-2B              Cosmos2_5_PredictBasePipeline   Qwen2.5-VL [512, 100352]
                (revision diffusers/base/post-trained)

The family is read once per process from the checkpoint's model_index.json `_class_name` (`detect_family`), never
from a flag, and passed down; `load_component` loads a checkpoint's components with it. Both share the transformer
class, the Wan2.1 VAE, the rectified-flow training objective (they differ in its defaults), the velocity prediction
(cosmos_sampling.py) and the LoRA files; they differ in the text encoder, the scheduler and sampling loop, which
input frames condition a video and how their VAE posterior is drawn.

Predict2.5's transformer first projects the 100352-wide text embedding to 1024 with its `crossattn_proj`
(Linear + GELU). While that projection is frozen, a cache can hold its output instead (100x smaller):
`take_text_projection` moves it out of the transformer so that projected embeddings pass straight through.

    ModelFamily         the interface: encode_prompts, denoise, video_frames, conditioning_latents, defaults
    FAMILIES            the two families by model_index.json `_class_name`
    detect_family       the family of a checkpoint
    load_component      one component of a checkpoint
    text projection     text_embed_kind/_width, take_text_projection, project_text, load_/prepare_text_projection
"""

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cosmos_sampling import conditioning_mask, guidance_text, guide, predict_velocity_per_text

TEXT_MAX_LENGTH = 512


# ----------------------------------------------------------------------------------------------------------------
# Predict2: T5 prompts, Euler on Karras sigmas (the math of diffusers' Cosmos2VideoToWorldPipeline, CFG batched)
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def encode_t5_prompts(tokenizer, text_encoder, prompts, device, dtype=None):
    """T5 embeddings [B, 512, D] with the positions past each prompt's length zeroed, as the pipeline does."""
    inputs = tokenizer(prompts, padding="max_length", max_length=TEXT_MAX_LENGTH, truncation=True, return_tensors="pt")
    mask = inputs.attention_mask.bool().to(device)
    embeds = text_encoder(inputs.input_ids.to(device), attention_mask=mask).last_hidden_state
    embeds = embeds.to(dtype or text_encoder.dtype)
    for i, length in enumerate(mask.sum(dim=1).tolist()):
        embeds[i, length:] = 0
    return embeds


SIGMA_MAX = 80.0
SIGMA_CONDITIONING = 1e-4


def set_sampling_schedule(scheduler, num_inference_steps, device):
    """Karras sigmas from 80 down to 0.002 as the pipeline sets them, with the last sigma repeated, on `device` (the
    timesteps stay on the CPU, see `keep_sigmas_on`). Returns how many steps change the latents: those before the
    first repeated sigma (dt = 0), counted on the CPU before the sigmas move."""
    scheduler.register_to_config(sigma_max=SIGMA_MAX, sigma_min=0.002, sigma_data=1.0, final_sigmas_type="sigma_min")
    scheduler.set_timesteps(sigmas=np.linspace(0, 1, num_inference_steps))
    scheduler.sigmas[-1] = scheduler.sigmas[-2]
    sigmas = scheduler.sigmas.tolist()
    moving_steps = next((i for i in range(num_inference_steps) if sigmas[i + 1] == sigmas[i]), num_inference_steps)
    keep_sigmas_on(scheduler, device)
    return moving_steps


def keep_sigmas_on(scheduler, device):
    """Move the scheduler's sigmas to `device` once, after set_timesteps (which leaves its timesteps and, for UniPC,
    its sigmas on the CPU), so that no step waits for the GPU.

    A step reads its sigmas on the device as views; a sigma on the CPU would be copied there at every step (UniPC's
    `.to(device)`), and a copy from pageable memory synchronizes the stream. The timesteps stay on the CPU: the
    scheduler only looks up its first step's index in them, which on the device would read a GPU value back. The
    values, and so the results, are the same either way.
    """
    scheduler.sigmas = scheduler.sigmas.to(device)


@contextlib.contextmanager
def solve_without_error_check():
    """torch.linalg.solve as linalg.solve_ex's result, without its check for a singular matrix, which waits for the
    GPU: solve is solve_ex plus that check, so the result is the same to the bit. UniPC's corrector solves for its
    coefficients at every step; its matrices (powers of distinct log-SNR ratios) are never singular."""
    solve = torch.linalg.solve
    torch.linalg.solve = lambda A, B, **kwargs: torch.linalg.solve_ex(A, B, **kwargs).result
    try:
        yield
    finally:
        torch.linalg.solve = solve


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
    the latents and the model is called that many times; the result is the pipeline's to the bit. No step waits for
    the GPU (the sigmas are on the device, the dt = 0 step is known in advance).
    `noise` is standard normal; it is scaled by sigma_max here. The transformer is called by `predict_velocity`.
    """
    dtype = getattr(transformer, "module", transformer).dtype  # DDP wraps the model in .module
    device = noise.device
    moving_steps = set_sampling_schedule(scheduler, num_inference_steps, device)
    latents = noise.float() * SIGMA_MAX
    cond_latents = cond_latents.float()
    batch, _, frames, _, _ = latents.shape
    cond = conditioning_mask(frames, num_cond_latent_frames, device)
    sigma_cond = torch.tensor(SIGMA_CONDITIONING, dtype=torch.float32, device=device)
    t_cond = sigma_cond / (sigma_cond + 1)
    text = guidance_text(prompt_embeds, negative_prompt_embeds, guidance_scale)
    copies = text.shape[0] // batch
    # the last sigma is repeated: its Euler step (dt = 0) leaves the latents as they are, so it gets no model call
    for i, timestep in enumerate(scheduler.timesteps[:moving_steps]):
        sigma = scheduler.sigmas[i]
        t = sigma / (sigma + 1)
        model_input = (cond * cond_latents + (1 - cond) * latents * (1 - t)).to(dtype)
        frame_t = (cond * t_cond + (1 - cond) * t.view(1, 1, 1, 1, 1)).expand(batch, 1, frames, 1, 1).to(dtype)
        velocity = predict_velocity_per_text(transformer, model_input, frame_t, text, cond)
        x0 = ((1 - t) * latents.repeat(copies, 1, 1, 1, 1) - t * velocity).to(dtype)
        x0 = guide(cond * cond_latents.repeat(copies, 1, 1, 1, 1) + (1 - cond) * x0, guidance_scale)
        latents = scheduler.step((latents - x0) / sigma, timestep, latents, return_dict=False)[0]
    return latents


# ----------------------------------------------------------------------------------------------------------------
# Predict2.5: Qwen2.5-VL prompts, UniPC on flow sigmas (the math of Cosmos2_5_PredictBasePipeline, CFG batched)
# ----------------------------------------------------------------------------------------------------------------
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
    `predict_velocity`, as in training. No step waits for the GPU (`keep_sigmas_on`, `solve_without_error_check`).
    """
    device = noise.device
    scheduler.set_timesteps(num_inference_steps)
    keep_sigmas_on(scheduler, device)
    latents = noise.float()
    cond_latents = cond_latents.float()
    batch, _, frames, _, _ = latents.shape
    cond = conditioning_mask(frames, num_cond_latent_frames, device)
    true_velocity = (latents - cond_latents) * cond
    text = guidance_text(prompt_embeds, negative_prompt_embeds, guidance_scale)
    copies = text.shape[0] // batch
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i]
        model_input = cond * cond_latents + (1 - cond) * latents
        frame_t = (cond * PREDICT25_CONDITIONING_TIMESTEP + (1 - cond) * t).expand(batch, 1, frames, 1, 1)
        velocity = predict_velocity_per_text(transformer, model_input, frame_t, text, cond)
        velocity = guide(true_velocity.repeat(copies, 1, 1, 1, 1) + velocity * (1 - cond), guidance_scale)
        with solve_without_error_check():
            latents = scheduler.step(velocity, timestep, latents, return_dict=False)[0]
    return latents


def first_frame_indices(num_source_frames, source_fps, num_frames, fps):
    """Source indices of up to `num_frames` frames at `fps` from the video's first frame, as many as it holds (the
    frames plan_bucket_clips picks for a clip starting at 0)."""
    indices = [round((j / fps) * source_fps) for j in range(num_frames)]
    return [i for i in indices if i < num_source_frames]


def last_frame_indices(num_source_frames, source_fps, num_frames, fps):
    """Source indices of the last `num_frames` frames at `fps`, ending at the video's last frame."""
    last = num_source_frames - 1
    indices = [last - round((num_frames - 1 - j) * source_fps / fps) for j in range(num_frames)]
    return [indices] if indices[0] >= 0 else []


# ----------------------------------------------------------------------------------------------------------------
# Recipes: the values of the flags train_cosmos_lora.py --recipe sets when the command line and --config leave them
# unset. `default` is this project's, the same for both families; `nvidia` is NVIDIA's LoRA post-training example
# for the family (docs/objective.md names the source of each value). A callable is computed from the arguments
# resolved before it.
# ----------------------------------------------------------------------------------------------------------------
DEFAULT_LORA_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


# Every linear of a block: self-attention, cross-attention, MLP (NVIDIA's q/k/v/output_proj, mlp.layer1/2).
BLOCK_LINEARS = [
    *(f"{attn}.{proj}" for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v", "to_out.0")),
    "ff.net.0.proj",
    "ff.net.2",
]


NVIDIA_LORA_LR = 2**-14.5  # the base lr of NVIDIA's LoRA configs; their schedules scale it by f_max / f_min


# --recipe: the values of the flags a recipe sets when the command line and --config leave them unset (None), per
# model family. `default` is this project's seed, `nvidia` NVIDIA's LoRA post-training example for the family;
# docs/objective.md names the source of each value. A callable is computed from the arguments resolved before it.
PROJECT_RECIPE = {
    "lora_rank": 16,
    "lora_alpha": 32,
    "lora_target_modules": DEFAULT_LORA_TARGETS,
    "use_temporal_adapters": True,
    "train_proj_out": True,
    "learning_rate": 1e-4,
    "adam_weight_decay": 0.01,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 0,
    "min_lr": 1e-6,
    "conditioning_frames": [1, 2],
    "ema_decay": 0.0,
}
RECIPE_NAMES = ("default", "nvidia")

# cosmos-predict2 predict2_video2world_lora_training_2b_cosmos_nemo_assets
NVIDIA_PREDICT2_RECIPE = {
    "lora_rank": 16,
    "lora_alpha": 16,
    "lora_target_modules": BLOCK_LINEARS,
    "use_temporal_adapters": False,
    "train_proj_out": False,
    "learning_rate": 0.6 * NVIDIA_LORA_LR,  # f_max 0.6
    "adam_weight_decay": 0.1,
    "lr_scheduler": "linear",  # no warm-up, linear to f_min 0 at the last step
    "lr_warmup_steps": 0,
    "min_lr": 0.0,
    "conditioning_frames": [1, 2],
    "ema_decay": "power",
}
# cosmos-predict2.5 predict2_lora_training_2b_cosmos_nemo_assets_txt
NVIDIA_PREDICT25_RECIPE = {
    "lora_rank": 32,
    "lora_alpha": 32,
    "lora_target_modules": BLOCK_LINEARS,
    "use_temporal_adapters": False,
    "train_proj_out": False,
    "learning_rate": 0.5 * NVIDIA_LORA_LR,  # f_max 0.5
    "adam_weight_decay": 0.001,
    "lr_scheduler": "linear",
    "lr_warmup_steps": 2000,
    "min_lr": lambda args: 0.4 * args.learning_rate,  # f_min 0.2 = 0.4 of f_max
    "conditioning_frames": [0, 1, 2],  # text2world, image2world, video2world, a third each
    "ema_decay": "power",
}


# ----------------------------------------------------------------------------------------------------------------
# The families
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelFamily:
    """Everything that differs between Cosmos-Predict2 and Cosmos-Predict2.5; the scripts ask this, never the name."""

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
    min_conditioning_frames: int  # 0: its pipeline also generates from text alone (text2world), so training may too
    nvidia_recipe: dict  # what --recipe nvidia sets

    def recipe(self, name):
        """The flag values of --recipe NAME for this family."""
        return PROJECT_RECIPE if name == "default" else self.nvidia_recipe

    def default_negative_prompt(self):
        import importlib

        return importlib.import_module(self.pipeline_module).DEFAULT_NEGATIVE_PROMPT

    def video_frames(self, num_source_frames, source_fps, num_frames, num_cond_frames, fps):
        """(source frame indices to read from a video input at `fps`, whether they are its ground truth).

        The first `num_cond_frames` of them condition the generation of `num_frames` frames (one clip, or a whole
        rollout of chained clips). Predict2 takes the video's first frames and, as ground truth, as many of the
        `num_frames` frames as the video holds (all of them, or fewer where it is too short); Predict2.5 its last
        frames, as its pipeline does (the generation continues the video, without ground truth). None: the video
        is too short to condition on.
        """
        if self.conditioning_side == "last":
            planned = last_frame_indices(num_source_frames, source_fps, num_cond_frames, fps)
            return (planned[0] if planned else None), False
        indices = first_frame_indices(num_source_frames, source_fps, num_frames, fps)
        return (indices if len(indices) >= num_cond_frames else None), True

    def conditioning_latents(self, posterior, clip_shape, num_cond_latent_frames, generator):
        """The conditioning latent frames (not normalized) from the VAE posterior of the conditioning frames, as the
        family's pipeline draws them: Predict2 a sample with the job's generator, its noise drawn for the whole clip
        `clip_shape` as the pipeline draws it (so the generator then draws the same starting noise); Predict2.5 the
        posterior's mode."""
        if self.conditioning_posterior == "mode":
            return posterior.mode()
        from diffusers.utils.torch_utils import randn_tensor

        mean = posterior.mean
        noise = randn_tensor(clip_shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + posterior.std * noise[:, :, :num_cond_latent_frames]


FAMILIES = {
    "Cosmos2VideoToWorldPipeline": ModelFamily(
        name="predict2",
        pipeline_class="Cosmos2VideoToWorldPipeline",
        pipeline_module="diffusers.pipelines.cosmos.pipeline_cosmos2_video2world",
        text_encoder_class="T5EncoderModel",
        scheduler_class="FlowMatchEulerDiscreteScheduler",
        encode_prompts=encode_t5_prompts,
        denoise=denoise_video2world,
        num_inference_steps=35,
        conditioning_side="first",
        conditioning_posterior="sample",
        conditioning_timestep=SIGMA_CONDITIONING / (1 + SIGMA_CONDITIONING),
        timestep_shift="auto",  # sqrt(latent frames of each clip): NVIDIA's sqrt(state_t)
        high_sigma_ratio=0.05,
        min_conditioning_frames=1,  # the pipeline needs an image or a video
        nvidia_recipe=NVIDIA_PREDICT2_RECIPE,
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
        min_conditioning_frames=0,  # image=None, video=None is the pipeline's Text2World
        nvidia_recipe=NVIDIA_PREDICT25_RECIPE,
    ),
}


def recorded_family(record):
    """The family name a fine-tune's adapter_config.json records; configs written before it did are Predict2's."""
    return record.get("family", FAMILIES["Cosmos2VideoToWorldPipeline"].name)


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


def load_component(path, name, revision=None, dtype=None, *, family):
    """One component (transformer, vae, text_encoder, tokenizer, scheduler) of a checkpoint of `family` (detected
    once per process by `detect_family`); every script loads through here. `dtype` applies to the models."""
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


def load_text_projection(path, revision, family, kind, device, dtype):
    """For a cache of projected embeddings: the checkpoint's frozen crossattn_proj and its weight hash (None, None
    for any other kind)."""
    if kind != "projected":
        return None, None
    transformer = load_component(path, "transformer", revision, dtype, family=family)
    projection = take_text_projection(transformer)
    return projection.to(device).eval().requires_grad_(False), projection_sha(projection)


def prepare_text_projection(transformer, text_embeds):
    """For a cache of projected Predict2.5 embeddings: check that it fits this transformer's crossattn_proj, take the
    projection out of the transformer (the embeddings are its output already) and return the embedding of a dropped
    caption, crossattn_proj(0). None for caches of T5 or full embeddings (their dropped caption is zeros)."""
    if text_embeds["kind"] != "projected":
        return None
    projection = transformer.crossattn_proj
    if any(p.requires_grad for p in projection.parameters()):
        raise ValueError(
            "the cache holds crossattn_proj outputs, but crossattn_proj trains in this run (--lora_target_modules); "
            "re-cache with cache_latents.py --text_embeds full"
        )
    if projection_sha(projection) != text_embeds["projection_sha"]:
        raise ValueError(
            "the cache's text embeddings were projected with another crossattn_proj than this model's; "
            "re-cache with this model (or --text_embeds full)"
        )
    null_text = null_text_embedding(transformer, "projected")
    take_text_projection(transformer)
    return null_text
