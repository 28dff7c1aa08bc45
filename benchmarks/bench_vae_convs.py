#!/usr/bin/env python
"""Every distinct convolution of the whole-clip Wan2.1 encode, timed alone: where the encode's convolution time goes.

cache_latents.py encodes clips with cosmos_vae.encode_whole_clip (compiled, channels-last). Its profile puts about
73 ms per reference clip (61x256x448) in cuDNN's convolutions and more than half of that in one kernel. This
benchmark lists the encode's convolutions (shapes recorded on the meta device, so the list is exact for any clip
size), then times each one alone on the GPU at --batch_size, channels-last bf16 with cuDNN autotuning, as
clips-worth of milliseconds and TFLOP/s:

- `limit_N`: cuDNN's algorithm search trying N candidates (torch.backends.cudnn.benchmark_limit; PyTorch's default
  is 10, 0 tries every one), each N in a fresh process, since cuDNN's choice is cached per shape;
- for the costliest shape, other ways to compute the same convolution: its 3 time taps folded into channels as one
  2D convolution (the fold is a copy, timed apart), its output channels padded to the next multiple of 64, and
  inductor's Triton convolution template (torch.compile mode max-autotune-no-cudagraphs, in its own process).

    python benchmarks/bench_vae_convs.py --out results/
    python benchmarks/bench_vae_convs.py --size tiny --frames 9 --height 32 --width 48 --out /tmp/c  # CPU smoke
"""

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vae_encode import DEVICE, DTYPE, add_clip_arguments, child_result, clip_flags, synchronize  # noqa: E402

