#!/usr/bin/env python
"""Where one training step's GPU time goes: matmuls, attention, elementwise, communication.

Runs train_cosmos_lora.py's own model setup and loss on one GPU (bf16 frozen weights, fp32 LoRA/adapters,
regional compile, cuDNN attention) at the reference clip and sums the profiler's CUDA kernel time by category.

    python benchmarks/profile_step.py --model /tmp/bench/random-cosmos-2b
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_cosmos_lora as train  # noqa: E402

CATEGORIES = [("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
              ("matmul", ("gemm", "matmul", "cutlass", "xmma", "nvjet", "sm90")),
              ("communication", ("nccl",))]


def category(name):
    lower = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lower for k in keys):
            return label
    return "elementwise and other"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="2B diffusers checkpoint (tools/make_random_cosmos.py).")
    parser.add_argument("--batch_size", type=int, default=2, help="Clips per step.")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="Regional compile.")
    cli = parser.parse_args()
    args = train.parse_args(["--pretrained_model_name_or_path", cli.model, "--cache_dir", "unused",
                             "--attention_backend", "_native_cudnn"])
    model = train.load_transformer(args, torch.bfloat16).cuda()
    if cli.compile:
        for block in model.transformer_blocks:
            block.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = {"latents": torch.randn(cli.batch_size, 16, 16, 32, 56, device="cuda"),
             "prompt_embeds": torch.randn(cli.batch_size, 512, 1024, device="cuda")}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train.training_loss(model, batch, args)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(6):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    step_time = (time.perf_counter() - start) / 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[category(event.key)] = totals.get(category(event.key), 0) + event.self_device_time_total
    gpu_total = sum(totals.values())
    print(f"step {step_time * 1000:.0f} ms wall, {gpu_total / 3 / 1000:.0f} ms of GPU kernels per step "
          f"(batch {cli.batch_size}, compile={cli.compile})")
    for label, micros in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {label:<24}{micros / 3 / 1000:8.1f} ms  {100 * micros / gpu_total:5.1f}%")
    top = sorted(((e.self_device_time_total, e.key) for e in prof.key_averages()
                  if e.device_type == torch.autograd.DeviceType.CUDA), reverse=True)[:8]
    for micros, name in top:
        print(f"    {micros / 3 / 1000:7.1f} ms  {name[:100]}")


if __name__ == "__main__":
    main()
