"""The slurm/*.sh job scripts, submitted to a real single-node SLURM on the CPU.

tests/slurm_cluster.py starts SLURM unless `sinfo` already answers. SLURM and shellcheck are installed before pytest
runs (`make test` runs tools/setup_test_deps.sh): a missing one fails its tests, naming what to install. The tests that
need a running SLURM are skipped when one cannot start for another reason (starting one needs root). Jobs run the
repository in place, with the test interpreter's venv activated through ENV_ACTIVATE, and write their logs under a
temporary submit directory.

The first test submits the whole pipeline at once, chained with --dependency; the tests that need no SLURM run while
its jobs do, and the later tests wait for the job they check.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field

import av
import pytest
import torch
from safetensors.torch import load_file

import cache_latents
import caption_clips
from conftest import CLIP_ARGS, REPO, loss_rows
from cosmos_cache import read_cache_info
from slurm_cluster import SlurmCluster, SlurmNotInstalled, SlurmUnavailable

SLURM_DIR = os.path.join(REPO, "slurm")

# The node has few CPUs; the scripts' own --cpus-per-task would not fit. --time stays well above the 300 s warning.
TEST_SBATCH = ["--cpus-per-task=1", "--time=15"]
SECRET = "hf_slurmtest_token_never_logged"
# The tiny model trains at 10-25 steps/s on one CPU: enough steps after the first checkpoint for USR1 to arrive
# mid-run.
TRAIN_STEPS = 48
TRAIN_ARGS = [
    "--max_train_steps",
    str(TRAIN_STEPS),
    "--checkpointing_steps",
    "4",
    "--seed",
    "0",
    "--train_batch_size",
    "1",
    "--learning_rate",
    "1e-3",
    "--num_validation_clips",
    "2",  # held out and recorded, so that sample.sh --from_cache has clips that never trained
    "--dataloader_num_workers",
    "0",
]
EXPORTS = ["pytorch_lora_weights.safetensors", "temporal_adapters.safetensors"]
# Several CPU processes through torchrun: accelerate launch starts torchrun only for a GPU distributed type (with
# MULTI_CPU + use_cpu it starts one process), and ACCELERATE_USE_CPU=1 then makes Accelerator use gloo on the CPU.
TORCHRUN_CPU_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: MULTI_GPU
mixed_precision: "no"
num_machines: 1
num_processes: 2
main_process_port: 0
rdzv_backend: static
same_network: true
use_cpu: false
"""


def activate_command():
    """The shell command that activates the interpreter running the tests."""
    activate = os.path.join(sys.prefix, "bin", "activate")
    if sys.prefix != sys.base_prefix and os.path.exists(activate):
        return f"source {shlex.quote(activate)}"
    return f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH"


