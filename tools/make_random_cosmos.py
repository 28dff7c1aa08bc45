#!/usr/bin/env python
"""Write a random-weight Cosmos-Predict2 Video2World or Cosmos-Predict2.5 checkpoint in diffusers format.

The directory has the same layout as `nvidia/Cosmos-Predict2-2B-Video2World` or `nvidia/Cosmos-Predict2.5-2B`
(model_index.json, transformer/, vae/, text_encoder/, tokenizer/, scheduler/), built from the real classes, so every
script opens it with the code that opens the real model. Nothing is downloaded: the tokenizer is trained here on a
few sentences (Predict2.5: a byte-level BPE with a Qwen-style chat template).

    python tools/make_random_cosmos.py --size tiny --output_dir checkpoints/tiny-cosmos
    python tools/make_random_cosmos.py --family predict2.5 --size 2b --output_dir /scratch/random-cosmos25-2b
"""

import argparse
import json
import os
import sys

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2TokenizerFast,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cosmos_cli import HelpFormatter  # noqa: E402

# `2b` is the transformer of Cosmos-Predict2-2B-Video2World (diffusers' convert_cosmos_to_diffusers.py).
# `tiny` keeps its hidden size (96) above a 2x2 patch's 64 latent values, so it can learn to denoise one clip exactly.
TRANSFORMER_CONFIGS = {
    "tiny": dict(
        in_channels=17,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=48,
        num_layers=2,
        mlp_ratio=2.0,
        text_embed_dim=32,
        adaln_lora_dim=4,
        max_size=(32, 64, 64),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    ),
    "2b": dict(
        in_channels=17,
        out_channels=16,
        num_attention_heads=16,
        attention_head_dim=128,
        num_layers=28,
        mlp_ratio=4.0,
        text_embed_dim=1024,
        adaln_lora_dim=256,
        max_size=(128, 240, 240),
        patch_size=(1, 2, 2),
        rope_scale=(1.0, 3.0, 3.0),
        concat_padding_mask=True,
        extra_pos_embed_type=None,
    ),
}
# `2b` keeps the Wan2.1 VAE at its default (real) size; `tiny` shrinks its widths only.
VAE_CONFIGS = {
    "tiny": dict(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ),
    "2b": dict(),
}
# A small T5 is enough for random weights: what the transformer sees is the embedding shape [512, d_model].
T5_CONFIGS = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8),
    "2b": dict(d_model=1024, d_kv=64, d_ff=2048, num_layers=2, num_heads=16),
}
# Predict2.5 adds a crossattn_proj from the Qwen2.5-VL embedding (layers x hidden wide) to text_embed_dim.
PREDICT25_TRANSFORMER = {
    "tiny": dict(use_crossattn_projection=True, crossattn_proj_in_channels=64, encoder_hidden_states_channels=32),
    "2b": dict(use_crossattn_projection=True, crossattn_proj_in_channels=100352, encoder_hidden_states_channels=1024),
}
# The transformer sees num_hidden_layers x hidden_size values per token: 2 x 32 (tiny); 28 x 3584 = 100352 (2b), the
# real Qwen2.5-VL-7B's layers and width with a small MLP and vocabulary (1.0 B parameters instead of 8.3 B).
QWEN_TEXT_CONFIGS = {
    "tiny": dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
    ),
    "2b": dict(
        hidden_size=3584, intermediate_size=512, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4
    ),
}
# The real ones' M-RoPE split of each head's rotary half: 16 + 24 + 24 = 64 of head_dim 128.
QWEN_MROPE_SECTIONS = {"tiny": [2, 3, 3], "2b": [16, 24, 24]}
# A Qwen-format chat template for text and video parts (the pipeline passes content as a list of {"type": "text"}
# parts; caption_clips.py adds a {"type": "video"} part, which Qwen2.5-VL's template writes as these three tokens).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The vision tokens are in the vocabulary, as in Qwen2.5-VL's, so the text encoder also runs as a video captioner.
QWEN_VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *QWEN_VISION_TOKENS]
TOKENIZER_CORPUS = [
    "An egocentric video of a worker's hands assembling parts at a factory bench.",
    "The camera pans slowly to the left while striped shapes move across a textured wall.",
    "A first person view of a person picking up a tool and placing it in a box.",
    "Checkered and striped objects slide and bounce in front of a moving background.",
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--family",
        choices=["predict2", "predict2.5"],
        default="predict2",
        help="Cosmos-Predict2 Video2World (T5, Cosmos2VideoToWorldPipeline) or Cosmos-Predict2.5 (Qwen2.5-VL, "
        "Cosmos2_5_PredictBasePipeline).",
    )
    parser.add_argument(
        "--size",
        choices=sorted(TRANSFORMER_CONFIGS),
        default="tiny",
        help="`tiny` for CPU tests and the demo; `2b` for the exact 2B transformer config of the family and the "
        "full Wan2.1 VAE (GPU benchmarks).",
    )
    parser.add_argument("--output_dir", required=True, help="Directory to write the diffusers-format checkpoint to.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default=None,
        help="Storage dtype of the weights. Default: float32 for tiny, bfloat16 for 2b.",
    )
    return parser.parse_args(argv)


