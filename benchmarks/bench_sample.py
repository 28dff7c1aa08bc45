#!/usr/bin/env python
"""Seconds per video: sample.py's sampler against diffusers' Cosmos2VideoToWorldPipeline, same card and inputs.

Both start from the same conditioning image, prompt, seed, 35 steps and guidance 7 at the reference clip
(61 frames at 256x448), in bf16 on the random-weight 2B checkpoint. The pipeline runs the conditional and
unconditional passes one after the other; sample.py batches them, and can add regional compile and an attention
backend. Times cover prompt encoding, conditioning, denoising and VAE decoding, after one warm-up run each.

    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sample  # noqa: E402

PROMPT = "An egocentric video of a worker's hands assembling parts at a factory bench."


class StandInSafetyChecker:
    """The guardrail downloads its models; timing runs without it on both sides."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def timed(fn, repeats):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    torch.cuda.synchronize()
    return result, (time.perf_counter() - start) / repeats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="2B diffusers checkpoint (tools/make_random_cosmos.py).")
    parser.add_argument("--out", required=True, help="Where sample_results.json goes.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per variant.")
    cli = parser.parse_args()
    from diffusers import Cosmos2VideoToWorldPipeline

    image_path = os.path.join(cli.out, "condition.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (256, 448, 3), dtype=np.uint8)).save(image_path)
    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(cli.model, torch_dtype=torch.bfloat16,
                                                       safety_checker=StandInSafetyChecker()).to("cuda")
    pipe.set_progress_bar_config(disable=True)

    def run_pipeline(output_type="np"):
        return pipe(image=Image.open(image_path), prompt=PROMPT, height=256, width=448, num_frames=61,
                     num_inference_steps=35, guidance_scale=7.0, fps=None, output_type=output_type,
                     generator=torch.Generator().manual_seed(0)).frames

    _, pipeline_s = timed(run_pipeline, cli.repeats)
    theirs = run_pipeline("latent")
    results = {"device": torch.cuda.get_device_name(0), "pipeline_s_per_video": round(pipeline_s, 3)}

    args = sample.parse_args(["--pretrained_model_name_or_path", cli.model, "--input", image_path, "--prompt", PROMPT,
                              "--output_dir", cli.out, "--disable_safety_checker", "--dtype", "bfloat16"])
    components = sample.load_pipeline_components(args, torch.device("cuda"))
    jobs = sample.collect_jobs(args)

    def run_ours():
        latents, _ = sample.generate_latents(jobs, components, args, 0)
        sample.decode_to_frames(components["vae"], latents)
        return latents

    # The same steps as sample.py's --attention_backend and --compile, applied one after the other.
    variants = [("batched_cfg", None, False), ("batched_cfg_cudnn", "_native_cudnn", False),
                ("batched_cfg_cudnn_compile", "_native_cudnn", True)]
    for name, backend, compile_blocks in variants:
        if backend:
            components["transformer"].set_attention_backend(backend)
        if compile_blocks:
            for block in components["transformer"].transformer_blocks:
                block.compile()
        ours, seconds = timed(run_ours, cli.repeats)
        difference = (ours.float() - theirs.float()).abs()
        results[name] = {"s_per_video": round(seconds, 3), "speedup": round(pipeline_s / seconds, 2),
                         "max_abs_latent_difference": round(float(difference.max()), 4),
                         "mean_abs_latent_difference": round(float(difference.mean()), 5),
                         "latent_std": round(float(theirs.float().std()), 4)}
        print(name, results[name], flush=True)
    with open(os.path.join(cli.out, "sample_results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