def job_env(**values):
    """The environment a user submits from: no SLURM job variables, no offline flags (the scripts set them),
    a token; one thread per process, as each job has one CPU (accelerate launch would start two per process)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        and k
        not in (
            "HF_HUB_OFFLINE",
            "HF_DATASETS_OFFLINE",
            "WANDB_MODE",
            "WANDB_API_KEY",
            "VIRTUAL_ENV",
            "TORCHINDUCTOR_CACHE_DIR",
        )
    }
    env.update(
        REPO_DIR=REPO, ENV_ACTIVATE=activate_command(), HF_TOKEN=SECRET, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"
    )
    env.update({k: str(v) for k, v in values.items()})
    return env


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return f"<no file {path}>"


def state(records):
    return [(r.get("JobState"), r.get("ExitCode"), r.get("Restarts")) for r in records]


def checkpoints(names_or_dir):
    """The complete checkpoint-STEP names (not checkpoint-STEP.tmp) among names or in a directory."""
    if not isinstance(names_or_dir, list):
        names_or_dir = os.listdir(names_or_dir) if os.path.isdir(names_or_dir) else []
    return sorted(n for n in names_or_dir if re.fullmatch(r"checkpoint-\d+", n))


def dry_run_commands(text):
    """{rank: argv} from the DRY_RUN lines each node prints."""
    commands = {}
    for line in text.splitlines():
        match = re.match(r"DRY_RUN host=(\S+) SLURM_NODEID=(\d*) SLURM_PROCID=(\d*): (.*)$", line)
        if match:
            commands[int(match.group(3))] = (match.group(1), shlex.split(match.group(4)))
    return commands


def option(argv, name):
    return argv[argv.index(name) + 1]


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: the cluster, a submit directory, the latent cache made by the array job, the training runs.
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm():
    cluster = SlurmCluster()
    try:
        cluster.start()
    except SlurmNotInstalled as error:
        pytest.fail(str(error), pytrace=False)
    except SlurmUnavailable as error:
        pytest.skip(f"SLURM cannot run here: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("slurm_submit")
    (path / "logs").mkdir()  # the scripts' #SBATCH --output=logs/... needs it, as the README says
    return path


def submit(slurm, submit_dir, script, *args, env=None, sbatch_args=()):
    return slurm.sbatch(
        os.path.join(SLURM_DIR, script),
        *args,
        env=job_env(**(env or {})),
        cwd=submit_dir,
        sbatch_args=[*TEST_SBATCH, *sbatch_args],
    )


@dataclass
class Job:
    """A submitted job: its id, its log file(s) under the submit directory, its output directory."""

    id: str
    logs: list
    dir: str = ""
    records: list = None  # `scontrol show job` records once it ended
    after_first_segment: list = field(default_factory=list)  # the preempted run's files when it requeued

    @property
    def text(self):
        return "\n".join(read(path) for path in self.logs)


def finished(slurm, job, timeout=400):
    """Wait for job (once) and return it with its final records."""
    if job.records is None:
        job.records = slurm.wait(job.id, timeout=timeout)
    return job


def preempt_after_first_checkpoint(slurm, job):
    """scancel --batch --signal=USR1 as soon as the run has a checkpoint; return once the job requeued itself."""
    deadline = time.time() + 300
    while not checkpoints(job.dir):
        records = slurm.jobs(job.id)
        assert records and records[0]["JobState"] in ("PENDING", "RUNNING"), (
            f"{state(records)} before the first checkpoint: {job.text}"
        )
        assert time.time() < deadline, f"no checkpoint after 300 s: {job.text}"
        time.sleep(0.05)
    slurm.run("scancel", "--batch", "--signal=USR1", job.id)
    # The job stops, requeues itself and waits to start again: what did the first segment leave behind?
    deadline = time.time() + 120
    while True:
        record = slurm.jobs(job.id)[0]
        if record["Restarts"] != "0" or record["JobState"] not in ("RUNNING", "PENDING"):
            break
        assert time.time() < deadline, f"not requeued: {job.text}"
        time.sleep(0.1)
    job.after_first_segment = sorted(os.listdir(job.dir))


@pytest.fixture(scope="module")
def pipeline(slurm, submit_dir, tiny_model, clips, tmp_path_factory):
    """Every job script submitted at once, chained with --dependency as a user may chain them: the cache array job
    (one clip per video, two shards); on its cache an uninterrupted training run, the same run stopped by USR1 after
    its first checkpoint (this fixture sends it), and a run on two machines; sampling from the uninterrupted run.
    The node runs each job as soon as its input is there, so start-ups and the requeue wait overlap other work."""
    root = tmp_path_factory.mktemp("slurm_pipeline")
    logs = submit_dir / "logs"
    jobs = {}
    cache_dir = str(root / "cache")
    cache_args = [*CLIP_ARGS, "--clip_stride_seconds", "1", "--max_clips_per_video", "1"]
    env = {"MODEL": tiny_model, "CACHE_DIR": cache_dir, "VIDEO_DIR": clips["videos"]}
    job = submit(slurm, submit_dir, "cache_latents.sh", *cache_args, env=env, sbatch_args=["--array=0-1"])
    jobs["cache"] = Job(job, [logs / f"cache_latents_{job}_{task}.out" for task in (0, 1)], cache_dir)
    after_cache = f"--dependency=afterok:{job}"

    for name in ("uninterrupted", "preempted"):
        env = {
            "MODEL": tiny_model,
            "CACHE_DIR": cache_dir,
            "OUTPUT_DIR": root / name,
            "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml",
        }
        job = submit(
            slurm, submit_dir, "train.sh", *TRAIN_ARGS, env=env, sbatch_args=[f"--job-name={name}", after_cache]
        )
        jobs[name] = Job(job, [logs / f"{name}_{job}.out"], str(root / name))

    # Two srun tasks on the one node play two machines: torchrun rendezvous at the head node, gloo, one rank each.
    config = root / "torchrun_cpu.yaml"
    config.write_text(TORCHRUN_CPU_CONFIG)
    env = {
        "MODEL": tiny_model,
        "CACHE_DIR": cache_dir,
        "OUTPUT_DIR": root / "multinode",
        "ACCELERATE_CONFIG": config,
        "ACCELERATE_USE_CPU": 1,
        "GPUS_PER_NODE": 1,
    }
    multinode_args = [
        "--max_train_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--seed",
        "0",
        "--train_batch_size",
        "1",
        "--num_validation_clips",
        "0",
        "--dataloader_num_workers",
        "0",
    ]
    job = submit(
        slurm,
        submit_dir,
        "train_multinode.sh",
        *multinode_args,
        env=env,
        sbatch_args=["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", after_cache],
    )
    jobs["multinode"] = Job(job, [logs / f"cosmos_lora_multinode_{job}.out"], str(root / "multinode"))

    sample_args = [
        "--disable_safety_checker",
        "--num_inference_steps",
        "2",
        "--height",
        "64",
        "--width",
        "112",
        "--num_frames",
        "17",
    ]
    env = {"MODEL": tiny_model, "CACHE_DIR": cache_dir, "NUM_VIDEOS": 2}
    job = submit(
        slurm,
        submit_dir,
        "sample.sh",
        jobs["uninterrupted"].dir,
        *sample_args,
        env=env,
        sbatch_args=[f"--dependency=afterok:{jobs['uninterrupted'].id}"],
    )
    jobs["sample"] = Job(job, [logs / f"cosmos_sample_{job}.out"], os.path.join(jobs["uninterrupted"].dir, "samples"))

    preempt_after_first_checkpoint(slurm, jobs["preempted"])
    return jobs


# ----------------------------------------------------------------------------------------------------------------
# The job scripts on SLURM. This first test starts the pipeline; the tests after it that need no SLURM run meanwhile.
# ----------------------------------------------------------------------------------------------------------------
def test_cache_array_job_shards_are_disjoint_and_complete(slurm, pipeline, clips):
    job = finished(slurm, pipeline["cache"])
    assert state(job.records) == [("COMPLETED", "0:0", "0")] * 2, job.text
    shards = []
    for index in (0, 1):
        with open(os.path.join(job.dir, f"shard_{index:05d}", "manifest.jsonl")) as f:
            shards.append({(row["key"], row["clip_index"]) for row in map(json.loads, f)})
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    # One clip per video (--max_clips_per_video 1), the videos split between the two array tasks.
    assert sorted(shards[0] | shards[1]) == sorted((k, 0) for k in clips["keys"])
    info = read_cache_info(job.dir)
    assert (info["num_clips"], info["num_shards"]) == (6, 2)
    assert cache_latents.verify_cache(job.dir)[1] == []
    for index, path in enumerate(job.logs):
        log = read(path)
        assert f"shard {index}/2: wrote {len(shards[index])} clips" in log, log
        assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in log and "HF_TOKEN=set" in log
        assert SECRET not in log


# ----------------------------------------------------------------------------------------------------------------
# Checks of the scripts that need no SLURM (DRY_RUN prints the command the script would run).
# ----------------------------------------------------------------------------------------------------------------
def run_script_dry(script, *args, **env):
    result = subprocess.run(
        ["bash", os.path.join(SLURM_DIR, script), *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=job_env(DRY_RUN=1, ENV_ACTIVATE="", **env),
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("DRY_RUN")]
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0].split(": ", 1)[1]), result.stdout


def test_cache_script_builds_each_source_and_shard(tmp_path):
    tars = "/data/ego/factory*/**/*.tar"
    argv, out = run_script_dry(
        "cache_latents.sh",
        "--max_clips_per_video",
        "2",
        MODEL=tmp_path,
        COSMOS_ROOT="/shared/cosmos",
        CACHE_DIR="/c",
        TARS=tars,
        SLURM_ARRAY_TASK_ID=7,
        SLURM_ARRAY_TASK_MIN=3,
        SLURM_ARRAY_TASK_STEP=2,
        SLURM_ARRAY_TASK_COUNT=4,
    )
    assert argv[:2] == ["python", "cache_latents.py"]
    assert option(argv, "--tars") == tars  # passed on unexpanded: cache_latents.py globs it
    assert (option(argv, "--num_shards"), option(argv, "--shard_index")) == ("4", "2")
    assert argv[-2:] == ["--max_clips_per_video", "2"]
    assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in out and SECRET not in out and "HF_TOKEN=set" in out
    assert "TORCHINDUCTOR_CACHE_DIR=/shared/cosmos/torchinductor" in out  # compiled kernels shared by every task

    argv, out = run_script_dry(
        "cache_latents.sh",
        MODEL=tmp_path,
        CACHE_DIR="/c",
        DATASET="builddotai/Egocentric-100K",
        DATA_FILES="factory001/**/*.tar",
    )
    assert (option(argv, "--dataset"), option(argv, "--data_files")) == (
        "builddotai/Egocentric-100K",
        "factory001/**/*.tar",
    )
    assert (option(argv, "--num_shards"), option(argv, "--shard_index")) == ("1", "0")
    assert "HF_HUB_OFFLINE= " in out, "a hub dataset needs the hub"


def test_caption_script_builds_its_command_with_the_caching_clip_plan(tmp_path):
    argv, out = run_script_dry(
        "caption_clips.sh",
        "--max_clips_per_video",
        "2",
        CAPTION_MODEL=tmp_path,
        CAPTIONS_DIR="/captions",
        VIDEO_DIR=tmp_path,
        SLURM_ARRAY_TASK_ID=1,
        SLURM_ARRAY_TASK_COUNT=2,
    )
    assert argv[:2] == ["python", "caption_clips.py"] and option(argv, "--caption_model") == str(tmp_path)
    assert (option(argv, "--num_shards"), option(argv, "--shard_index")) == ("2", "1")
    assert argv[-2:] == ["--max_clips_per_video", "2"] and "HF_HUB_OFFLINE=1" in out
    cache_argv, _ = run_script_dry("cache_latents.sh", MODEL=tmp_path, CACHE_DIR="/c", VIDEO_DIR=tmp_path)
    for flag in ("--num_frames", "--fps", "--height", "--width"):  # the plan cache_latents.sh caches
        assert option(argv, flag) == option(cache_argv, flag)
    args = caption_clips.parse_args(argv[2:])  # every flag it passes exists
    assert args.output_dir == "/captions" and args.video_dir == str(tmp_path)


def test_train_script_command_and_environment(tmp_path):
    argv, out = run_script_dry(
        "train.sh",
        "--learning_rate",
        "5e-5",
        MODEL=tmp_path,
        OUTPUT_DIR="/o",
        CACHE_DIR="ego=/c/ego:0.7 lab=/c/lab:0.3",
        WANDB_MODE="",
    )
    assert argv == [
        "accelerate",
        "launch",
        "--config_file",
        "accelerate_configs/fsdp3.yaml",
        "train_cosmos_lora.py",
        "--pretrained_model_name_or_path",
        str(tmp_path),
        "--cache_dir",
        "ego=/c/ego:0.7",
        "lab=/c/lab:0.3",
        "--output_dir",
        "/o",
        "--resume_from_checkpoint",
        "latest",
        "--learning_rate",
        "5e-5",
    ]
    assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline HF_TOKEN=set" in out and SECRET not in out
    _, out = run_script_dry("train.sh", MODEL="nvidia/Cosmos-Predict2-2B-Video2World", WANDB_API_KEY="k")
    assert "HF_HUB_OFFLINE= HF_DATASETS_OFFLINE= WANDB_MODE= " in out, "a hub model needs the hub; a W&B key, W&B"


def test_sample_script_takes_the_checkpoint_from_the_first_argument_or_the_environment(tmp_path):
    argv, _ = run_script_dry(
        "sample.sh", "/runs/r1/checkpoint-8", "--num_inference_steps", "2", MODEL=tmp_path, CACHE_DIR="/c"
    )
    assert argv[:2] == ["python", "sample.py"]
    assert option(argv, "--lora_path") == "/runs/r1/checkpoint-8"
    # Beside the checkpoints, not inside one: --checkpoints_total_limit deletes old checkpoint dirs.
    assert option(argv, "--output_dir") == "/runs/r1/samples/checkpoint-8"
    assert (option(argv, "--from_cache"), option(argv, "--num_videos")) == ("/c", "4")
    assert argv[-2:] == ["--num_inference_steps", "2"]
    argv, _ = run_script_dry("sample.sh", "/runs/r1/", MODEL=tmp_path, CACHE_DIR="/c")
    assert option(argv, "--output_dir") == "/runs/r1/samples/final"
    argv, _ = run_script_dry(
        "sample.sh", "--disable_safety_checker", CHECKPOINT="/runs/r2", NUM_VIDEOS=3, SAMPLE_OUTPUT_DIR="/s"
    )
    assert (option(argv, "--lora_path"), option(argv, "--output_dir"), option(argv, "--num_videos")) == (
        "/runs/r2",
        "/s",
        "3",
    )
    assert argv[-1] == "--disable_safety_checker"


@pytest.mark.parametrize("sources", [{}, {"VIDEO_DIR": "/v", "TARS": "/t/*.tar"}], ids=["none", "two"])
def test_cache_script_dry_run_refuses_no_source_or_two(tmp_path, sources):
    result = subprocess.run(
        ["bash", os.path.join(SLURM_DIR, "cache_latents.sh")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=job_env(DRY_RUN=1, ENV_ACTIVATE="", MODEL=tmp_path, **sources),
    )
    assert result.returncode == 2 and "DRY_RUN" not in result.stdout
    assert f"set exactly one source, VIDEO_DIR, TARS or DATASET ({len(sources)} set)" in result.stderr


def test_multinode_dry_run_prints_srun_and_every_node_command_without_running_srun(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "srun").write_text(f"#!/bin/sh\ntouch {tmp_path}/srun_ran\n")
    (fake_bin / "srun").chmod(0o755)
    env = job_env(DRY_RUN=1, ENV_ACTIVATE="", MODEL=tmp_path, SLURM_NTASKS=2, GPUS_PER_NODE=4, MAIN_PORT=29500)
    env["PATH"] = f"{fake_bin}:{env['PATH']}"
    result = subprocess.run(
        ["bash", os.path.join(SLURM_DIR, "train_multinode.sh"), "--learning_rate", "5e-5"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "srun_ran").exists()
    srun = [line for line in result.stdout.splitlines() if line.startswith("DRY_RUN srun: ")]
    assert len(srun) == 1 and shlex.split(srun[0].split(": ", 1)[1])[:3] == [
        "srun",
        "--ntasks=2",
        "--kill-on-bad-exit=0",
    ]
    commands = dry_run_commands(result.stdout)
    assert sorted(commands) == [0, 1]
    for rank, (_, argv) in commands.items():
        assert option(argv, "--machine_rank") == str(rank) and option(argv, "--num_processes") == "8"
        assert option(argv, "--main_process_port") == "29500" and argv[-2:] == ["--learning_rate", "5e-5"]


# ----------------------------------------------------------------------------------------------------------------
# The USR1 -> exit 75 machinery of slurm/common.sh through the launchers, with a stand-in training script (the
# requeue in a real batch job: test_preempted_train_job_... below).
# ----------------------------------------------------------------------------------------------------------------
STAND_IN = textwrap.dedent("""\
    import os, signal, sys, time
    # torchrun sets RANK and WORLD_SIZE; accelerate's one-process launcher starts the script as it is. No torch
    # import: the launchers are under test, and the stand-in starts in a fraction of a second.
    rank, world, stop = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1"), []
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # as train_cosmos_lora.py's StopSignal
    out = sys.argv[1]
    open(os.path.join(out, f"ready-{rank}-of-{world}"), "w").close()
    deadline = time.time() + float(sys.argv[2])
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    if stop:
        open(os.path.join(out, f"checkpoint-{rank}"), "w").close()
        sys.exit(75)
    sys.exit(int(sys.argv[3]))
