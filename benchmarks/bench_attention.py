#!/usr/bin/env python
"""Self-attention alone at Cosmos' shapes: each PyTorch SDPA backend that runs here, in ms and TFLOP/s.

Also SageAttention (`pip install sageattention`, INT8 QK^T and FP16 PV in Triton) when it is installed, with the
relative L2 error of its output against cuDNN's. --tokens adds token counts (for instance around a multiple of
cuDNN's 128-token tile); at a count that is not such a multiple, ALIGNMENTS time cuDNN with the queries padded to
the next multiple, the keys split at the last one, or both (tile_aligned_attention).

One call of the 2B model's self-attention: batch 2 (the conditional and unconditional passes of a sampling step),
16 heads of 128, bf16, at the latent token counts of the reference clip (61x256x448: 16x16x28 = 7,168 tokens),
NVIDIA's "480p" (93x432x768: 24x27x48 = 31,104) and 93x480x832 (24x30x52 = 37,440). FLOPs are 4 * B * H * N^2 * d
(QK^T and PV), forward only.

    python benchmarks/bench_attention.py --out results/
"""

import argparse
import functools
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cosmos_cli import HelpFormatter  # noqa: E402
from cosmos_process import run_main  # noqa: E402

SHAPES = {"61x256x448": 7168, "93x432x768": 31104, "93x480x832": 37440}
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def sage_attention():
    """SageAttention's sageattn(q, k, v) on [B, H, N, d], or None when it is not installed."""
    try:
        from sageattention import sageattn
    except ImportError:
        return None
    # it subtracts k's mean from k in place (smooth_k), so it gets a copy
    return lambda q, k, v: sageattn(q, k.clone(), v, tensor_layout="HND")


def time_ms(fn, repeats):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def time_against_cudnn(attend, q, k, v, flops, repeats):
    """attend(q, k, v)'s ms and TFLOP/s, and the relative L2 error of its output against cuDNN's."""
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        reference = torch.nn.functional.scaled_dot_product_attention(q, k, v).float()
    error = (attend(q, k, v).float() - reference).norm() / reference.norm()
    ms = time_ms(functools.partial(attend, q, k, v), repeats)
    return {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1), "relative_l2_vs_cudnn": round(float(error), 5)}


def tile_aligned_attention(q, k, v, pad_queries=False, split_keys=False, tile=128):
    """cuDNN attention with the ragged end of cuDNN's 128-token tile taken out of the way.

    pad_queries: the queries padded with zeros to a multiple of `tile`, their extra outputs dropped (each query's
    output depends on that query alone). split_keys: the keys [:n] and [n:] with n a multiple of `tile` in two calls,
    merged by their log-sum-exp: o = (o1 * exp(l1) + o2 * exp(l2)) / (exp(l1) + exp(l2))."""
    tokens = q.shape[2]
    if pad_queries:
        q = torch.nn.functional.pad(q, (0, 0, 0, -tokens % tile))
    if not split_keys:
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)[:, :, :tokens]
    n = k.shape[2] // tile * tile
    attend = torch.ops.aten._scaled_dot_product_cudnn_attention
    o1, l1 = attend(q, k[:, :, :n].contiguous(), v[:, :, :n].contiguous(), None, True)[:2]
    o2, l2 = attend(q, k[:, :, n:].contiguous(), v[:, :, n:].contiguous(), None, True)[:2]
    w1 = torch.sigmoid(l1 - l2).view(*o1.shape[:3], 1)  # exp(l1) / (exp(l1) + exp(l2))
    return (o1 * w1 + o2 * (1 - w1)).to(q.dtype)[:, :, :tokens]


ALIGNMENTS = {
    "cudnn_pad_queries": dict(pad_queries=True),
    "cudnn_split_keys": dict(split_keys=True),
    "cudnn_pad_queries_split_keys": dict(pad_queries=True, split_keys=True),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="Where attention_results.json goes.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per backend and shape.")
    parser.add_argument("--tokens", type=int, nargs="*", default=[], help="Token counts to time besides the clips'.")
    return parser.parse_args()


def main(cli):
    if not torch.cuda.is_available():
        raise ValueError("bench_attention.py times attention on a GPU, and none is visible")
    batch, heads, head_dim = 2, 16, 128
    results = {"device": torch.cuda.get_device_name(0), "batch": batch, "heads": heads, "head_dim": head_dim}
    sage = sage_attention()
    shapes = {**SHAPES, **{f"{n}_tokens": n for n in cli.tokens}}
    for shape, tokens in shapes.items():
        q, k, v = (torch.randn(batch, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * batch * heads * tokens**2 * head_dim
        for name, backend in BACKENDS.items():

            def attend(backend=backend, q=q, k=k, v=v):
                with sdpa_kernel(backend):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)

            try:
                ms = time_ms(attend, cli.repeats)
                results[f"{shape}_{name}"] = {"ms": round(ms, 2), "tflops": round(flops / ms / 1e9, 1)}
            except RuntimeError as error:  # a backend that does not support this GPU or shape
                results[f"{shape}_{name}"] = {"error": str(error).splitlines()[0][:200]}
            print(shape, name, results[f"{shape}_{name}"], flush=True)
        if sage is not None:
            try:
                results[f"{shape}_sage"] = time_against_cudnn(sage, q, k, v, flops, cli.repeats)
            except Exception as error:  # a Triton build that does not support this GPU
                results[f"{shape}_sage"] = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
            print(shape, "sage", results[f"{shape}_sage"], flush=True)
        for name, alignment in ALIGNMENTS.items() if tokens % 128 else ():
            try:
                attend = functools.partial(tile_aligned_attention, **alignment)
                results[f"{shape}_{name}"] = time_against_cudnn(attend, q, k, v, flops, cli.repeats)
            except RuntimeError as error:
                results[f"{shape}_{name}"] = {"error": str(error).splitlines()[0][:200]}
            print(shape, name, results[f"{shape}_{name}"], flush=True)
    os.makedirs(cli.out, exist_ok=True)
    with open(os.path.join(cli.out, "attention_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    run_main(main, parse_args)
