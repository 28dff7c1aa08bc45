"""What the GPU benchmarks record when a run fails or is too long to run whole: bench_train.py's result of a training
run that runs out of memory or past its timeout (through the real `accelerate launch`, on the CPU), and
bench_sample.py's seconds per video computed from a 2-step and a 6-step run."""

import argparse
import os
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
