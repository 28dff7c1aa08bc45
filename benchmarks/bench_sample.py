#!/usr/bin/env python
"""Seconds per video: sample.py's sampler against the family's diffusers pipeline, same card and inputs.

The pipeline is the checkpoint's own (model_index.json): Cosmos2VideoToWorldPipeline for Predict2 (35 steps),
Cosmos2_5_PredictBasePipeline for Predict2.5 (36 steps). Both start from the same conditioning image, prompt, seed,
steps and guidance 7, in bf16 on the random-weight 2B checkpoint. The pipeline runs the conditional and
unconditional passes one after the other; sample.py batches them, and adds cuDNN attention, cuDNN convolution
autotuning, compile (regional, and the VAE decode) and per-frame AdaLN modulation one after the other (VARIANTS).
Then, each only when asked for, levers beyond sample.py's fast path (LEVERS): --fp8, the transformer replayed as
a CUDA graph, and `step_syncs`, the host syncs of each sampling step put back as they were before the loops ran
without them (what that gained). Times cover
prompt encoding, conditioning, denoising and VAE decoding, after a 2-step warm-up run each; each variant also gets
its wall-clock ms per model call (a 6-step run minus a 2-step one), its host syncs per sampling step (by line, from
PyTorch's sync debug mode: a 6-step run minus a 2-step one), its frames' PSNR against the pipeline's and against
the bf16 default's (per_frame_modulation) and whether they equal the default's. The default's and the last variant's
denoising are profiled by kernel category. Without a GPU it runs on the CPU (a smoke test: no cuDNN attention, no
profile, no sync counts).

    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/      # 61x256x448
    python benchmarks/bench_sample.py --model /tmp/bench25/random-cosmos-predict2.5-2b --out results25/
    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/ \
        --num_frames 93 --height 480 --width 832 --repeats 1 --no-latent_comparison --variants per_frame_modulation fp8
    python benchmarks/bench_sample.py --model /tmp/bench/random-cosmos-2b --out results/ \
        --repeats 1 --no-latent_comparison --variants per_frame_modulation step_syncs

At 93x704x1280 (NVIDIA's 720p) one video takes minutes: --no-full_videos --no-pipeline computes each variant's
seconds per video from a 2-step and a 6-step run instead of timing whole videos (s_per_video_computed).
"""

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cosmos_metrics  # noqa: E402
import sample  # noqa: E402
from cosmos_cli import HelpFormatter
from cosmos_process import run_main  # noqa: E402

PROMPT = "An egocentric video of a worker's hands assembling parts at a factory bench."
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


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
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    synchronize()
    return result, (time.perf_counter() - start) / repeats


def kernel_ms_by_category(fn):
    from profile_train import category

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        synchronize()
    totals = {}
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[category(event.key)] = totals.get(category(event.key), 0) + event.self_device_time_total / 1e3
    return totals


@dataclass
class ShortRuns:
    """Wall-clock seconds and transformer calls of a 2-step and a 6-step generation."""

    seconds: tuple[float, float]
    calls: tuple[int, int]

    def seconds_per_call(self):
        return (self.seconds[1] - self.seconds[0]) / (self.calls[1] - self.calls[0])

    def calls_for(self, steps):
        """Transformer calls of a `steps`-step generation: linear in the steps, through the two runs' counts."""
        return self.calls[0] + (self.calls[1] - self.calls[0]) * (steps - 2) / 4

    def seconds_for(self, steps):
        """A `steps`-step generation: the 2-step run's seconds plus its extra calls at the measured seconds per call
        (every other cost of a run, prompt encoding, conditioning encode, decode, does not grow with the steps)."""
        return self.seconds[0] + (self.calls_for(steps) - self.calls[0]) * self.seconds_per_call()


