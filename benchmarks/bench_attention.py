#!/usr/bin/env python
"""Self-attention alone at Cosmos' shapes: each PyTorch SDPA backend that runs here, in ms and TFLOP/s.

One call of the 2B model's self-attention: batch 2 (the conditional and unconditional passes of a sampling step),
16 heads of 128, bf16, at the latent token counts of the reference clip (61x256x448: 16x16x28 = 7,168 tokens),
NVIDIA's "480p" (93x432x768: 24x27x48 = 31,104) and 93x480x832 (24x30x52 = 37,440). FLOPs are 4 * B * H * N^2 * d
(QK^T and PV), forward only.

    python benchmarks/bench_attention.py --out results/
"""

import argparse
import json
import os

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"61x256x448": 7168, "93x432x768": 31104, "93x480x832": 37440}
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def time_ms(fn, repeats):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Where attention_results.json goes.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per backend and shape.")
    cli = parser.parse_args()
    batch, heads, head_dim = 2, 16, 128
    results = {"device": torch.cuda.get_device_name(0), "batch": batch, "heads": heads, "head_dim": head_dim}
    for shape, tokens in SHAPES.items():
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
    os.makedirs(cli.out, exist_ok=True)
    with open(os.path.join(cli.out, "attention_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