def build_tokenizer(vocab_size=200):
    """Train a small Unigram tokenizer offline and wrap it as the T5 tokenizer class the pipeline uses."""
    backend = Tokenizer(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    return T5TokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
        model_max_length=512,
    )


def build_qwen_tokenizer(vocab_size=300):
    """Train a small byte-level BPE offline and wrap it as the Qwen2 tokenizer class, with a chat template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=QWEN_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|im_end|>", model_max_length=512
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_qwen_text_encoder(size, tokenizer):
    """A Qwen2_5_VLForConditionalGeneration with a one-block vision tower (the pipeline uses only its text part;
    caption_clips.py uses all of it)."""
    vocab_size = len(tokenizer)
    text = dict(
        QWEN_TEXT_CONFIGS[size],
        vocab_size=vocab_size,
        max_position_embeddings=1024,
        bos_token_id=0,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": QWEN_MROPE_SECTIONS[size]},
    )
    vision = dict(
        depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=text["hidden_size"],
        fullatt_block_indexes=[0],
    )  # fmt: skip
    token = tokenizer.convert_tokens_to_ids
    ids = dict(
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
    )
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
    return Qwen2_5_VLForConditionalGeneration(config)


def build_components(family, size, seed):
    # Imported here: the tokenizers and text encoders above build without diffusers (benchmarks/bench_caption.py).
    from diffusers import (
        AutoencoderKLWan,
        CosmosTransformer3DModel,
        FlowMatchEulerDiscreteScheduler,
        UniPCMultistepScheduler,
    )

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**VAE_CONFIGS[size])
    if family == "predict2":
        transformer = CosmosTransformer3DModel(**TRANSFORMER_CONFIGS[size])
        tokenizer = build_tokenizer()
        text_encoder = T5EncoderModel(T5Config(vocab_size=1000, **T5_CONFIGS[size]))
        scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    else:  # the scheduler is the one diffusers' convert_cosmos_to_diffusers.py writes for Predict2.5
        transformer = CosmosTransformer3DModel(**TRANSFORMER_CONFIGS[size], **PREDICT25_TRANSFORMER[size])
        tokenizer = build_qwen_tokenizer()
        text_encoder = build_qwen_text_encoder(size, tokenizer)
        scheduler = UniPCMultistepScheduler(
            use_karras_sigmas=True,
            use_flow_sigmas=True,
            prediction_type="flow_prediction",
            sigma_max=200.0,
            sigma_min=0.01,
        )
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_model_index(output_dir, family):
    import diffusers

    pipeline, text_encoder, tokenizer, scheduler = {
        "predict2": (
            "Cosmos2VideoToWorldPipeline",
            "T5EncoderModel",
            "T5TokenizerFast",
            "FlowMatchEulerDiscreteScheduler",
        ),
        "predict2.5": (
            "Cosmos2_5_PredictBasePipeline",
            "Qwen2_5_VLForConditionalGeneration",
            "Qwen2TokenizerFast",
            "UniPCMultistepScheduler",
        ),
    }[family]
    index = {
        "_class_name": pipeline,
        "_diffusers_version": diffusers.__version__,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", text_encoder],
        "tokenizer": ["transformers", tokenizer],
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    with open(os.path.join(output_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main(args):
    dtype = getattr(torch, args.dtype or ("float32" if args.size == "tiny" else "bfloat16"))
    components = build_components(args.family, args.size, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module) and dtype != torch.float32:
            component.to(dtype)
        component.save_pretrained(os.path.join(args.output_dir, name))
    write_model_index(args.output_dir, args.family)
    num_params = sum(p.numel() for p in components["transformer"].parameters())
    print(
        f"wrote {args.size} random Cosmos-{args.family.capitalize()} checkpoint "
        f"({num_params / 1e6:.2f} M transformer parameters, "
        f"{str(dtype).removeprefix('torch.')}) to {args.output_dir}"
    )


if __name__ == "__main__":
    main(parse_args())