def short_runs(run_ours, transformer, decode=False):
    """A 2-step and a 6-step generation, timed, with the transformer calls of each counted."""
    calls = []
    hook = transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    seconds, counts = [], []
    for steps in (2, 6):
        calls.clear()
        synchronize()
        start = time.perf_counter()
        run_ours(steps, decode=decode)
        synchronize()
        seconds.append(time.perf_counter() - start)
        counts.append(len(calls))
        print(f"{steps}-step run: {seconds[-1]:.1f} s, {counts[-1]} model calls", flush=True)  # a cut run still says
    hook.remove()
    return ShortRuns(tuple(seconds), tuple(counts))


def ms_per_model_call(run_ours, transformer):
    """Wall-clock ms per transformer call: a 6-step generation minus a 2-step one, over the calls between them."""
    return round(1e3 * short_runs(run_ours, transformer).seconds_per_call(), 1)


def conditioning_encode_seconds(job, vae, family):
    """sample.py's conditioning encode (the conditioning frames alone) against the pipeline's (those frames padded
    to the whole clip with the last one, then encoded): seconds of each, after one warm-up call each."""
    from cosmos_video import frames_to_vae_input

    frames = job.cond_frames
    padded = torch.cat([frames, frames[-1:].expand(job.shape[0] - len(frames), -1, -1, -1)])

    def ours():
        generator = torch.Generator().manual_seed(0)
        sample.conditioning_latents(job, vae, generator, vae.device, family)

    def pipelines():
        vae.encode(frames_to_vae_input(padded)[None].to(vae.device, vae.dtype)).latent_dist.mode()

    seconds = {}
    for name, fn in (("conditioning_frames_only", ours), ("padded_clip", pipelines)):
        fn()
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        seconds[name] = round(time.perf_counter() - start, 3)
    return seconds


def write_results(results, cli):
    """OUT/sample_results_FxHxW.json, rewritten after every measurement, so that a run stopped by a time limit keeps
    what it measured."""
    name = f"sample_results_{cli.num_frames}x{cli.height}x{cli.width}.json"
    with open(os.path.join(cli.out, name), "w") as f:
        json.dump(results, f, indent=2)


def host_syncs_per_step(run_ours):
    """Host syncs per sampling step by line (find_host_syncs.syncs_per_step: a 6-step generation minus a 2-step one,
    without the decode). None without a GPU."""
    if DEVICE.type != "cuda":
        return None
    from find_host_syncs import syncs_per_step

    return syncs_per_step(lambda steps: run_ours(steps, decode=False), (2, 6))


def measure_variant(run_ours, clock, components, repeats, theirs, pipeline_s):
    """Seconds per video, its denoise and decode parts, ms per model call, host syncs per step and the latents
    against the pipeline's."""
    ours, seconds = timed(run_ours, repeats)
    result = {
        "s_per_video": round(seconds, 3),
        "speedup": round(pipeline_s / seconds, 2) if pipeline_s else None,
        "last_run_denoise_s": round(clock["denoise_s"], 3),
        "last_run_vae_decode_s": round(clock["vae_decode_s"], 3),
        "ms_per_model_call": ms_per_model_call(run_ours, components.transformer),
        "host_syncs_per_step": host_syncs_per_step(run_ours),
    }
    if theirs is not None:
        difference = (ours.float() - theirs.float()).abs()
        result["max_abs_latent_difference"] = round(float(difference.max()), 4)
        result["mean_abs_latent_difference"] = round(float(difference.mean()), 5)
        result["latent_std"] = round(float(theirs.float().std()), 4)
    return result


def measure_variant_computed(run_ours, clock, components, steps):
    """For clips where one video takes minutes: seconds per video computed (ShortRuns.seconds_for) from a 2-step and
    a 6-step run, each decoded, after a 2-step warm-up run; no whole video is generated."""
    start = time.perf_counter()
    run_ours(2)  # warm-up: compiles the blocks and the decode
    print(f"warm-up 2-step run (compiles): {time.perf_counter() - start:.1f} s", flush=True)
    runs = short_runs(run_ours, components.transformer, decode=True)
    per_call = runs.seconds_per_call()
    return {
        "s_per_video_computed": round(runs.seconds_for(steps), 3),
        "model_calls_per_video": round(runs.calls_for(steps), 1),
        "ms_per_model_call": round(1e3 * per_call, 1),
        "two_step_run_s": round(runs.seconds[0], 3),
        # prompt encoding, conditioning encode, starting noise, scheduler set-up: the 2-step run less its calls
        "fixed_s_before_decode": round(runs.seconds[0] - runs.calls[0] * per_call - clock["vae_decode_s"], 3),
        "last_run_vae_decode_s": round(clock["vae_decode_s"], 3),
    }


