#!/usr/bin/env python
"""Write a random-weight Cosmos-Predict2 Video2World checkpoint in diffusers format.

The directory has the same layout as `nvidia/Cosmos-Predict2-2B-Video2World` (model_index.json, transformer/,
vae/, text_encoder/, tokenizer/, scheduler/), so every script opens it with the code that opens the real model.
Nothing is downloaded: the tokenizer is trained here on a few sentences.

    python tools/make_random_cosmos.py --size tiny --output_dir checkpoints/tiny-cosmos
    python tools/make_random_cosmos.py --size 2b --output_dir /scratch/random-cosmos-2b
"""

import argparse
import json
import os

import torch
from diffusers import AutoencoderKLWan, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import T5Config, T5EncoderModel, T5TokenizerFast

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
TOKENIZER_CORPUS = [
    "An egocentric video of a worker's hands assembling parts at a factory bench.",
    "The camera pans slowly to the left while striped shapes move across a textured wall.",
    "A first person view of a person picking up a tool and placing it in a box.",
    "Checkered and striped objects slide and bounce in front of a moving background.",
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size",
        choices=sorted(TRANSFORMER_CONFIGS),
        default="tiny",
        help="`tiny` for CPU tests and the demo; `2b` for the exact Cosmos-Predict2-2B transformer "
        "config and the full Wan2.1 VAE (GPU benchmarks).",
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


def build_components(size, seed):
    torch.manual_seed(seed)
    transformer = CosmosTransformer3DModel(**TRANSFORMER_CONFIGS[size])
    vae = AutoencoderKLWan(**VAE_CONFIGS[size])
    tokenizer = build_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=1000, **T5_CONFIGS[size]))
    scheduler = FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True)
    return dict(transformer=transformer, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def write_model_index(output_dir):
    import diffusers

    index = {
        "_class_name": "Cosmos2VideoToWorldPipeline",
        "_diffusers_version": diffusers.__version__,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "CosmosTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    with open(os.path.join(output_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def main(args):
    dtype = getattr(torch, args.dtype or ("float32" if args.size == "tiny" else "bfloat16"))
    components = build_components(args.size, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    for name, component in components.items():
        if isinstance(component, torch.nn.Module) and dtype != torch.float32:
            component.to(dtype)
        component.save_pretrained(os.path.join(args.output_dir, name))
    write_model_index(args.output_dir)
    num_params = sum(p.numel() for p in components["transformer"].parameters())
    print(
        f"wrote {args.size} random Cosmos-Predict2 checkpoint ({num_params / 1e6:.2f} M transformer parameters, "
        f"{str(dtype).removeprefix('torch.')}) to {args.output_dir}"
    )


if __name__ == "__main__":
    main(parse_args())
