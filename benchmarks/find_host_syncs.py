#!/usr/bin/env python
"""Where sample.py's sampler makes the host wait for the GPU: each synchronizing call of a short generation, by line.

PyTorch's sync debug mode warns at every operation that synchronizes the stream with the host (.item(), a device to
host copy, a copy from pageable host memory, a data-dependent shape). One warning per step in the sampling loop
leaves the GPU idle while the host launches the next step's first kernels. This runs a generation of --steps steps
on --model at --num_frames x --height x --width (after a warm-up run that is not counted) and prints the Python line
behind each warning with its count, then the syncs per step: those of a 2 x --steps generation minus those of the
--steps one, over the steps between them (what a generation does once drops out).

    python benchmarks/find_host_syncs.py --model /tmp/bench25/random-cosmos-predict2.5-2b --out results/
"""

import argparse
import collections
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sample  # noqa: E402

import sample  # noqa: E402
from cosmos_cli import HelpFormatter
from cosmos_families import detect_family  # noqa: E402
from cosmos_process import run_main  # noqa: E402


def synchronizing_lines(generate):
    """{"file:line": count} of the sync debug mode's warnings while generate() runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            generate()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = collections.Counter(
        f"{os.path.relpath(w.filename)}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)
    )
    return dict(lines.most_common())


def syncs_per_step(generate, steps):
    """{"syncs": per step, "lines": {"file:line": per step}}: the synchronizing lines of generate(steps[1]) minus
    those of generate(steps[0]), over steps[1] - steps[0]."""
    short, long = (synchronizing_lines(lambda n=n: generate(n)) for n in steps)
    lines = {line: (count - short.get(line, 0)) / (steps[1] - steps[0]) for line, count in long.items()}
    lines = {line: round(count, 2) for line, count in lines.items() if count}
    return {"syncs": round(sum(lines.values()), 2), "lines": lines}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="Diffusers checkpoint of either family.")
    parser.add_argument("--out", required=True, help="Where host_syncs_<family>.json goes.")
    parser.add_argument("--steps", type=int, default=4, help="Sampling steps of the counted generation.")
    parser.add_argument("--num_frames", type=int, default=61, help="Frames per video.")
    parser.add_argument("--height", type=int, default=256, help="Video height.")
    parser.add_argument("--width", type=int, default=448, help="Video width.")
    return parser.parse_args()


def main(cli):
    if not torch.cuda.is_available():
        raise ValueError("find_host_syncs.py counts the host syncs of GPU sampling, and no GPU is visible")
    os.makedirs(cli.out, exist_ok=True)
    args = bench_sample.sample_args(cli, bench_sample.write_condition_image(cli))
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    components = sample.load_pipeline_components(args, torch.device("cuda"), family)
    jobs = sample.collect_jobs(args, family)

    def generate(steps):
        args.num_inference_steps = steps
        sample.generate_latents(jobs, components, args, 0)

    generate(cli.steps)  # warm-up: cuDNN plans, allocator
    result = {
        "family": components.family.name,
        "steps": cli.steps,
        "synchronizing_lines": synchronizing_lines(lambda: generate(cli.steps)),
        "per_step": syncs_per_step(generate, (cli.steps, 2 * cli.steps)),
    }
    print(json.dumps(result, indent=2))
    with open(os.path.join(cli.out, f"host_syncs_{result['family']}.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    run_main(main, parse_args)