import cosmos_vae  # noqa: E402
from cosmos_cli import HelpFormatter


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for vae_convs_results.json.")
    add_clip_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=4, help="Clips per convolution call.")
    parser.add_argument("--repeats", type=int, default=10, help="Timed calls per convolution, after the first.")
    parser.add_argument(
        "--benchmark_limits", type=int, nargs="+", default=[10, 0], help="cuDNN search sizes to compare (0: all)."
    )
    parser.add_argument(
        "--triton", action=argparse.BooleanOptionalAction, default=True, help="Time inductor's Triton template too."
    )
    parser.add_argument("--timeout", type=int, default=240, help="Seconds each measuring process may take.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # limit_N, alternatives or triton
    return parser.parse_args(argv)


@dataclasses.dataclass(frozen=True)
class ConvCall:
    """One aten.convolution of the encode for one clip: input and weight shapes, stride, padding, groups. The input's
    first dimension is 1 for a 3D convolution and the clip's frames for a 2D one (a per-frame spatial convolution)."""

    input_shape: tuple
    weight_shape: tuple
    stride: tuple
    padding: tuple
    groups: int

    def output_shape(self, batch_size):
        spatial = [
            (size + 2 * pad - kernel) // step + 1
            for size, pad, kernel, step in zip(
                self.input_shape[2:], self.padding, self.weight_shape[2:], self.stride, strict=True
            )
        ]
        return (batch_size * self.input_shape[0], self.weight_shape[0], *spatial)

    def flops(self, batch_size):
        """Multiply-adds x 2 of a call on batch_size clips (as torch.utils.flop_counter counts a convolution)."""
        return 2 * math.prod(self.output_shape(batch_size)) * math.prod(self.weight_shape[1:])

    def label(self):
        kernel = "x".join(map(str, self.weight_shape[2:]))
        size = "x".join(map(str, self.input_shape[2:]))
        return f"{self.weight_shape[1]}->{self.weight_shape[0]} k{kernel} s{max(self.stride)} in {size}"


class ConvRecorder(TorchDispatchMode):
    """Counts the aten.convolution calls made under it, by ConvCall."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            x, weight, _, stride, padding, _, _, _, groups = args
            self.calls[ConvCall(tuple(x.shape), tuple(weight.shape), tuple(stride), tuple(padding), groups)] += 1
        return func(*args, **(kwargs or {}))


def encode_conv_calls(size, frames, height, width):
    """The encode's convolutions for one clip and how often each runs, from a run on the meta device."""
    from diffusers import AutoencoderKLWan

    import make_random_cosmos

    with torch.device("meta"):
        vae = AutoencoderKLWan(**make_random_cosmos.VAE_CONFIGS[size])
        clip = torch.empty(1, 3, frames, height, width)
    with ConvRecorder() as recorder, torch.no_grad():
        cosmos_vae.encode_whole_clip(vae, clip)
    return recorder.calls


def channels_last(tensor):
    return tensor.contiguous(memory_format=torch.channels_last_3d if tensor.ndim == 5 else torch.channels_last)


def seconds_per_call(function, repeats):
    """Mean seconds of function() over `repeats` calls after a first (autotuning, compiling) one."""
    function()
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize()
    return (time.perf_counter() - start) / repeats


def conv_inputs(call, batch_size, out_channels=None):
    """Random channels-last input and weight (its output channels zero-padded to out_channels) for call."""
    generator = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn(
        (batch_size * call.input_shape[0], *call.input_shape[1:]), generator=generator, device=DEVICE, dtype=DTYPE
    )
    weight = torch.randn(call.weight_shape, generator=generator, device=DEVICE, dtype=DTYPE) * 0.02
    if out_channels is not None:
        weight = F.pad(weight, (0,) * (2 * (weight.ndim - 2)) + (0, 0, 0, out_channels - weight.shape[0]))
    return channels_last(x), channels_last(weight)


def conv(call, x, weight):
    function = F.conv3d if weight.ndim == 5 else F.conv2d
    return function(x, weight, None, call.stride, call.padding, 1, call.groups)


def time_call(call, count, args):
    """ms per clip (all `count` calls of a clip) and TFLOP/s of call, run alone at args.batch_size."""
    x, weight = conv_inputs(call, args.batch_size)
    seconds = seconds_per_call(lambda: conv(call, x, weight), args.repeats)
    return {
        "conv": call.label(),
        "calls_per_clip": count,
        "tflop_per_clip": round(count * call.flops(1) / 1e12, 3),
        "ms_per_clip": round(1e3 * count * seconds / args.batch_size, 2),
        "tflops": round(call.flops(args.batch_size) / seconds / 1e12, 1),
    }


def fold_time_taps(x):
    """[B, C, T+2, H, W] -> [B*T, 3C, H, W]: each output frame's 3 input frames side by side in channels, so a
    kernel-3 time convolution becomes a 2D one whose weight is the 3 time taps concatenated along input channels."""
    frames = x.shape[2] - 2
    taps = torch.cat([x[:, :, k : k + frames] for k in range(3)], dim=1)
    return channels_last(taps.transpose(1, 2).flatten(0, 1))


def folded_weight(weight):
    """[O, C, 3, kh, kw] -> [O, 3C, kh, kw], the time taps in the order fold_time_taps puts their frames."""
    return channels_last(torch.cat(weight.unbind(2), dim=1))


def alternatives(call, count, args):
    """Other ways to compute call: the time-tap fold into a 2D convolution, and output channels padded to 64k."""
    per_clip = 1e3 * count / args.batch_size
    x, weight = conv_inputs(call, args.batch_size)
    rows = {
        "conv": call.label(),
        "direct_ms_per_clip": round(per_clip * seconds_per_call(lambda: conv(call, x, weight), args.repeats), 2),
    }
    if weight.ndim == 5 and weight.shape[2] == 3 and call.stride[0] == 1 and call.padding[0] == 0:
        folded, weight_2d = fold_time_taps(x), folded_weight(weight)
        call_2d = dataclasses.replace(call, stride=call.stride[1:], padding=call.padding[1:])
        direct = channels_last(conv(call, x, weight).transpose(1, 2).flatten(0, 1))
        difference = (conv(call_2d, folded, weight_2d) - direct).float().abs().max()
        rows["time_folded_2d"] = {
            "fold_ms_per_clip": round(per_clip * seconds_per_call(lambda: fold_time_taps(x), args.repeats), 2),
            "conv_ms_per_clip": round(
                per_clip * seconds_per_call(lambda: conv(call_2d, folded, weight_2d), args.repeats), 2
            ),
            "max_abs_difference": float(f"{difference.item():.3g}"),
        }
    padded_channels = -(-call.weight_shape[0] // 64) * 64
    if padded_channels != call.weight_shape[0]:
        x, weight = conv_inputs(call, args.batch_size, out_channels=padded_channels)
        rows[f"out_channels_padded_to_{padded_channels}_ms_per_clip"] = round(
            per_clip * seconds_per_call(lambda: conv(call, x, weight), args.repeats), 2
        )
    return rows


def triton_template(call, count, args):
    """call compiled with inductor's max-autotune (which times its Triton convolution templates against cuDNN)."""
    x, weight = conv_inputs(call, args.batch_size)
    compiled = torch.compile(lambda x, w: conv(call, x, w), mode="max-autotune-no-cudagraphs", dynamic=False)
    start = time.perf_counter()
    compiled(x, weight)
    synchronize()
    compile_s = time.perf_counter() - start
    seconds = seconds_per_call(lambda: compiled(x, weight), args.repeats)
    return {
        "conv": call.label(),
        "compile_s": round(compile_s, 1),
        "ms_per_clip": round(1e3 * count * seconds / args.batch_size, 2),
    }


def measure(args, calls):
    """The child's measurement: rows for every call under one cuDNN search size, or the costliest call's others."""
    torch.backends.cudnn.benchmark = True  # as cache_latents.py
    if args.child.startswith("limit_"):
        torch.backends.cudnn.benchmark_limit = int(args.child.removeprefix("limit_"))
        rows = [time_call(call, count, args) for call, count in calls.items()]
        return {"rows": rows, "total_ms_per_clip": round(sum(r["ms_per_clip"] for r in rows), 2)}
    call, count = costliest(calls, args.batch_size)
    return (alternatives if args.child == "alternatives" else triton_template)(call, count, args)


def costliest(calls, batch_size):
    """The call with the most FLOPs per clip, with its count."""
    return max(calls.items(), key=lambda item: item[1] * item[0].flops(batch_size))


def run_child(args, child):
    """Measure `child` in a fresh process (cuDNN caches its algorithm choice per shape for the process)."""
    argv = [sys.executable, os.path.abspath(__file__), "--child", child, "--out", args.out, *clip_flags(args)]
    argv += ["--batch_size", str(args.batch_size), "--repeats", str(args.repeats)]
    return child_result(argv, timeout=args.timeout)


def main(args):
    calls = encode_conv_calls(args.size, args.frames, args.height, args.width)
    if args.child:
        print(json.dumps(measure(args, calls)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = {
        "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "clip": f"{args.frames}x{args.height}x{args.width}",
        "args": vars(args),
        "tflop_per_clip": round(sum(count * call.flops(1) for call, count in calls.items()) / 1e12, 3),
    }

    def record(name, value):  # saved after every measurement, so a cut-off run keeps what it measured
        results[name] = value
        print(name, json.dumps(value), flush=True)
        with open(os.path.join(args.out, "vae_convs_results.json"), "w") as f:
            json.dump(results, f, indent=2)

    for limit in args.benchmark_limits:
        record(f"limit_{limit}", run_child(args, f"limit_{limit}"))
    record("alternatives", run_child(args, "alternatives"))
    if args.triton and DEVICE.type == "cuda":
        record("triton_template", run_child(args, "triton"))
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
