"""What the GPU benchmarks record when a run fails or is too long to run whole: bench_train.py's result of a training
run that runs out of memory or past its timeout (through the real `accelerate launch`, on the CPU),
bench_sample.py's seconds per video computed from a 2-step and a 6-step run, bench_decode.py's CPU figures with its
GPU decode probe reporting that GPU decode is unavailable, and profile_train.py's kernel categories of a training
step (a synthetic GPU trace; the real script on the CPU)."""

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402
import profile_train  # noqa: E402

from conftest import error_line, help_entries, parser_of, run_script  # noqa: E402

OOM_LINE = "error: training step 1: OutOfMemoryError: CUDA out of memory. Tried to allocate 9.00 GiB."


def run_stand_in(tmp_path, monkeypatch, body, timeout=60):
    """bench_train.run_config on a 93x704x1280 config whose training script is `body` (a stand-in for
    train_cosmos_lora.py, which takes its flags and ignores them)."""
    script = tmp_path / "train.py"
    script.write_text(f"import os, subprocess, sys, time\n{body}\n")
    monkeypatch.setitem(bench_train.CONFIGS, "stand_in", bench_train.memory_config(bench_train.NVIDIA_720P, "full"))
    out = tmp_path / "out"
    out.mkdir()
    args = argparse.Namespace(
        workdir=str(tmp_path), out=str(out), steps=5, warmup=2, timeout=timeout, script=str(script)
    )
    return bench_train.run_config("stand_in", args, "unused-model", [0])


def test_a_training_run_out_of_memory_is_a_result(tmp_path, monkeypatch):
    result = run_stand_in(
        tmp_path, monkeypatch, f"print('Traceback ...')\nprint({OOM_LINE!r}, file=sys.stderr)\nsys.exit(1)"
    )
    assert result["exit"] == 1
    assert result["error"] == OOM_LINE
    assert result["out_of_memory"] is True
    assert result["clip"] == "93x704x1280" and "samples_per_s" not in result


def test_any_other_failure_is_not_counted_as_out_of_memory(tmp_path, monkeypatch):
    line = "error: loading the model: FileNotFoundError: unused-model"
    result = run_stand_in(tmp_path, monkeypatch, f"print({line!r}, file=sys.stderr)\nsys.exit(1)")
    assert result["error"] == line
    assert result["out_of_memory"] is False


# A training process as `accelerate launch` starts one on several GPUs: torch's elastic agent gives each worker a
# session of its own, out of reach of a signal to the launcher's process group.
SLEEPING_WORKER = "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)"


def test_a_run_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    body = f"child = {SLEEPING_WORKER}\nopen({str(pid_file)!r}, 'w').write(str(child.pid))\ntime.sleep(600)"
    result = run_stand_in(tmp_path, monkeypatch, body, timeout=8)
    assert result["exit"] == "timeout"
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child)


def test_a_benchmark_stopped_by_sigterm_kills_its_runs_and_exits(tmp_path):
    """A benchmark ended by SIGTERM (a time limit, scancel) takes the runs it started with it: a training run lives in
    its own process group, which the signal sent to the benchmark alone would not reach, and would go on holding the
    GPU beside whatever runs next."""
    pid_file = tmp_path / "grandchild.pid"
    run = (
        "import subprocess, sys, time\n"
        f"child = {SLEEPING_WORKER}\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)\n"
    )
    benchmark = (
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(REPO, 'benchmarks')!r})\n"
        "import bench_train\n"
        "from cosmos_process import run_main\n"
        f"log = open({str(tmp_path / 'run.log')!r}, 'w')\n"
        f"task = lambda: bench_train.run_logged([sys.executable, '-c', {run!r}], None, log, 600)\n"
        "run_main(lambda _: bench_train.run_in_threads(task, task), lambda: None)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", benchmark], cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not (pid_file.exists() and pid_file.read_text()):
        time.sleep(0.1)
    time.sleep(0.5)  # the other thread's run starts too
    runs = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                 text=True).stdout.split()]  # fmt: skip
    grandchild = int(pid_file.read_text())
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 128 + signal.SIGTERM, process.stderr.read()[-2000:]
    assert len(runs) == 2
    deadline = time.time() + 5
    while time.time() < deadline and any(alive(pid) for pid in [*runs, grandchild]):
        time.sleep(0.1)
    assert not any(alive(pid) for pid in [*runs, grandchild])