""")


# accelerate launch without the accelerate CLI's other commands, whose imports double its start-up.
LAUNCH = "python -m accelerate.commands.launch"
# name: (processes, signal to the shell or None, the stand-in's exit code without one)
LAUNCHES = {
    "one_process": (1, signal.SIGUSR1, 0),
    "torchrun_two_processes": (2, signal.SIGUSR1, 0),
    "one_process_sigterm": (1, signal.SIGTERM, 0),
    "failure_without_usr1": (1, None, 3),
}


@dataclass
class Launch:
    directory: str
    ranks: int
    proc: subprocess.Popen
    returncode: int = None
    out: str = ""

    def files(self):
        return sorted(n for n in os.listdir(self.directory) if n.startswith(("ready", "checkpoint")))


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Every case of run_launcher at once (each is mostly the launcher's start-up, on one core): USR1 or SIGTERM to
    the shell only, as SLURM's --signal=B:USR1 does, once every rank is ready; or a failure with no signal."""
    started = {}
    for name, (ranks, stop_signal, exit_code) in LAUNCHES.items():
        directory = tmp_path_factory.mktemp(name)
        (directory / "stand_in.py").write_text(STAND_IN)
        config = os.path.join(REPO, "accelerate_configs", "cpu.yaml")
        if ranks == 2:
            config = directory / "torchrun_cpu.yaml"
            config.write_text(TORCHRUN_CPU_CONFIG)
        seconds = 60 if stop_signal else 0
        snippet = (
            f"source slurm/common.sh; rc=0; run_launcher {LAUNCH} --config_file {config} {directory}/stand_in.py"
            f' {directory} {seconds} {exit_code} || rc=$?; echo "run_launcher returned $rc"; finish $rc'
        )
        env = job_env(ACCELERATE_USE_CPU=1)
        proc = subprocess.Popen(
            ["bash", "-c", f"{env['ENV_ACTIVATE']}; {snippet}"],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        started[name] = Launch(str(directory), ranks, proc)
    for name, launch in started.items():
        stop_signal = LAUNCHES[name][1]
        if stop_signal:
            wait_for_files(
                launch.directory, [f"ready-{r}-of-{launch.ranks}" for r in range(launch.ranks)], launch.proc
            )
            # For SIGTERM the launcher ignores it (accelerate's single-process launcher would die at once) and the
            # shell forwards it.
            launch.proc.send_signal(stop_signal)
    for launch in started.values():
        launch.out, _ = launch.proc.communicate(timeout=120)
        launch.returncode = launch.proc.returncode
    return started


def wait_for_files(directory, names, proc=None, timeout=90):
    deadline = time.time() + timeout
    while not all(os.path.exists(os.path.join(directory, n)) for n in names):
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{names} not in {os.listdir(directory)}"
        time.sleep(0.05)


@pytest.mark.parametrize("name", ["one_process", "torchrun_two_processes", "one_process_sigterm"])
def test_usr1_reaches_every_rank_through_accelerate_launch_and_gives_75(launches, name):
    launch = launches[name]
    assert "run_launcher returned 75" in launch.out, launch.out
    ranks = range(launch.ranks)
    assert launch.files() == sorted(
        [*(f"ready-{r}-of-{launch.ranks}" for r in ranks), *(f"checkpoint-{r}" for r in ranks)]
    )
    # Outside a SLURM job `finish` does not requeue; after SIGTERM it leaves requeueing to SLURM.
    assert launch.returncode == 75 and "requeueing job" not in launch.out, launch.out


def test_a_failure_without_usr1_is_not_taken_for_a_preemption(launches):
    launch = launches["failure_without_usr1"]
    # accelerate launch reports the stand-in's exit code 3 as 1; the script passes that on.
    assert launch.returncode not in (0, 75) and "run_launcher returned 75" not in launch.out, launch.out
    assert "requeue" not in launch.out and "failed with exit code" in launch.out, launch.out
    assert launch.files() == ["ready-0-of-1"]


def test_multinode_dry_run_prints_one_command_per_node(slurm, submit_dir, tiny_model):
    # Submitted from the repository root, without REPO_DIR, as a user does; the log goes to the temporary directory.
    env = job_env(
        DRY_RUN=1,
        GPUS_PER_NODE=1,
        ACCELERATE_CONFIG="accelerate_configs/cpu_2proc.yaml",
        MODEL=tiny_model,
        CACHE_DIR="/c",
        OUTPUT_DIR="/o",
    )
    del env["REPO_DIR"]
    job = slurm.sbatch(
        os.path.join(SLURM_DIR, "train_multinode.sh"),
        "--learning_rate",
        "5e-5",
        env=env,
        cwd=REPO,
        sbatch_args=[
            *TEST_SBATCH,
            "--nodes=1",
            "--ntasks=2",
            "--ntasks-per-node=2",
            f"--output={submit_dir}/logs/%x_%j.out",
        ],
    )
    records = slurm.wait(job, timeout=60)
    log = read(submit_dir / "logs" / f"cosmos_lora_multinode_{job}.out")
    assert state(records) == [("COMPLETED", "0:0", "0")], log
    commands = dry_run_commands(log)
    assert sorted(commands) == [0, 1], log
    port = option(commands[0][1], "--main_process_port")
    for rank, (host, argv) in commands.items():
        assert host == slurm.node
        assert argv[:2] == ["accelerate", "launch"] and option(argv, "--machine_rank") == str(rank)
        assert option(argv, "--num_machines") == "2" and option(argv, "--num_processes") == "2"
        assert option(argv, "--main_process_ip") == slurm.node
        assert option(argv, "--main_process_port") == port and 1024 < int(port) < 65536
        assert option(argv, "--config_file") == "accelerate_configs/cpu_2proc.yaml"
        script = argv.index("train_cosmos_lora.py")
        assert argv[script + 1 :] == [
            "--pretrained_model_name_or_path",
            tiny_model,
            "--cache_dir",
            "/c",
            "--output_dir",
            "/o",
            "--resume_from_checkpoint",
            "latest",
            "--learning_rate",
            "5e-5",
        ]
    assert [a for a in commands[0][1] if a != "0"] == [a for a in commands[1][1] if a != "1"]


def test_train_job_trains_and_exports(slurm, pipeline):
    run = finished(slurm, pipeline["uninterrupted"])
    assert state(run.records) == [("COMPLETED", "0:0", "0")], run.text
    for name in EXPORTS:
        assert load_file(os.path.join(run.dir, name)), name
    assert checkpoints(run.dir)
    rows = loss_rows(run.dir)
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1))
    assert all(isinstance(row["loss"], float) and row["loss"] == row["loss"] for row in rows)
    assert "HF_HUB_OFFLINE=1" in run.text and "WANDB_MODE=offline" in run.text
    assert SECRET not in run.text