def psnr_db(a, b):
    return round(cosmos_metrics.psnr(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))), 2)


def profile_denoising(run_ours):
    """GPU kernel ms of one denoising step by category: a 5-step generation minus a 1-step one, divided by 4, so the
    conditioning encode and prompt encoding drop out. None without a GPU."""
    if DEVICE.type != "cuda":
        return None
    five = kernel_ms_by_category(lambda: run_ours(5, decode=False))
    one = kernel_ms_by_category(lambda: run_ours(1, decode=False))
    per_step = {label: (five[label] - one.get(label, 0.0)) / 4 for label in five}
    return {label: round(ms, 1) for label, ms in sorted(per_step.items(), key=lambda kv: -kv[1])}


def time_pipeline(cli, family, image_path, size):
    """The family's diffusers pipeline: its frames (uint8), seconds per video, and its latents when compared."""
    import diffusers

    pipe = (
        getattr(diffusers, family.pipeline_class)
        .from_pretrained(cli.model, torch_dtype=torch.bfloat16, safety_checker=StandInSafetyChecker())
        .to(DEVICE)
    )
    pipe.set_progress_bar_config(disable=True)
    # Predict2's pipeline rescales RoPE by its default fps=16 unless told fps=None; the 2.5 one passes no fps.
    fps = {"fps": None} if family.name == "predict2" else {}

    def run_pipeline(steps=None, output_type="np"):
        return pipe(
            image=Image.open(image_path),
            prompt=PROMPT,
            **size,
            num_inference_steps=steps or family.num_inference_steps,
            guidance_scale=7.0,
            **fps,
            output_type=output_type,
            generator=torch.Generator().manual_seed(0),
        ).frames

    frames, seconds = timed(run_pipeline, cli.repeats)
    frames = (np.asarray(frames[0]) * 255).round().astype(np.uint8)
    latents = run_pipeline(output_type="latent") if cli.latent_comparison else None
    return frames, seconds, latents


