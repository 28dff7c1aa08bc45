#!/usr/bin/env python
"""Wall-clock seconds: evaluate.py against sample.py generating the same videos, same card, one command each.

The videos: --num_clips synthetic videos (tools/make_synthetic_clips.py, 8 s at 30 fps, whose first frame conditions
Predict2 and whose frames are the ground truth) x --seeds seeds x (the base + one fine-tune: a LoRA of rank 16 on
attn2 with random B, so it is not the base). sample.py makes them in one run per model, the clips given --seeds times
(job k * num_clips + c is seed k of clip c, as in evaluate.py); evaluate.py makes and scores all of them in one run.
Both with the fast path (--compile, cuDNN attention) and the guardrail off (it downloads models); times include
process start, model loading and compiling. The PSNR each script reports per video must agree: the same videos.

    python benchmarks/bench_evaluate.py --model /tmp/bench/random-cosmos-2b --out results/     # 61x256x448, H200
    python benchmarks/bench_evaluate.py --model /tmp/tiny --out /tmp/b --num_frames 17 --height 64 --width 112 \\
        --num_clips 2 --num_inference_steps 2 --no-compile                                      # CPU smoke test

Prints one JSON line per result and writes them to OUT/evaluate_results.jsonl. --metrics all also times LPIPS and
FVD, with networks of random weights (the real architectures, written to OUT: no download).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools")]
import make_synthetic_clips  # noqa: E402
from cosmos_adapters import lora_config, save_finetuned_weights  # noqa: E402
from cosmos_cli import HelpFormatter
from cosmos_families import detect_family, load_component  # noqa: E402
from cosmos_process import run_main  # noqa: E402


def write_videos(cli):
    """--num_clips synthetic 8 s videos at 30 fps, 256x456 (cropped to the generation width)."""
    folder = os.path.join(cli.out, "videos")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for seed in range(cli.num_clips):
        path = os.path.join(folder, f"clip{seed}.mp4")
        frames = make_synthetic_clips.render_video(seed=seed, num_frames=240, height=256, width=456)
        with open(path, "wb") as f:
            f.write(make_synthetic_clips.encode_mp4(frames, 30.0, "h264"))
        paths.append(path)
    return paths


def write_fine_tune(cli):
    """A LoRA of rank 16 on attn2 with random B (a fresh LoRA would be the base exactly)."""
    from peft import get_peft_model_state_dict

    folder = os.path.join(cli.out, "fine-tune")
    family = detect_family(cli.model)
    transformer = load_component(cli.model, "transformer", family=family)
    targets = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    transformer.add_adapter(lora_config(16, 16, targets))
    generator = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=generator) * 0.02 if "lora_B" in k else v
        for k, v in get_peft_model_state_dict(transformer).items()
    }
    config = {"lora_rank": 16, "lora_alpha": 16, "lora_target_modules": targets, "family": family.name}
    save_finetuned_weights(state, folder, config)
    return folder


def random_metric_weights(cli):
    """AlexNet and I3D with random weights, saved as their checkpoint files are (for timing, not for numbers)."""
    import torchvision
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    alexnet, i3d = os.path.join(cli.out, "alexnet-random.pth"), os.path.join(cli.out, "i3d-random.pt")
    torch.save(torchvision.models.alexnet().state_dict(), alexnet)
    torch.save(InceptionI3d(400, in_channels=3).state_dict(), i3d)
    return ["--metrics", "psnr", "ssim", "lpips", "fvd", "--lpips_weights", alexnet, "--fvd_weights", i3d]


def common_flags(cli):
    flags = [
        "--pretrained_model_name_or_path", cli.model, "--num_frames", cli.num_frames, "--height", cli.height,
        "--width", cli.width, "--disable_safety_checker", "--seed", 0,
    ]  # fmt: skip
    if cli.num_inference_steps:
        flags += ["--num_inference_steps", cli.num_inference_steps]
    if cli.compile:
        flags += ["--compile", "--attention_backend", "_native_cudnn"]
    return [str(f) for f in flags]


def timed_run(script, flags):
    """Run a script as a user does; its wall-clock seconds."""
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(REPO, script), *flags], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{result.stderr[-3000:]}")
    return seconds


def report(row, cli):
    line = json.dumps(row)
    print(line, flush=True)
    with open(os.path.join(cli.out, "evaluate_results.jsonl"), "a") as f:
        f.write(line + "\n")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument(
        "--model", required=True, help="A Predict2 diffusers checkpoint (tools/make_random_cosmos.py)."
    )
    parser.add_argument("--out", required=True, help="Where the inputs, outputs and evaluate_results.jsonl go.")
    parser.add_argument("--num_clips", type=int, default=8, help="Clips (synthetic videos).")
    parser.add_argument("--seeds", type=int, default=2, help="Seeds per clip.")
    parser.add_argument("--num_frames", type=int, default=61, help="Frames per video.")
    parser.add_argument("--height", type=int, default=256, help="Video height.")
    parser.add_argument("--width", type=int, default=448, help="Video width.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="Default: the family's (35).")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=True, help="The fast path (--compile, cuDNN)."
    )
    parser.add_argument(
        "--metrics", choices=["default", "all"], default="default", help="evaluate.py's default metrics, or all four."
    )
    return parser.parse_args()


def main(cli):
    os.makedirs(cli.out, exist_ok=True)
    videos, fine_tune = write_videos(cli), write_fine_tune(cli)
    flags = common_flags(cli)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    setting = {"device": device, "clips": cli.num_clips, "seeds": cli.seeds, "compile": cli.compile}
    setting["shape"] = f"{cli.num_frames}x{cli.height}x{cli.width}"
    # sample.py: one run per model, each clip --seeds times.
    inputs = ["--input", *videos * cli.seeds]
    sample_s, sample_psnr = {}, {}
    for name, extra in (("base", []), ("fine-tune", ["--lora_path", fine_tune])):
        out = os.path.join(cli.out, f"sample_{name}")
        sample_s[name] = timed_run("sample.py", [*flags, *inputs, *extra, "--output_dir", out])
        results = json.load(open(os.path.join(out, "results.json")))["videos"]
        sample_psnr[name] = np.array([r["psnr"] for r in results]).reshape(cli.seeds, cli.num_clips).T
        report({"script": "sample.py", "model": name, "seconds": round(sample_s[name], 2), **setting}, cli)
    # evaluate.py: every video of both models, scored, in one run.
    out = os.path.join(cli.out, "evaluate")
    metrics = random_metric_weights(cli) if cli.metrics == "all" else []
    evaluate_flags = [*flags, "--input", *videos, "--seeds", str(cli.seeds), "--lora_path", fine_tune, *metrics]
    evaluate_s = timed_run("evaluate.py", [*evaluate_flags, "--output_dir", out])
    record = json.load(open(os.path.join(out, "evaluation.json")))
    same = max(
        float(np.max(np.abs(np.array(record["per_video"][m]["psnr"]) - sample_psnr[n])))
        for m, n in (("base", "base"), ("fine-tune", "fine-tune"))
    )
    total = sum(sample_s.values())
    report(
        {
            "script": "evaluate.py",
            "metrics": cli.metrics,
            "seconds": round(evaluate_s, 2),
            "sample_py_seconds": round(total, 2),
            "ratio": round(evaluate_s / total, 3),
            "within_10_percent": evaluate_s <= 1.1 * total,
            "max_psnr_difference_db": round(same, 4),
            "verdict": record["verdict"][0],
            **setting,
        },
        cli,
    )


if __name__ == "__main__":
    run_main(main, parse_args)