def test_preempted_train_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(slurm, pipeline):
    """train.sh in a real batch job: scancel --batch --signal=USR1 -> the shell forwards it to the training, which
    checkpoints and exits 75 -> common.sh requeues the job -> it resumes from the checkpoint and ends as if never
    stopped."""
    run, reference = finished(slurm, pipeline["preempted"]), finished(slurm, pipeline["uninterrupted"])
    text = run.text
    assert state(run.records) == [("COMPLETED", "0:0", "1")], text
    # The first segment stopped on USR1 with a checkpoint and requeued the job; the second resumed and finished.
    assert checkpoints(run.after_first_segment), run.after_first_segment
    assert "SIGUSR1: forwarding it to the training processes" in text
    assert re.search(r"SIGUSR1: saved \S+/checkpoint-\d+; exiting with 75", text), text
    assert f"requeueing job {run.id}" in text
    assert "restart 0 on" in text and "restart 1 on" in text
    assert re.search(r"resumed from \S+/checkpoint-\d+ at step \d+", text), text
    assert not any(name in run.after_first_segment for name in EXPORTS), "it finished before the signal came"
    rows = loss_rows(run.dir)
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1)), rows
    assert [row["loss"] for row in rows] == pytest.approx([row["loss"] for row in loss_rows(reference.dir)], rel=1e-6)
    for name in EXPORTS:
        resumed, expected = load_file(os.path.join(run.dir, name)), load_file(os.path.join(reference.dir, name))
        assert resumed.keys() == expected.keys()
        for key in expected:
            assert torch.equal(resumed[key], expected[key]), f"{name} {key}"