def write_condition_image(cli):
    """OUT/condition.png: a seeded random image of the clip's size, the conditioning frame of every run."""
    path = os.path.join(cli.out, "condition.png")
    pixels = np.random.RandomState(0).randint(0, 255, (cli.height, cli.width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def sample_args(cli, image_path):
    """sample.py's arguments for one bf16 video of the clip's size from the conditioning image, without guardrail."""
    return sample.parse_args(
        ["--pretrained_model_name_or_path", cli.model, "--input", image_path, "--prompt", PROMPT]
        + ["--output_dir", cli.out, "--disable_safety_checker", "--dtype", "bfloat16"]
        + ["--num_frames", str(cli.num_frames), "--height", str(cli.height), "--width", str(cli.width)]
    )


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="2B diffusers checkpoint (tools/make_random_cosmos.py).")
    parser.add_argument("--out", required=True, help="Where sample_results_FxHxW.json goes.")
    parser.add_argument("--repeats", type=int, default=2, help="Timed runs per variant.")
    parser.add_argument("--num_frames", type=int, default=61, help="Frames per video.")
    parser.add_argument("--height", type=int, default=256, help="Video height.")
    parser.add_argument("--width", type=int, default=448, help="Video width.")
    parser.add_argument(
        "--pipeline",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Time the diffusers pipeline first (--no-pipeline: sample.py's variants alone, without speedups).",
    )
    parser.add_argument(
        "--latent_comparison",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run the pipeline once more for its latents and compare each variant's with them (frames are compared "
        "by PSNR either way). At 93x480x832 that run costs 83 s.",
    )
    parser.add_argument(
        "--full_videos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Time whole videos. --no-full_videos, for clips where one takes minutes, needs --no-pipeline: "
        "each variant's seconds per video is computed, as s_per_video_computed, from a decoded 2-step and 6-step "
        "run: the 2-step run plus the extra model calls of a whole video at the measured time per call.",
    )
    parser.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Profile the denoising of the default and the last variant by kernel category (a 5-step and a 1-step "
        "run each).",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS) + list(LEVERS),
        help="Which variants to time. Each one includes all before it in the list batched_cfg, cudnn_attention, "
        "cudnn_benchmark, compile, per_frame_modulation (sample.py --compile --attention_backend _native_cudnn), "
        "and the levers asked for of fp8, cuda_graph, step_syncs (the per-step host syncs put back).",
    )
    cli = parser.parse_args()
    if cli.pipeline and not cli.full_videos:
        parser.error("--no-full_videos times no whole video, so it needs --no-pipeline")
    return cli


def main(cli):
    from cosmos_families import detect_family

    family = detect_family(cli.model)
    steps_default = family.num_inference_steps
    os.makedirs(cli.out, exist_ok=True)
    size = dict(height=cli.height, width=cli.width, num_frames=cli.num_frames)
    image_path = write_condition_image(cli)
    results = {
        "device": torch.cuda.get_device_name(0) if DEVICE.type == "cuda" else "cpu",
        "family": family.name,
        "pipeline": family.pipeline_class,
        "size": size,
        "steps": steps_default,
        "guidance_scale": 7.0,
    }
    pipeline_frames, pipeline_s, theirs = None, None, None
    if cli.pipeline:
        pipeline_frames, pipeline_s, theirs = time_pipeline(cli, family, image_path, size)
        torch.cuda.empty_cache()  # the pipeline's models are gone with time_pipeline's frame
        results["pipeline_s_per_video"] = round(pipeline_s, 3)
    print(results, flush=True)

    args = sample_args(cli, image_path)
    components = sample.load_pipeline_components(args, DEVICE, family)
    jobs = sample.collect_jobs(args, family)
    results["conditioning_encode_s"] = conditioning_encode_seconds(jobs[0], components.vae, family)
    print(results["conditioning_encode_s"], flush=True)
    write_results(results, cli)
    clock = {}

    def run_ours(steps=None, decode=True):
        args.num_inference_steps = steps or steps_default
        start = time.perf_counter()
        latents, _ = sample.generate_latents(jobs, components, args, 0)
        synchronize()
        clock["denoise_s"] = time.perf_counter() - start
        if decode:
            clock["frames"] = sample.decode_to_frames(components.vae, latents, compiled=args.compile)[0].numpy()
            synchronize()
            clock["vae_decode_s"] = time.perf_counter() - start - clock["denoise_s"]
        return latents

    default_frames = None
    chain = {**VARIANTS, **{name: apply for name, apply in LEVERS.items() if name in cli.variants}}
    last_variant = [name for name in chain if name in cli.variants][-1]
    for name, apply in chain.items():
        try:
            apply(components, args)
            if name not in cli.variants:
                continue
            if cli.full_videos:
                results[name] = measure_variant(run_ours, clock, components, cli.repeats, theirs, pipeline_s)
            else:
                results[name] = measure_variant_computed(run_ours, clock, components, steps_default)
        except Exception as error:  # a lever that fails is reported, and the ones after it still run
            vars(components.transformer).pop("forward", None)  # a failed CUDA graph: back to the eager forward
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            print(name, results[name], flush=True)
            continue
        if pipeline_frames is not None:
            results[name]["psnr_db_vs_pipeline"] = psnr_db(clock["frames"], pipeline_frames)
        if name == "per_frame_modulation":
            default_frames = clock["frames"]
        elif default_frames is not None:
            results[name]["psnr_db_vs_bf16_default"] = psnr_db(clock["frames"], default_frames)
            results[name]["frames_equal_bf16_default"] = bool(np.array_equal(clock["frames"], default_frames))
        if cli.profile and name in ("per_frame_modulation", last_variant):
            results[name]["denoise_profile_ms_per_step"] = profile_denoising(run_ours)
        print(name, results[name], flush=True)
        write_results(results, cli)
    print(json.dumps(results, indent=2))


def use_cudnn_attention(components, args):
    if DEVICE.type == "cuda":  # cuDNN attention has no CPU kernel: a CPU smoke test keeps the stock one
        components.transformer.set_attention_backend("_native_cudnn")


def compile_blocks(components, args):
    """sample.py --compile: each transformer block, and the VAE decode."""
    for block in components.transformer.transformer_blocks:
        block.compile()
    args.compile = True


def autotune_vae_convolutions(components, args):
    torch.backends.cudnn.benchmark = True


def stock_modulation(components, args):
    """Undo sample.py's per-frame AdaLN (cosmos_speed.modulate_per_frame): the stock per-token modulation."""
    from cosmos_speed import adaln_norms

    for norm in adaln_norms(components.transformer):
        norm.__class__ = type(norm).__bases__[1]  # FrameModulated<Stock> derives from (FrameModulation, Stock)


def per_frame_modulation(components, args):
    from cosmos_speed import modulate_per_frame

    modulate_per_frame(components.transformer)


def replay_cuda_graph(components, args):
    """The transformer's forward captured once per input shape as a CUDA graph and replayed: inputs are copied into
    the graph's static buffers, and no Python runs per kernel."""
    transformer = components.transformer
    eager, graphs = transformer.forward, {}

    def forward(**inputs):
        tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in tensors.items())
        if key not in graphs:
            static = {k: v.clone() for k, v in tensors.items()}
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile and autotune outside the capture
                    eager(**{**inputs, **static})
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = eager(**{**inputs, **static})
            graphs[key] = (graph, static, output)
        graph, static, output = graphs[key]
        for k, v in tensors.items():
            static[k].copy_(v)
        graph.replay()
        return tuple(o.clone() for o in output)

    transformer.forward = forward