def test_bench_train_refuses_a_machine_without_a_gpu_in_one_line_before_any_work(tmp_path):
    run = run_script(
        "benchmarks/bench_train.py", "--workdir", tmp_path / "work", "--out", tmp_path / "out", "--configs",
        "1gpu_naive", env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120,
    )  # fmt: skip
    assert error_line(run) == "error: bench_train.py measures training on GPUs, and none is visible"
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "script, flags, message",
    [
        ("bench_attention.py", [], "error: bench_attention.py times attention on a GPU, and none is visible"),
        ("find_host_syncs.py", ["--model", "m"],
         "error: find_host_syncs.py counts the host syncs of GPU sampling, and no GPU is visible"),
    ],
)  # fmt: skip
def test_gpu_only_benchmarks_refuse_a_machine_without_a_gpu_in_one_line(tmp_path, script, flags, message):
    run = run_script(f"benchmarks/{script}", "--out", tmp_path / "out", *flags, env={"CUDA_VISIBLE_DEVICES": ""},
                     timeout=120)  # fmt: skip
    assert error_line(run) == message
    assert not (tmp_path / "out").exists()


def alive(pid):
    """Whether pid runs (a zombie left for its dead parent's reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_seconds_per_video_are_computed_from_the_extra_model_calls():
    # Predict2 skips the dt = 0 step: 1 call for 2 steps, 5 for 6, 34 for 35
    runs = bench_sample.ShortRuns(seconds=(3.5, 11.5), calls=(1, 5))
    assert runs.seconds_per_call() == 2.0
    assert runs.calls_for(35) == 34
    assert runs.seconds_for(35) == pytest.approx(3.5 + 33 * 2.0)


def test_bench_sample_runs_on_the_cpu_with_the_syncs_put_back(tiny_model_25, tmp_path):
    """bench_sample.py as a user runs it, in its computed mode, on Predict2.5 (whose UniPC scheduler has syncs of its
    own to put back): each variant reports its seconds per video from a 2-step and a 6-step run, and putting the host
    syncs back changes no frame."""
    run = run_script(
        "benchmarks/bench_sample.py", "--model", tiny_model_25, "--out", tmp_path, "--num_frames", 9, "--height", 64,
        "--width", 112, "--repeats", 1, "--no-pipeline", "--no-full_videos", "--no-latent_comparison",
        "--no-profile", "--variants", "per_frame_modulation", "step_syncs", timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warm-up 2-step run (compiles)" in run.stdout and "6-step run:" in run.stdout
    results = json.loads((tmp_path / "sample_results_9x64x112.json").read_text())
    for name in ("per_frame_modulation", "step_syncs"):
        assert "error" not in results[name], results[name]
        assert results[name]["model_calls_per_video"] == 36  # 36 steps, one call each
        assert results[name]["two_step_run_s"] > 0  # the computed seconds are noise at this size on the CPU
    assert results["step_syncs"]["frames_equal_bf16_default"] is True


def test_vae_memory_counts_the_encode_and_decode_of_each_clip_on_the_cpu(tmp_path):
    run = run_script(
        "benchmarks/vae_memory.py", "--out", tmp_path, "--vae", "tiny", "--sizes", "9x32x48", "17x32x48",
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    sizes = json.loads((tmp_path / "vae_memory.json").read_text())["sizes"]
    assert [row["clip"] for row in sizes] == ["9x32x48", "17x32x48"]
    for name in ("encode", "decode"):
        assert sizes[1][f"{name}_counted_peak_bytes"] > sizes[0][f"{name}_counted_peak_bytes"]
        assert sizes[1][f"{name}_counted_peak_bytes"] > 3 * 17 * 32 * 48 * 2  # more than the clip in bf16


def run_bench_decode(tmp_path, *flags, env=None):
    script = os.path.join(REPO, "benchmarks", "bench_decode.py")
    argv = [sys.executable, script, "--out", str(tmp_path / "out"), *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=90, env=env)


def test_bench_decode_records_the_cpu_figures_and_gpu_decode_unavailable(tmp_path):
    # PyNvVideoCodec's import fails so where the driver's video libraries are missing (its own message, first line)
    package = tmp_path / "site" / "PyNvVideoCodec"
    package.mkdir(parents=True)
    reason = "Failed to load NVENC library: libnvidia-encode.so.1: cannot open shared object file: No such file"
    (package / "__init__.py").write_text(f"raise RuntimeError({reason + chr(10) * 2 + '=== TROUBLESHOOTING ==='!r})\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "site"), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, CUDA_VISIBLE_DEVICES="")
    result = run_bench_decode(tmp_path, "--seconds", "8", "--gpu_decode", env=env)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "out" / "decode_results.json") as f:
        results = json.load(f)
    assert results["gpu_decode"] == f"unavailable: RuntimeError: {reason}"
    assert results["video"]["frames"] == 240 and results["video"]["reference_clips"] == 1
    assert [row["frames"] for row in results["whole_video"]] == [240] * 4
    cpu = results["cpu_clip_path"]
    assert cpu["clips"] == 3  # --repeats 3 passes over the one clip
    assert cpu["cpu_s_per_clip"] > 0 and cpu["clips_per_s"] > 0
    assert cpu["frames_per_s"] == pytest.approx(61 * cpu["clips_per_s"], rel=0.01)
    # the stream names no matrix: FFmpeg reads it as BT.601, and BT.709 gives visibly other colours
    effect = results["colour_matrix_effect"]["bt709_vs_bt601"]
    assert 1 < effect["mean_abs"] < 10 and effect["max_abs"] > 10


def test_bench_decode_refuses_a_video_too_short_for_one_clip(tmp_path):
    result = run_bench_decode(tmp_path, "--seconds", "5")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --seconds 5 is shorter than one reference clip (61 frames at 8 fps: 7.53 s)"
    )
    assert not (tmp_path / "out").exists()


class Trace:
    """A Chrome trace being written: CPU ops on the main thread, and kernels each launched by a runtime call inside
    the innermost open op, tied to it by a correlation id. CPU times in microseconds; each kernel runs for `dur`
    hundredths of a millisecond on the GPU, one after the other."""

    def __init__(self):
        self.events, self.now, self.gpu_now, self.correlation = [], 0, 0, 0

    def op(self, name, dims=(), dur=50, cat="cpu_op"):
        event = {"cat": cat, "name": name, "ts": self.now, "dur": dur, "tid": 1, "args": {"Input Dims": list(dims)}}
        self.events.append(event)
        self.now += 1
        return event

    def kernel(self, name, dur, cat="kernel", launch="cudaLaunchKernel"):
        self.correlation += 1
        args = {"correlation": self.correlation}
        self.events.append({"cat": "cuda_runtime", "name": launch, "ts": self.now, "dur": 2, "tid": 1, "args": args})
        self.events.append({"cat": cat, "name": name, "ts": self.gpu_now, "dur": 10 * dur, "tid": 7, "args": args})
        self.now, self.gpu_now = self.now + 3, self.gpu_now + 10 * dur

    def launched_by(self, op, dims, kernel, dur):
        """`kernel` launched inside a fresh CPU op `op` of these input dims."""
        self.op(op, dims, dur=4)
        self.kernel(kernel, dur)


def test_each_kernel_is_counted_by_what_launched_it():
    widths = profile_train.MatmulWidths(lora_ranks=(16,), adapter_width=256, adaln_width=256, hidden=2048)
    trace = Trace()
    tokens = 4 * 7168
    trace.launched_by("aten::_scaled_dot_product_cudnn_attention", [[4, 16, tokens, 128]] * 3, "cudnn_flash_fwd", 400)
    # bf16 and FP8 GEMMs of a frozen weight
    trace.launched_by("aten::mm", [[tokens, 2048], [2048, 2048], [tokens, 2048]], "nvjet_tst_128x256_h_bz_coopA", 300)
    trace.launched_by("aten::_scaled_mm", [[tokens, 2048], [2048, 8192], [], []], "sm90_xmma_gemm_e4m3bf16", 200)
    # LoRA A, inside aten::linear (the innermost op counts), and a LoRA B weight gradient with the rank as rows
    trace.op("aten::linear", [[4, 7168, 2048], [2048, 2048]], dur=10)
    trace.launched_by("aten::mm", [[tokens, 2048], [2048, 16]], "sm90_xmma_gemm_bf16bf16_tn", 30)
    trace.launched_by("aten::mm", [[16, tokens], [tokens, 2048]], "sm90_xmma_gemm_bf16bf16_nt", 20)
    # the temporal adapter's down projection (with its bias) and its depthwise convolution (a cuDNN kernel)
    trace.launched_by("aten::addmm", [[256], [tokens, 2048], [2048, 256], [], []], "nvjet_tst_64x8", 40)
    trace.launched_by("aten::cudnn_convolution", [[28672, 256, 16], [256, 1, 3]], "cudnn::depthwise_conv_fwd", 10)
    # AdaLN's per-frame linear_1: the same width, one row per latent frame
    trace.launched_by("aten::mm", [[64, 2048], [2048, 256]], "gemv2T_kernel_val", 5)
    # inductor's kernels: LayerNorm fused with the AdaLN modulation; a copy for cuDNN attention is not attention
    trace.kernel("triton_per_fused_add_mul_native_layer_norm_7", 60, launch="cuLaunchKernelEx")
    trace.kernel("triton_poi_fused__scaled_dot_product_cudnn_attention_3", 25, launch="cuLaunchKernelEx")
    trace.kernel("triton_poi_fused_add_gelu_mul_9", 35, launch="cuLaunchKernelEx")
    # the same elementwise kernel inside and outside Optimizer.step, gradient clipping's foreach norm, the EMA
    trace.op("Optimizer.step#AdamW.step", dur=20, cat="user_annotation")
    trace.launched_by("aten::mul_", [[16, 2048], []], "vectorized_elementwise_kernel<4, mul>", 8)
    trace.now += 20
    trace.launched_by("aten::mul_", [[16, 2048], []], "vectorized_elementwise_kernel<4, mul>", 4)
    trace.launched_by("aten::_foreach_norm", [], "multi_tensor_apply_kernel<LpNormFunctor>", 6)
    trace.launched_by("aten::lerp_", [[16, 2048], [16, 2048], []], "vectorized_elementwise_kernel<4, lerp>", 2)
    trace.launched_by("aten::copy_", [[4, 16, 16, 32, 56]], "Memcpy HtoD (Pinned -> Device)", 15)
    trace.events[-1]["cat"] = "gpu_memcpy"
    trace.kernel("ncclDevKernel_AllReduce_Sum_f32", 50)

    summary = profile_train.summarize_trace(trace.events, steps=1, wall_s=trace.gpu_now / 1e6, widths=widths)
    assert summary["kernel_ms"] == {
        "base matmul": 5.0,
        "attention": 4.0,
        "norm and AdaLN": 0.65,
        "elementwise and other": 0.64,  # 25 + 35 + 4
        "LoRA matmul": 0.5,
        "adapter": 0.5,  # 40 + 10
        "communication": 0.5,
        "optimizer": 0.16,  # 8 + 6 + 2
        "data": 0.15,
    }
    busy = 12.1  # ms: every kernel above, one after the other
    assert summary["gpu_busy_ms"] == busy and summary["gpu_idle_ms"] == 0
    assert summary["kernel_share_of_busy"]["base matmul"] == round(5.0 / busy, 3)
    assert summary["kernel_share_of_busy"]["optimizer"] == round(0.16 / busy, 3)
    assert summary["matmul_widths"]["lora_ranks"] == (16,)
    assert summary["top_kernels_ms"]["elementwise and other"] == [
        ["triton_poi_fused_add_gelu_mul_9", 0.35],
        ["triton_poi_fused__scaled_dot_product_cudnn_attention_3", 0.25],
        ["vectorized_elementwise_kernel<4, mul>", 0.04],
    ]


def test_a_gemm_is_sorted_by_its_matrix_dimensions():
    widths = profile_train.MatmulWidths(lora_ranks=(32,), adapter_width=None, adaln_width=256, hidden=2048)
    category = profile_train.matmul_category
    assert category({7168, 2048, 32}, widths) == "LoRA matmul"
    assert category({7168, 2048, 256}, widths) == "base matmul"  # no adapters: the dimension is nobody's
    assert category({32, 256, 6144}, widths) == "norm and AdaLN"  # batch x frames = 32 rows is AdaLN's, not LoRA
    assert category({7168, 2048}, profile_train.MatmulWidths()) == "base matmul"
    # batch dimensions of a bmm are not matrix dimensions
    assert profile_train.matmul_dims([[32, 7168, 128], [32, 128, 512], []]) == {7168, 128, 512}


def test_profile_train_profiles_a_recipe_at_a_batch_size_on_the_cpu(tiny_model, tmp_path):
    """The real script on the CPU (no kernels there): one run per --recipes entry at --batch_size, the run's own
    widths in its summary, and a trace whose CPU ops carry the shapes that sort its GEMMs."""
    run = run_script(
        "benchmarks/profile_train.py", "--workdir", tmp_path / "work", "--out", tmp_path / "out",
        "--model", tiny_model, "--configs", "cpu.yaml", "--recipes", "nvidia", "--batch_size", 1,
        "--warmup", 3, "--profile_steps", 1, "--train_args", timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "profile_cpu_nvidia.json").read_text())
    assert (result["recipe"], result["batch_size"], result["train_args"]) == ("nvidia", 1, [])
    assert "steps: 100%" in (tmp_path / "out" / "profile_cpu_nvidia.log").read_text()  # the run's log, in --out
    # the rate without the profiler: warm-up step 3 only (steps 1-2 compile; step 4 is profiled)
    run_dir = tmp_path / "work" / "profile_runs" / "cpu_nvidia"
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert result["unprofiled"]["steps"] == 1
    assert result["unprofiled"]["samples_per_s"] == round(rows[2]["samples_per_s"], 3)
    (rank,) = result["ranks"]
    # NVIDIA's Predict2 recipe: rank 16, no temporal adapters; the tiny transformer: hidden 2 x 48, adaln_lora_dim 4
    assert rank["matmul_widths"] == {"lora_ranks": [16], "adapter_width": None, "adaln_width": 4, "hidden": 96}
    assert rank["kernel_ms"] == {} and rank["gpu_busy_ms"] == 0
    events = json.loads((run_dir / "trace_rank0.json").read_text())
    events = events["traceEvents"]
    widths = profile_train.MatmulWidths((16,), None, 4, 96)
    matmuls = [e["args"]["Input Dims"] for e in events if e.get("cat") == "cpu_op" and e["name"] == "aten::mm"]
    kinds = Counter(profile_train.matmul_category(profile_train.matmul_dims(dims), widths) for dims in matmuls)
    assert set(kinds) == {"base matmul", "LoRA matmul", "norm and AdaLN"}
    # AdaLN: 2 blocks x 3 norms x linear_1, linear_2, and norm_out's two, forward only (the timestep needs no grad)
    assert kinds["norm and AdaLN"] == 14
    assert any(e["name"].startswith(profile_train.OPTIMIZER_ANNOTATION) for e in events)


def test_a_profiled_run_that_fails_ends_with_its_error_line_as_a_result(tiny_model, tmp_path):
    """A profiled run stopped by a NaN loss, with the training script's default DataLoader workers, exits (it once
    waited on its workers forever) and is recorded by its error line; the benchmark goes on and exits 0."""
    run = run_script(
        "benchmarks/profile_train.py", "--workdir", tmp_path / "work", "--out", tmp_path / "out",
        "--model", tiny_model, "--configs", "cpu.yaml", "--recipes", "nvidia", "--batch_size", 1,
        "--warmup", 3, "--profile_steps", 1, "--train_args", "--learning_rate", "1e12", timeout=150,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "profile_cpu_nvidia.json").read_text())
    assert result["exit"] == 1 and result["out_of_memory"] is False
    assert result["error"] == "error: loss is nan at step 2; stopping before the update (last checkpoint: none)"
    assert result["log"] == str(tmp_path / "out" / "profile_cpu_nvidia.log")


def test_an_export_check_whose_run_fails_ends_with_its_error_line(tiny_model, tmp_path):
    """The same for benchmarks/check_export.py's per-rank probe: the failed run exits and its error line is the
    mode's result."""
    run = run_script(
        "benchmarks/check_export.py", "--workdir", tmp_path / "work", "--out", tmp_path / "out",
        "--model", tiny_model, "--config_file", os.path.join(REPO, "accelerate_configs", "cpu.yaml"),
        "--modes", "none", "--train_args", "--learning_rate", "1e12", timeout=150,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "export_check.json").read_text())["none"]
    assert result["exit"] == 1 and result["log"] == str(tmp_path / "out" / "export_check_none.log")
    assert result["error"] == "error: loss is nan at step 2; stopping before the update (last checkpoint: none)"


