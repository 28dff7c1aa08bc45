"""Every script, run as a real process with DataLoader workers, exits soon after a failure: non-zero, with one
`error:` line that names the stage, no process left behind, no partial file, and a rerun that picks up the work.

The faults are real (a NaN loss, deleted clip files, signals) or injected by tests/inject_fault.py, which runs the
script's own main through the same entry point as its `__main__` block. The runs of one wave start together and
are checked one by one, so the module costs about as much as its slowest runs, not their sum.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import REPO, TWO_CPU_PROCESSES

INJECT = os.path.join(REPO, "tests", "inject_fault.py")
TIMEOUT = 240  # seconds a whole wave may take on a loaded 2-core machine; a hang fails here instead of waiting
EXIT_AFTER_ERROR = 20.0  # seconds from the printed error line to the exit: about 1-3 s alone, more while a wave runs


class Run:
    """One script in its own process group, its output lines timestamped as they arrive."""

    def __init__(self, argv, env=None):
        self.lines, self.exit_time = [], None
        self.process = subprocess.Popen(
            [str(a) for a in argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
            start_new_session=True,  # a process group of its own: signals go to it as SLURM sends them
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip("\n")))
        self.process.wait()
        self.exit_time = time.time()

    def signal_group(self, signum):
        os.killpg(self.process.pid, signum)
        self.signal_time = time.time()

    def wait(self, deadline):
        self.reader.join(max(0.0, deadline - time.time()))
        if self.reader.is_alive():
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"still running after the wave's {TIMEOUT} s:\n{self.text()[-3000:]}")
        return self

    def text(self):
        return "\n".join(line for _, line in self.lines)

    def error_line(self):
        """The last line, checked to be the one `error:` line; returns it and the time it was printed."""
        assert self.lines, "no output"
        stamp, last = self.lines[-1]
        assert last.startswith("error: "), self.text()[-3000:]
        return last, stamp

    def group_is_gone(self):
        try:
            os.killpg(self.process.pid, 0)
        except ProcessLookupError:
            return True
        return False


def run_waves(*waves):
    """Start each wave's runs together: {name: (argv, env, trigger)}, trigger(run) -> True once it has acted."""
    done = {}
    for wave in waves:
        wave = wave(done) if callable(wave) else wave
        runs = {name: Run(argv, env) for name, (argv, env, _) in wave.items()}
        triggers = {name: trigger for name, (_, _, trigger) in wave.items() if trigger}
        deadline = time.time() + TIMEOUT
        while triggers and time.time() < deadline:
            for name, trigger in list(triggers.items()):
                if runs[name].exit_time or trigger(runs[name]):
                    del triggers[name]
            time.sleep(0.1)
        done.update({name: run.wait(deadline) for name, run in runs.items()})
    return done


def assert_failed_fast(run, code=1):
    line, stamp = run.error_line()
    assert run.process.returncode == code, run.text()[-3000:]
    assert run.exit_time - stamp < EXIT_AFTER_ERROR, f"exited {run.exit_time - stamp:.1f} s after: {line}"
    assert run.group_is_gone(), "a worker process outlived the script"
    return line


def temp_files(folder):
    return [p for p in glob.glob(os.path.join(folder, "**", "*tmp*"), recursive=True)]


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------
def train_argv(model, cache, out, *extra, fault=None):
    script = [INJECT, fault, "train_cosmos_lora.py"] if fault else [os.path.join(REPO, "train_cosmos_lora.py")]
    flags = ["--pretrained_model_name_or_path", model, "--cache_dir", cache, "--output_dir", out]
    flags += ["--report_to", "none", "--num_validation_clips", "1", "--train_batch_size", "1"]
    return [sys.executable, *script, *flags, *map(str, extra)]


def first_loss_row(out):
    """A trigger that waits for the run's first optimizer step."""

    def ready(run):
        path = os.path.join(out, "losses.jsonl")
        return os.path.isfile(path) and os.path.getsize(path) > 0

    return ready


def after_first_step(out, action):
    wait = first_loss_row(out)

    def trigger(run):
        if wait(run):
            action(run)
            return True
        return False

    return trigger


def delete_clip_files(cache_copy):
    def action(run):
        for path in glob.glob(os.path.join(cache_copy, "shard_*", "*.safetensors")):
            os.remove(path)

    return action


