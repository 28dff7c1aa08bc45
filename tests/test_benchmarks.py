"""What the GPU benchmarks record when a run fails or is too long to run whole: bench_train.py's result of a training
run that runs out of memory or past its timeout (through the real `accelerate launch`, on the CPU),
bench_sample.py's seconds per video computed from a 2-step and a 6-step run, and bench_decode.py's CPU figures with
its GPU decode probe reporting that GPU decode is unavailable."""

import argparse
import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import bench_sample  # noqa: E402
import bench_train  # noqa: E402

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


def test_a_run_past_its_timeout_is_killed_with_the_processes_it_started(tmp_path, monkeypatch):
    pid_file = tmp_path / "child.pid"
    body = (
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(600)"
    )
    result = run_stand_in(tmp_path, monkeypatch, body, timeout=8)
    assert result["exit"] == "timeout"
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while time.time() < deadline and alive(child):
        time.sleep(0.1)
    assert not alive(child)


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