def test_sample_job_writes_the_video_grid_of_the_held_out_clips(slurm, pipeline):
    job = finished(slurm, pipeline["sample"])
    assert state(job.records) == [("COMPLETED", "0:0", "0")], job.text
    with av.open(os.path.join(job.dir, "final", "video_grid.mp4")) as container:
        assert sum(1 for _ in container.decode(video=0)) > 0
    # NUM_VIDEOS=2 from the cache: the two clips the run held out, never trained on.
    with open(os.path.join(job.dir, "final", "results.json")) as f:
        inputs = [os.path.relpath(video["input"], pipeline["cache"].dir) for video in json.load(f)["videos"]]
    with open(os.path.join(pipeline["uninterrupted"].dir, "held_out.json")) as f:
        assert sorted(inputs) == sorted(json.load(f)["clips"]) and len(inputs) == 2


def test_multinode_job_trains_on_two_machines(slurm, pipeline):
    job = finished(slurm, pipeline["multinode"])
    assert state(job.records) == [("COMPLETED", "0:0", "0")], job.text
    assert "2 machines x 1 processes" in job.text
    assert "num_processes=2 (" in job.text, job.text  # one world of two ranks
    for name in EXPORTS:
        assert load_file(os.path.join(job.dir, name)), name
    assert [row["step"] for row in loss_rows(job.dir)] == [1, 2]


def test_shellcheck_passes_on_every_script():
    if not shutil.which("shellcheck"):
        pytest.fail("shellcheck is not installed: run tools/setup_test_deps.sh (`make test` does)", pytrace=False)
    scripts = sorted(f"slurm/{name}" for name in os.listdir(SLURM_DIR) if name.endswith(".sh"))
    assert len(scripts) >= 5
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
