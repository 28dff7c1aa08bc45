#!/usr/bin/env python
"""The exported LoRA and adapter files hold exactly the tensors each rank trained, under every checkpointing mode.

For each --gradient_checkpointing mode, train_cosmos_lora.py runs a few steps at a high learning rate under
`accelerate launch` (FSDP2 on 3 GPUs by default). After its export, every rank compares its own in-memory shard of
every trainable parameter with the matching rows of the exported full tensor (FSDP2 shards dim 0 as torch.chunk
does), bit for bit. It also checks that no trainable parameter is missing from the files or extra in them, and that
every zero-initialised tensor (lora_B, the adapters' up-projections) has moved away from zero.

    python benchmarks/check_export.py --workdir /tmp/bench --out results/          # 2B model, fsdp3.yaml, GPUs 0-2
"""

import argparse
import json
import os
import re
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train  # noqa: E402

import cosmos_run  # noqa: E402
import train_cosmos_lora as train  # noqa: E402
from cosmos_adapters import ADAPTER_WEIGHTS, LORA_WEIGHTS, read_exported_weights
from cosmos_cli import HelpFormatter
from cosmos_process import run_main

REPO = bench_train.REPO
WRAPPER_PREFIXES = re.compile(r"(^module\.)|(_checkpoint_wrapped_module\.)|(_orig_mod\.)")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--workdir", required=True, help="Where the model, cache and runs go.")
    parser.add_argument("--out", required=True, help="Where export_check.json goes.")
    parser.add_argument("--model", default=None, help="Checkpoint to train. Default: build the random 2B one.")
    parser.add_argument(
        "--config_file",
        default=os.path.join(REPO, "accelerate_configs", "fsdp3.yaml"),
        help="accelerate config to launch with.",
    )
    parser.add_argument(
        "--modes", nargs="+", default=["none", "full", "selective"], help="--gradient_checkpointing modes to check."
    )
    parser.add_argument("--steps", type=int, default=3, help="Training steps per mode.")
    parser.add_argument(
        "--train_args",
        nargs=argparse.REMAINDER,
        default=[],
        help="Extra train_cosmos_lora.py flags (last on the command line).",
    )
    args = parser.parse_args()
    bench_train.refuse_a_missing_model_folder(args.model)
    return args


def compare_rank_with_export(model, output_dir):
    """This rank's shard of every trainable parameter against the exported file; a dict of findings."""
    exported = read_exported_weights(output_dir)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    trained = {WRAPPER_PREFIXES.sub("", name): p for name, p in model.named_parameters() if p.requires_grad}
    mismatched, not_moved = [], []
    for name, param in trained.items():
        if name not in exported:
            continue
        local = param.to_local() if hasattr(param, "to_local") else param
        full = exported[name]
        if hasattr(param, "to_local"):  # FSDP2: rank r holds chunk r of dim 0
            chunks = torch.chunk(full, world, dim=0)
            full = chunks[rank] if rank < len(chunks) else full[:0]
        if not torch.equal(local.detach().float().cpu(), full.float()):
            mismatched.append(name)
        zero_initialised = ".lora_B." in name or name.endswith("up.weight") or name.endswith("up.bias")
        if zero_initialised and not exported[name].abs().sum() > 0:
            not_moved.append(name)
    sharded = sum(hasattr(p, "to_local") for p in trained.values())
    return {
        "rank": rank,
        "world_size": world,
        "trainable": len(trained),
        "sharded_as_dtensor": sharded,
        "exported": len(exported),
        "missing_from_export": sorted(set(trained) - set(exported))[:5],
        "extra_in_export": sorted(set(exported) - set(trained))[:5],
        "mismatched": mismatched[:5],
        "num_mismatched": len(mismatched),
        "zero_initialised_not_moved": not_moved[:5],
    }


def wait_for_export(output_dir, timeout=600):
    names = [LORA_WEIGHTS, ADAPTER_WEIGHTS]
    deadline = time.time() + timeout
    while any(os.path.exists(os.path.join(output_dir, name)) for name in (".export", ".export.tmp")) or not all(
        os.path.exists(os.path.join(output_dir, name)) for name in names
    ):
        if time.time() > deadline:
            raise TimeoutError(f"no export in {output_dir} after {timeout} s")
        time.sleep(0.5)


def probe(train_argv, report_path):
    """Run train_cosmos_lora.main and then compare this rank's final parameters with the export. The __main__ block
    runs it through run_main, so a failed run prints its error line and exits instead of waiting on its DataLoader
    workers."""
    captured = {}
    trainable_state_dict = cosmos_run.trainable_state_dict

    def capture(model):  # main() calls it on the prepared model for checkpoints and for the final export
        captured["model"] = model
        return trainable_state_dict(model)

    cosmos_run.trainable_state_dict = capture
    args = train.parse_args(train_argv)
    assert train.main(args) == 0
    wait_for_export(args.output_dir)  # rank 0 writes it after the process group is gone
    result = compare_rank_with_export(captured["model"], args.output_dir)
    with open(f"{report_path}.rank{result['rank']}.json", "w") as f:
        json.dump(result, f, indent=2)


def run_mode(args, model, cache, mode):
    output = os.path.join(args.workdir, f"export_check_{mode}")
    shutil.rmtree(output, ignore_errors=True)  # also removes rank reports of an earlier run
    train_argv = [
        *bench_train.training_flags(model, cache, output, args.steps, checkpointing_steps=1000),
        "--learning_rate",
        "1e-2",
        "--gradient_checkpointing",
        mode,
        *args.train_args,
    ]
    command = bench_train.launch_command(
        args.config_file, os.path.abspath(__file__), "--probe", os.path.join(output, "export_check"), *train_argv
    )
    log_path = os.path.join(args.out, f"export_check_{mode}.log")
    with open(log_path, "w") as log:  # the run is killed with its launcher if this check is stopped
        code = bench_train.run_logged(command, None, log, None)
    if code:  # the run's error line; its whole output stays in log_path
        return {"exit": code, "error": bench_train.failure_line(log_path), "log": log_path}
    ranks = [
        json.load(open(os.path.join(output, name)))
        for name in sorted(os.listdir(output))
        if name.startswith("export_check.rank")
    ]
    ok = all(
        not r["missing_from_export"]
        and not r["extra_in_export"]
        and not r["num_mismatched"]
        and not r["zero_initialised_not_moved"]
        for r in ranks
    )
    return {"ok": ok and len(ranks) == ranks[0]["world_size"], "ranks": ranks}


def main(args):
    os.makedirs(args.out, exist_ok=True)
    model = args.model or bench_train.random_2b_checkpoint(args.workdir)
    cache = bench_train.synthetic_cache_for(model, args.workdir)
    results = {"config_file": os.path.basename(args.config_file), "steps": args.steps}
    for mode in args.modes:
        results[mode] = run_mode(args, model, cache, mode)
        print(mode, json.dumps(results[mode])[:800], flush=True)
        with open(os.path.join(args.out, "export_check.json"), "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--probe":  # one rank of a launched run
        run_main(lambda train_argv: probe(train_argv, sys.argv[2]), lambda: sys.argv[3:])
    else:
        run_main(main, parse_args)