def test_profile_train_refuses_a_missing_model_before_any_work(tmp_path):
    run = run_script(
        "benchmarks/profile_train.py", "--workdir", tmp_path, "--out", tmp_path / "out", "--model", tmp_path / "none",
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: --model {tmp_path / 'none'}: no model_index.json there (not a diffusers checkpoint)"
    )
    assert not (tmp_path / "out").exists()


def test_bench_vae_convs_counts_the_encode_convolutions_as_the_flop_counter_does():
    """The convolution list behind bench_vae_convs.py's timings (recorded on the meta device) has the FLOPs that
    torch.utils.flop_counter counts for the convolutions of a real encode."""
    import bench_vae_convs
    import torch
    from diffusers import AutoencoderKLWan
    from torch.utils.flop_counter import FlopCounterMode

    import cosmos_vae
    import make_random_cosmos

    calls = bench_vae_convs.encode_conv_calls("tiny", 9, 32, 48)
    vae = AutoencoderKLWan(**make_random_cosmos.VAE_CONFIGS["tiny"]).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        cosmos_vae.encode_whole_clip(vae, torch.rand(2, 3, 9, 32, 48))
    convolution_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert sum(count * call.flops(2) for call, count in calls.items()) == convolution_flops
    encoder_convolutions = sum(isinstance(m, torch.nn.modules.conv._ConvNd) for m in vae.encoder.modules())
    assert sum(calls.values()) == encoder_convolutions + 1  # each runs once, and the VAE's quant_conv after them


