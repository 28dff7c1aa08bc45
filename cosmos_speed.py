"""Speed options that leave the numbers (per-frame AdaLN) or the weights (FP8 matmuls) as they are."""

import importlib.util
import re

import torch

from cosmos_adapters import count_frames_for


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