@pytest.fixture(scope="module")
def training_runs(tiny_model, latent_cache, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("training_failures")
    cache_copy = str(root / "cache")  # this one loses its clip files mid-run
    shutil.copytree(latent_cache, cache_copy)
    out = {name: str(root / name) for name in ("nan", "deleted", "validation", "checkpoint", "term", "int")}
    workers2 = ["--dataloader_num_workers", "2"]
    every_step = ["--checkpointing_steps", "1"]
    first = {
        "nan": (train_argv(tiny_model, latent_cache, out["nan"], "--learning_rate", 1e12, *workers2), {}, None),
        "deleted": (
            train_argv(tiny_model, cache_copy, out["deleted"], "--max_train_steps", 200, *workers2),
            {},
            after_first_step(out["deleted"], delete_clip_files(cache_copy)),
        ),
        "validation": (
            train_argv(
                tiny_model,
                latent_cache,
                out["validation"],
                "--max_train_steps",
                4,
                "--validation_steps",
                2,
                *every_step,
                *workers2,
                fault="train_cosmos_lora.validation_losses:1",
            ),
            {},
            None,
        ),
        # torch.save writes the optimizer and scheduler states: calls 3 and 4 belong to the second checkpoint.
        "checkpoint": (
            train_argv(
                tiny_model,
                latent_cache,
                out["checkpoint"],
                "--max_train_steps",
                4,
                *every_step,
                *workers2,
                fault="torch.save:3",
            ),
            {},
            None,
        ),
        "term": (
            train_argv(tiny_model, latent_cache, out["term"], "--max_train_steps", 20, *workers2),
            {},
            after_first_step(out["term"], lambda run: run.signal_group(signal.SIGTERM)),
        ),
        "int": (  # the one run without DataLoader workers
            train_argv(tiny_model, latent_cache, out["int"], "--max_train_steps", 200, "--dataloader_num_workers", 0),
            {},
            after_first_step(out["int"], lambda run: run.signal_group(signal.SIGINT)),
        ),
    }

    def resumes(done):
        # What the failed runs left, then the same commands again without the fault: each picks up from its last good
        # checkpoint.
        left.update({name: (done_step(folder), temp_files(folder)) for name, folder in out.items()})
        latest = ["--resume_from_checkpoint", "latest"]
        return {
            "validation_resumed": (
                train_argv(
                    tiny_model,
                    latent_cache,
                    out["validation"],
                    "--max_train_steps",
                    4,
                    "--validation_steps",
                    2,
                    *every_step,
                    *workers2,
                    *latest,
                ),
                {},
                None,
            ),
            "checkpoint_resumed": (
                train_argv(
                    tiny_model,
                    latent_cache,
                    out["checkpoint"],
                    "--max_train_steps",
                    4,
                    *every_step,
                    *workers2,
                    *latest,
                ),
                {},
                None,
            ),
            "term_resumed": (
                train_argv(
                    tiny_model,
                    latent_cache,
                    out["term"],
                    "--max_train_steps",
                    20,
                    *workers2,
                    *latest,
                ),
                {},
                None,
            ),
        }

    left = {}  # name: (last checkpoint step, temporary files) after the failure
    runs = run_waves(first, resumes)
    return runs, out, left


def done_step(out):
    steps = [int(name.split("-")[1]) for name in os.listdir(out) if re.fullmatch(r"checkpoint-\d+", name)]
    return max(steps, default=0)


def test_a_nan_loss_stops_the_run_at_once(training_runs):
    runs, _, _ = training_runs
    line = assert_failed_fast(runs["nan"])
    assert line == "error: loss is nan at step 2; stopping before the update (last checkpoint: none)"
    assert "Traceback" not in runs["nan"].text()


def test_deleted_clip_files_stop_the_run_naming_them(training_runs):
    runs, out, left = training_runs
    line = assert_failed_fast(runs["deleted"])
    assert "reading a batch of cached clips" in line or "--max_bad_clips" in line, line
    assert ".safetensors" in runs["deleted"].text()  # the missing files are named


def test_a_failed_validation_keeps_the_last_checkpoint_and_resumes(training_runs):
    runs, out, left = training_runs
    line = assert_failed_fast(runs["validation"])
    assert line.startswith("error: validation at step 2: InjectedFault: "), line
    assert left["validation"] == (1, [])
    resumed = runs["validation_resumed"]
    assert resumed.process.returncode == 0, resumed.text()[-3000:]
    assert "resumed from " in resumed.text() and "checkpoint-1 at step 1" in resumed.text()
    assert os.path.isfile(os.path.join(out["validation"], "pytorch_lora_weights.safetensors"))


def test_a_failed_checkpoint_write_leaves_no_partial_folder(training_runs):
    runs, out, left = training_runs
    line = assert_failed_fast(runs["checkpoint"])
    assert line.startswith("error: saving the checkpoint of step 2: InjectedFault: "), line
    assert left["checkpoint"] == (1, [])
    resumed = runs["checkpoint_resumed"]
    assert resumed.process.returncode == 0, resumed.text()[-3000:]
    assert "checkpoint-1 at step 1" in resumed.text()


@pytest.mark.parametrize("name", ["term", "int"])
def test_a_stop_signal_saves_exits_75_and_resumes(training_runs, name):
    runs, out, left = training_runs
    run = runs[name]
    assert run.process.returncode == 75, run.text()[-3000:]
    assert run.exit_time - run.signal_time < 30, "saving took too long"
    assert run.group_is_gone()
    step, temporary = left[name]
    assert step >= 1 and f"saved {os.path.join(out[name], f'checkpoint-{step}')}" in run.text()
    assert not temporary
    if name == "term":
        resumed = runs["term_resumed"]
        assert resumed.process.returncode == 0, resumed.text()[-3000:]
        assert f"checkpoint-{step} at step {step}" in resumed.text()


def test_one_failing_rank_ends_every_rank(tiny_model, latent_cache, tmp_path):
    out = str(tmp_path / "out")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml")]
    argv = train_argv(
        tiny_model,
        latent_cache,
        out,
        "--max_train_steps",
        6,
        "--dataloader_num_workers",
        2,
        fault="train_cosmos_lora.training_loss:3",
    )
    env = TWO_CPU_PROCESSES | {"INJECT_FAULT_RANK": "1"}
    run = run_waves({"two": ([*launch, *argv[1:]], env, None)})["two"]
    assert run.process.returncode == 1, run.text()[-3000:]
    text = run.text()
    assert "error: training step 3: InjectedFault: " in text  # the failing rank
    assert "error: training step 3: RuntimeError: " in text and "Connection closed by peer" in text  # the other
    assert run.group_is_gone()


def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(training_runs, tiny_model, latent_cache, tmp_path):
    import shutil

    import cosmos_run
    import train_cosmos_lora as train
    from conftest import train_args

    runs, out, left = training_runs
    checkpoint = str(tmp_path / "checkpoint-1")
    shutil.copytree(os.path.join(out["validation"], "checkpoint-1"), checkpoint)
    marker = tmp_path / "code_ran"
    torch.save(Payload(str(marker)), os.path.join(checkpoint, cosmos_run.SCHEDULER_STATE))
    state_path = os.path.join(checkpoint, cosmos_run.TRAINING_STATE)
    with open(state_path) as f:
        state = json.load(f)
    state["files"][cosmos_run.SCHEDULER_STATE] = os.path.getsize(os.path.join(checkpoint, cosmos_run.SCHEDULER_STATE))
    with open(state_path, "w") as f:
        json.dump(state, f)
    args = train_args(tiny_model, latent_cache, tmp_path / "run", "--resume_from_checkpoint", checkpoint)
    with pytest.raises(ValueError, match=r"scheduler\.pt holds more than tensors and plain values"):
        train.check_checkpoint(checkpoint, args, defaults=vars(train.parse_args([])))
    assert not marker.exists()


class Payload:
    """Unpickling this object runs code: it writes a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------------------------------------------
def cache_argv(model, videos, out, *extra, fault=None):
    script = [INJECT, fault, "cache_latents.py"] if fault else [os.path.join(REPO, "cache_latents.py")]
    flags = ["--pretrained_model_name_or_path", model, "--video_dir", videos, "--output_dir", out]
    flags += ["--num_frames", 17, "--height", 64, "--width", 112, "--num_workers", 2, "--clip_stride_seconds", 0.5]
    return [sys.executable, *script, *map(str, flags), *map(str, extra)]


def clip_files(cache):
    return glob.glob(os.path.join(cache, "shard_*", "*.safetensors"))


def first_clip_file(cache, action):
    def trigger(run):
        if clip_files(cache):
            action(run)
            return True
        return False

    return trigger


@pytest.fixture(scope="module")
def caching_runs(tiny_model, clips, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("caching_failures")
    videos = root / "videos"  # two of the synthetic videos: 10 clips at a 0.5 s stride
    videos.mkdir()
    for key in clips["keys"][:2]:
        for name in (f"{key}.mp4", f"{key}.txt"):
            if os.path.exists(os.path.join(clips["videos"], name)):
                shutil.copy(os.path.join(clips["videos"], name), videos)
    videos = str(videos)
    out = {name: str(root / name) for name in ("worker", "disk", "term")}
    first = {
        "worker": (
            cache_argv(tiny_model, videos, out["worker"], fault="cosmos_sources.iter_part_videos:1"),
            {},
            None,
        ),
        "disk": (
            cache_argv(tiny_model, videos, out["disk"], fault="cosmos_cache.save_file:4:ENOSPC"),
            {},
            None,
        ),
        "term": (
            cache_argv(tiny_model, videos, out["term"], "--batch_size", 1),  # a file early, many still to write
            {},
            first_clip_file(out["term"], lambda run: run.signal_group(signal.SIGTERM)),
        ),
    }
    reruns = {
        f"{name}_rerun": (cache_argv(tiny_model, videos, out[name], "--verify"), {}, None) for name in ("disk", "term")
    }
    return run_waves(first, reruns), out


def test_a_decode_worker_that_raises_ends_the_caching(caching_runs):
    runs, out = caching_runs
    line = assert_failed_fast(runs["worker"])
    assert line.startswith("error: decoding videos: InjectedFault: "), line


def test_a_full_disk_ends_the_caching_without_partial_files(caching_runs):
    runs, out = caching_runs
    line = assert_failed_fast(runs["disk"])
    assert line.startswith("error: writing latents: OSError: [Errno 28] No space left on device"), line
    assert not temp_files(out["disk"])


def test_sigterm_ends_the_caching_cleanly(caching_runs):
    runs, out = caching_runs
    run = runs["term"]
    line = assert_failed_fast(run, code=128 + signal.SIGTERM)
    assert line.startswith("error: stopped by SIGTERM"), line
    assert not temp_files(out["term"])


@pytest.mark.parametrize("name", ["disk", "term"])
def test_a_rerun_completes_the_cache(caching_runs, name):
    runs, out = caching_runs
    rerun = runs[f"{name}_rerun"]
    assert rerun.process.returncode == 0, rerun.text()[-3000:]
    assert "0 videos skipped" in rerun.text()
    with open(os.path.join(out[name], "cache_info.json")) as f:
        assert json.load(f)["num_clips"] == len(clip_files(out[name])) > 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------
def test_a_failed_write_keeps_the_finished_videos_whole(tiny_model, latent_cache, tmp_path):
    from cosmos_video import read_mp4

    out = str(tmp_path / "samples")
    argv = [sys.executable, INJECT, "sample.write_mp4:3", "sample.py", "--pretrained_model_name_or_path", tiny_model]
    argv += ["--from_cache", latent_cache, "--num_videos", 2, "--num_inference_steps", 2, "--output_dir", out]
    argv += ["--num_frames", 17, "--height", 64, "--width", 112, "--disable_safety_checker"]
    run = run_waves({"sample": (argv, {}, None)})["sample"]
    line = assert_failed_fast(run)
    assert line.startswith("error: writing "), line
    finished = sorted(p for p in os.listdir(out) if p.endswith(".mp4"))  # the first video and its side-by-side
    assert len(finished) == 2 and all(read_mp4(os.path.join(out, p)).shape[0] == 17 for p in finished), finished
    assert not os.path.exists(os.path.join(out, "results.json")) and not temp_files(out)


# ----------------------------------------------------------------------------------------------------------------
# Run records: every setting, whatever a flag turned it into, is written as JSON
# ----------------------------------------------------------------------------------------------------------------
def test_sampling_a_real_video_into_auto_buckets_records_them(tiny_model, tmp_path):
    import make_synthetic_clips
    import sample

    video = tmp_path / "wide.mp4"  # 640x272 H.264, as a phone or a dashcam records
    frames = make_synthetic_clips.render_video(seed=4, num_frames=90, height=272, width=640)
    video.write_bytes(make_synthetic_clips.encode_mp4(frames, 30.0, "h264"))
    buckets = ["17x64x112", "17x80x80", "17x112x64"]
    out = tmp_path / "samples"
    argv = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", out, "--input", video, "--bucket", "auto"]
    argv += ["--buckets", *buckets, "--num_inference_steps", 2, "--disable_safety_checker"]
    sample.main(sample.parse_args([str(a) for a in argv]))
    with open(out / "results.json") as f:
        results = json.load(f)
    assert results["settings"]["buckets"] == buckets
    assert results["settings"]["input"] == [str(video)]
    (result,) = results["videos"]
    assert result["name"] == "wide" and "psnr" in result  # the source's next frames score it


def test_a_way_out_that_hangs_ends_with_the_stacks(tmp_path):
    """Should cleaning up after a failure ever block, the run still exits: every thread's stack, then exit code 1."""
    program = tmp_path / "hangs_on_the_way_out.py"
    program.write_text(
        "import time\n"
        "import cosmos_process\n"
        "cosmos_process.EXIT_TIMEOUT = 2\n"
        "cosmos_process.stop_worker_processes = lambda: time.sleep(600)  # a clean-up that never ends\n"
        "def main(args):\n"
        "    raise RuntimeError('the run failed')\n"
        "cosmos_process.run_main(main, lambda: None)\n"
    )
    start = time.time()
    result = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    assert result.returncode == 1 and time.time() - start < 30
    assert "RuntimeError: the run failed" in result.stderr  # the failure first
    assert "Timeout (0:00:02)!" in result.stderr and "<lambda>" in result.stderr  # then where the way out hung