def test_bench_vae_convs_time_tap_fold_is_the_same_convolution():
    import bench_vae_convs
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 7, 6, 5, dtype=torch.float64, generator=generator)
    weight = torch.randn(3, 4, 3, 3, 3, dtype=torch.float64, generator=generator)
    direct = torch.nn.functional.conv3d(x, weight, padding=(0, 1, 1))  # [2, 3, 5, 6, 5]
    folded = torch.nn.functional.conv2d(
        bench_vae_convs.fold_time_taps(x), bench_vae_convs.folded_weight(weight), padding=1
    )
    assert torch.allclose(folded, direct.transpose(1, 2).flatten(0, 1), atol=1e-12)


def test_bench_vae_convs_runs_and_records_each_search_size(tmp_path):
    script = os.path.join(REPO, "benchmarks", "bench_vae_convs.py")
    argv = [sys.executable, script, "--size", "tiny", "--frames", "5", "--height", "16", "--width", "32"]
    argv += ["--repeats", "1", "--benchmark_limits", "10", "--out", str(tmp_path)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "vae_convs_results.json") as f:
        results = json.load(f)
    rows = results["limit_10"]["rows"]
    assert len(rows) == len({row["conv"] for row in rows}) > 5 and all(row["ms_per_clip"] > 0 for row in rows)
    assert results["alternatives"]["time_folded_2d"]["max_abs_difference"] < 1e-4


