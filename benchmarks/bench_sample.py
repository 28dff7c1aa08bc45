#!/usr/bin/env python
"""Seconds per video: sample.py's sampler against the family's diffusers pipeline, same card and inputs.

The pipeline is the checkpoint's own (model_index.json): Cosmos2VideoToWorldPipeline for Predict2 (35 steps),
Cosmos2_5_PredictBasePipeline for Predict2.5 (36 steps). Both start from the same conditioning image, prompt, seed,
steps and guidance 7, in bf16 on the random-weight 2B checkpoint. The pipeline runs the conditional and
unconditional passes one after the other; sample.py batches them, and adds cuDNN attention, cuDNN convolution
autotuning, regional compile and per-frame AdaLN modulation one after the other. Times cover
prompt encoding, conditioning, denoising and VAE decoding, after a 2-step warm-up run each. The last variant's
denoising is then profiled by kernel category.

    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/      # 61x256x448
    python benchmarks/bench_sample.py --model /tmp/bench25/random-cosmos-predict2.5-2b --out results25/
    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/ \
        --num_frames 93 --height 480 --width 832 --repeats 1 --variants per_frame_modulation
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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
    """Mean seconds of `repeats` runs of fn(num_inference_steps=None) after a 2-step warm-up run."""
    fn(2)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    torch.cuda.synchronize()
    return result, (time.perf_counter() - start) / repeats


def kernel_ms_by_category(fn):
    from profile_train import category

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    totals = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[category(event.key)] = totals.get(category(event.key), 0) + event.self_device_time_total / 1e3
    return totals


def profile_denoising(run_ours):
    """GPU kernel ms of one denoising step by category: a 5-step generation minus a 1-step one, divided by 4, so the
    conditioning encode and prompt encoding drop out."""
    five = kernel_ms_by_category(lambda: run_ours(5, decode=False))
    one = kernel_ms_by_category(lambda: run_ours(1, decode=False))
    per_step = {label: (five[label] - one.get(label, 0.0)) / 4 for label in five}
    return {label: round(ms, 1) for label, ms in sorted(per_step.items(), key=lambda kv: -kv[1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="2B diffusers checkpoint (tools/make_random_cosmos.py).")
    parser.add_argument("--out", required=True, help="Where sample_results_FxHxW.json goes.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per variant.")
    parser.add_argument("--num_frames", type=int, default=61, help="Frames per video.")
    parser.add_argument("--height", type=int, default=256, help="Video height.")
    parser.add_argument("--width", type=int, default=448, help="Video width.")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="Which of sample.py's variants to time. Each one includes all before it in the list "
        "batched_cfg, cudnn_attention, cudnn_benchmark, compile, per_frame_modulation (sample.py's default).",
    )
    cli = parser.parse_args()
    import diffusers

    from cosmos_families import detect_family

    family = detect_family(cli.model)
    steps_default = family.num_inference_steps
    os.makedirs(cli.out, exist_ok=True)
    size = dict(height=cli.height, width=cli.width, num_frames=cli.num_frames)
    image_path = os.path.join(cli.out, "condition.png")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (cli.height, cli.width, 3), dtype=np.uint8)).save(
        image_path
    )
    pipe = (
        getattr(diffusers, family.pipeline_class)
        .from_pretrained(cli.model, torch_dtype=torch.bfloat16, safety_checker=StandInSafetyChecker())
        .to("cuda")
    )
    pipe.set_progress_bar_config(disable=True)
    # Predict2's pipeline rescales RoPE by its default fps=16 unless told fps=None; the 2.5 one passes no fps.
    fps = {"fps": None} if family.name == "predict2" else {}

    def run_pipeline(steps=None, output_type="np"):
        return pipe(
            image=Image.open(image_path),
            prompt=PROMPT,
            **size,
            num_inference_steps=steps or steps_default,
            guidance_scale=7.0,
            **fps,
            output_type=output_type,
            generator=torch.Generator().manual_seed(0),
        ).frames

    _, pipeline_s = timed(run_pipeline, cli.repeats)
    theirs = run_pipeline(output_type="latent")
    results = {
        "device": torch.cuda.get_device_name(0),
        "family": family.name,
        "pipeline": family.pipeline_class,
        "size": size,
        "steps": steps_default,
        "guidance_scale": 7.0,
        "pipeline_s_per_video": round(pipeline_s, 3),
    }
    print(results, flush=True)

    args = sample.parse_args(
        [
            "--pretrained_model_name_or_path",
            cli.model,
            "--input",
            image_path,
            "--prompt",
            PROMPT,
            "--output_dir",
            cli.out,
            "--disable_safety_checker",
            "--dtype",
            "bfloat16",
            "--num_frames",
            str(cli.num_frames),
            "--height",
            str(cli.height),
            "--width",
            str(cli.width),
        ]
    )
    components = sample.load_pipeline_components(args, torch.device("cuda"))
    jobs = sample.collect_jobs(args)
    clock = {}

    def run_ours(steps=None, decode=True):
        args.num_inference_steps = steps or steps_default
        start = time.perf_counter()
        latents, _ = sample.generate_latents(jobs, components, args, 0)
        torch.cuda.synchronize()
        clock["denoise_s"] = time.perf_counter() - start
        if decode:
            sample.decode_to_frames(components["vae"], latents)
            torch.cuda.synchronize()
            clock["vae_decode_s"] = time.perf_counter() - start - clock["denoise_s"]
        return latents

    for name, apply in VARIANTS.items():
        apply(components)
        if name not in cli.variants:
            continue
        ours, seconds = timed(run_ours, cli.repeats)
        difference = (ours.float() - theirs.float()).abs()
        results[name] = {
            "s_per_video": round(seconds, 3),
            "speedup": round(pipeline_s / seconds, 2),
            "last_run_denoise_s": round(clock["denoise_s"], 3),
            "last_run_vae_decode_s": round(clock["vae_decode_s"], 3),
            "max_abs_latent_difference": round(float(difference.max()), 4),
            "mean_abs_latent_difference": round(float(difference.mean()), 5),
            "latent_std": round(float(theirs.float().std()), 4),
        }
        print(name, results[name], flush=True)
    results["denoise_profile_ms_per_step"] = profile_denoising(run_ours)
    name = f"sample_results_{cli.num_frames}x{cli.height}x{cli.width}.json"
    with open(os.path.join(cli.out, name), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))


def use_cudnn_attention(components):
    components["transformer"].set_attention_backend("_native_cudnn")


def compile_blocks(components):
    for block in components["transformer"].transformer_blocks:
        block.compile()


def autotune_vae_convolutions(components):
    torch.backends.cudnn.benchmark = True


def stock_modulation(components):
    """Undo sample.py's per-frame AdaLN (cosmos_model.modulate_per_frame): the stock per-token modulation."""
    from cosmos_model import adaln_norms

    for norm in adaln_norms(components["transformer"]):
        norm.__class__ = type(norm).__bases__[1]  # FrameModulated<Stock> derives from (FrameModulation, Stock)


def per_frame_modulation(components):
    from cosmos_model import modulate_per_frame

    modulate_per_frame(components["transformer"])


# Each variant adds one step of sample.py's speed options (--attention_backend, --compile) to the ones before it.
# The variants up to `compile` run the stock per-token AdaLN; `per_frame_modulation` is sample.py's default path.
# Every variant skips the pipeline's dt = 0 last step (Predict2), as sample.py does.
VARIANTS = {
    "batched_cfg": stock_modulation,
    "cudnn_attention": use_cudnn_attention,
    "cudnn_benchmark": autotune_vae_convolutions,
    "compile": compile_blocks,
    "per_frame_modulation": per_frame_modulation,
}


if __name__ == "__main__":
    main()
