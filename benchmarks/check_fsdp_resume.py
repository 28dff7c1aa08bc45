#!/usr/bin/env python
"""Checkpoint save and resume round-trip of train_cosmos_lora.py under FSDP2 on 3 GPUs (2B model, random weights).

Runs A and A2 each train 8 steps. Run B trains 4 steps and stops, then resumes from its checkpoint-4 to step 8. B's
losses for steps 5-8 and its final exported weights are compared with A's. GPU kernels such as the attention backward
are not bitwise deterministic, so A2 (the same run again) measures how far two uninterrupted runs already differ.

    python benchmarks/check_fsdp_resume.py --workdir /tmp/bench --out results/
"""

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402

from cosmos_cli import HelpFormatter
from cosmos_process import run_main  # noqa: E402

REPO = bench_train.REPO


def launch(model, cache, output, steps, log, *extra):
    cmd = bench_train.launch_command(
        os.path.join(REPO, "accelerate_configs", "fsdp3.yaml"),
        os.path.join(REPO, "train_cosmos_lora.py"),
        *bench_train.training_flags(model, cache, output, steps, checkpointing_steps=4),
        "--learning_rate",
        "1e-3",
        *extra,
    )
    with open(log, "a") as f:  # the run is killed with its launcher if this check is stopped
        code = bench_train.run_logged(cmd, dict(os.environ, CUDA_VISIBLE_DEVICES="0,1,2"), f, None)
    if code:
        raise RuntimeError(f"the training run into {output} exited with {code}: see {log}")


def losses(output):
    return [json.loads(line)["loss"] for line in open(os.path.join(output, "losses.jsonl"))]


def weight_difference(run, other):
    """max |a - b| / max |a| over all exported tensors, and the mean of that ratio."""
    ratios = []
    for name in ("pytorch_lora_weights.safetensors", "temporal_adapters.safetensors"):
        x, y = (load_file(os.path.join(d, name)) for d in (run, other))
        ratios += [float((x[k] - y[k]).abs().max() / (x[k].abs().max() + 1e-12)) for k in x]
    return {"max": max(ratios), "mean": sum(ratios) / len(ratios)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the checkpoint, cache and runs go.")
    parser.add_argument("--out", required=True, help="Where fsdp_resume.json and the log go.")
    return parser.parse_args()


def main(args):
    gpus = torch.cuda.device_count()
    if gpus < 3:
        raise ValueError(f"check_fsdp_resume.py runs on 3 GPUs, and {gpus} are visible")
    os.makedirs(args.out, exist_ok=True)
    model = bench_train.random_2b_checkpoint(args.workdir)
    cache = os.path.join(args.workdir, "cache_61x256x448")
    bench_train.write_synthetic_cache(cache, model, 61, 256, 448)
    log = os.path.join(args.out, "fsdp_resume.log")
    a, a2, b = (os.path.join(args.workdir, f"resume_{n}") for n in ("a", "a2", "b"))
    for run in (a, a2, b):
        shutil.rmtree(run, ignore_errors=True)
    launch(model, cache, a, 8, log)
    launch(model, cache, a2, 8, log)
    launch(model, cache, b, 4, log)
    launch(model, cache, b, 8, log, "--resume_from_checkpoint", "latest")
    lora_a = load_file(os.path.join(a, "pytorch_lora_weights.safetensors"))
    result = {
        "losses_uninterrupted": losses(a),
        "losses_uninterrupted_again": losses(a2),
        "losses_resumed": losses(b),
        "max_loss_difference_resumed": max(abs(x - y) for x, y in zip(losses(a)[4:], losses(b)[4:], strict=True)),
        "max_loss_difference_rerun": max(abs(x - y) for x, y in zip(losses(a)[4:], losses(a2)[4:], strict=True)),
        "weight_difference_resumed": weight_difference(a, b),
        "weight_difference_rerun": weight_difference(a, a2),
        "max_abs_lora_B": max(float(t.abs().max()) for k, t in lora_a.items() if ".lora_B." in k),
        "checkpoint_files": sorted(os.listdir(os.path.join(b, "checkpoint-4"))),
        "device": torch.cuda.get_device_name(0),
    }
    with open(os.path.join(args.out, "fsdp_resume.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_main(main, parse_args)