def test_bench_cache_decode_cost_runs_torch_at_one_thread_as_a_dataloader_worker(monkeypatch):
    import bench_cache
    import torch

    seen = []
    monkeypatch.setattr(bench_cache, "video_clips", lambda path: seen.append(torch.get_num_threads()) or [path] * 3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cost = bench_cache.decode_cost(["a.mp4", "b.mp4"])
        assert seen == [1, 1] and cost["clips"] == 6
        assert torch.get_num_threads() == 2  # given back
    finally:
        torch.set_num_threads(threads)


MISSING_MODEL = (["--model", "{tmp}/nowhere"], "error: --model {tmp}/nowhere: no such checkpoint folder")
TOO_SHORT = (["--seconds", "4"], "error: --seconds 4 is shorter than one reference clip (61 frames at 8 fps: 7.53 s)")


NO_GPUS = ([], "error: check_fsdp_resume.py runs on 3 GPUs, and 0 are visible")


@pytest.mark.parametrize(
    "script, bad_input",
    [
        ("bench_cache.py", MISSING_MODEL),
        ("check_export.py", MISSING_MODEL),
        ("bench_cache.py", TOO_SHORT),
        ("check_fsdp_resume.py", NO_GPUS),
    ],
)
def test_benchmarks_refuse_bad_input_in_one_line_before_any_work(tmp_path, script, bad_input):
    flags, message = ([flag.format(tmp=tmp_path) for flag in bad_input[0]], bad_input[1].format(tmp=tmp_path))
    run = run_script(f"benchmarks/{script}", "--workdir", tmp_path / "work", "--out", tmp_path / "out", *flags,
                     env={"CUDA_VISIBLE_DEVICES": ""}, timeout=90)  # fmt: skip
    assert error_line(run) == message
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


SCRIPTS_WITH_FLAGS = sorted(
    os.path.relpath(os.path.join(folder, name), REPO)
    for folder in (os.path.join(REPO, "benchmarks"), os.path.join(REPO, "tools"))
    for name in os.listdir(folder)
    if name.endswith(".py")
)


@pytest.mark.parametrize("path", SCRIPTS_WITH_FLAGS)
def test_every_benchmark_and_tool_shows_each_flags_default_in_its_help(path, monkeypatch):
    """Each optional flag's help entry ends with the default a command line without it gets."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line of help per flag
    parser = parser_of(importlib.import_module(os.path.basename(path)[: -len(".py")]), monkeypatch)
    entries = help_entries(parser.format_help())
    optional = [a for a in parser._actions if a.option_strings and not a.required and argparse.SUPPRESS not in
                (a.default, a.help) and not isinstance(a, argparse._StoreFalseAction)]  # fmt: skip
    for action in optional:
        assert f"(default: {action.default})" in entries[action.option_strings[0]], (path, action.option_strings)