def fp8_linears(components, args):
    """sample.py --fp8 on the blocks (before a CUDA graph is captured, so that the graph replays the FP8 kernels)."""
    from cosmos_speed import convert_frozen_linears_to_fp8

    convert_frozen_linears_to_fp8(components.transformer)


# Each variant adds one step of sample.py's speed options (--attention_backend, --compile) to the ones before it.
# The variants up to `compile` run the stock per-token AdaLN; `per_frame_modulation` is sample.py's default path
# (--compile --attention_backend _native_cudnn). Every variant skips the pipeline's dt = 0 last step (Predict2),
# as sample.py does, and encodes only the conditioning frames.
VARIANTS = {
    "batched_cfg": stock_modulation,
    "cudnn_attention": use_cudnn_attention,
    "cudnn_benchmark": autotune_vae_convolutions,
    "compile": compile_blocks,
    "per_frame_modulation": per_frame_modulation,
}


def put_back_step_syncs(components, args):
    """The host syncs of each sampling step as they were before the loops ran without them: one before every model
    call (Predict2's dt = 0 check read a GPU sigma there; Predict2.5's loop copied its sigma to the GPU) and UniPC's
    own (its sigmas left on the CPU, so that every step copies them to the GPU, and linalg.solve's error check). The
    latents are the same either way."""
    import cosmos_families

    on_gpu = torch.ones((), device=DEVICE)

    def read_a_gpu_value(*_):  # as the loops did; a pre-hook's return value would replace the call's inputs
        bool(on_gpu)

    components.transformer.register_forward_pre_hook(read_a_gpu_value)
    if components.family.scheduler_class == "UniPCMultistepScheduler":
        cosmos_families.keep_sigmas_on = lambda scheduler, device: None
        cosmos_families.solve_without_error_check = contextlib.nullcontext


# Levers beyond it, applied in this order on top of it, each only when --variants names it.
LEVERS = {"fp8": fp8_linears, "cuda_graph": replay_cuda_graph, "step_syncs": put_back_step_syncs}


if __name__ == "__main__":
    run_main(main, parse_args)
