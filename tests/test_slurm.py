"""The slurm/*.sh job scripts, submitted to a real single-node SLURM on the CPU.

tests/slurm_cluster.py starts SLURM (installing it with apt-get if needed) unless `sinfo` already answers; the tests
that need it are skipped when it cannot run. Jobs run the repository in place, with the test interpreter's venv
activated through ENV_ACTIVATE, and write their logs under a temporary submit directory.
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

import av
import pytest
import torch
from safetensors.torch import load_file

import cache_latents
from conftest import CLIP_ARGS, REPO
from cosmos_cache import read_cache_info
from slurm_cluster import SlurmCluster, SlurmUnavailable

SLURM_DIR = os.path.join(REPO, "slurm")
TRAIN_SCRIPT = os.path.join(REPO, "train_cosmos_lora.py")
SAMPLE_SCRIPT = os.path.join(REPO, "sample.py")
needs_train = pytest.mark.skipif(not os.path.exists(TRAIN_SCRIPT), reason="train_cosmos_lora.py is not written yet")
needs_sample = pytest.mark.skipif(not os.path.exists(SAMPLE_SCRIPT), reason="sample.py is not written yet")

# The node has few CPUs; the scripts' own --cpus-per-task would not fit. --time stays well above the 300 s warning.
TEST_SBATCH = ["--cpus-per-task=1", "--time=15"]
SECRET = "hf_slurmtest_token_never_logged"
# The tiny model trains at ~25 steps/s here: enough steps after the first checkpoint for USR1 to arrive mid-run.
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
    a token."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
        and k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "WANDB_API_KEY", "VIRTUAL_ENV")
    }
    env.update(REPO_DIR=REPO, ENV_ACTIVATE=activate_command(), HF_TOKEN=SECRET, CUDA_VISIBLE_DEVICES="")
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


def loss_rows(output_dir):
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


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


@pytest.fixture(scope="module")
def array_cache(slurm, submit_dir, tiny_model, clips, tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("slurm_cache") / "cache"
    job = submit(
        slurm,
        submit_dir,
        "cache_latents.sh",
        *CLIP_ARGS,
        "--clip_stride_seconds",
        "1",
        env={"MODEL": tiny_model, "CACHE_DIR": cache_dir, "VIDEO_DIR": clips["videos"]},
        sbatch_args=["--array=0-1"],
    )
    records = slurm.wait(job, timeout=300)
    logs = [read(submit_dir / "logs" / f"cache_latents_{job}_{task}.out") for task in (0, 1)]
    return {"dir": str(cache_dir), "records": records, "logs": logs}


@pytest.fixture(scope="module")
def training_runs(slurm, submit_dir, tiny_model, array_cache, tmp_path_factory):
    """An uninterrupted run and, at the same time, the same run stopped by USR1 after its first checkpoint."""
    assert all(r["JobState"] == "COMPLETED" for r in array_cache["records"]), array_cache["logs"]
    root = tmp_path_factory.mktemp("slurm_runs")
    runs = {}
    for name in ("uninterrupted", "preempted"):
        output_dir = root / name
        env = {
            "MODEL": tiny_model,
            "CACHE_DIR": array_cache["dir"],
            "OUTPUT_DIR": output_dir,
            "ACCELERATE_CONFIG": "accelerate_configs/cpu.yaml",
        }
        job = submit(slurm, submit_dir, "train.sh", *TRAIN_ARGS, env=env, sbatch_args=[f"--job-name={name}"])
        runs[name] = {"job": job, "dir": str(output_dir), "log": submit_dir / "logs" / f"{name}_{job}.out"}

    preempted = runs["preempted"]
    deadline = time.time() + 300
    while not checkpoints(root / "preempted"):
        records = slurm.jobs(preempted["job"])
        assert records and records[0]["JobState"] in ("PENDING", "RUNNING"), (
            f"{state(records)} before the first checkpoint: {read(preempted['log'])}"
        )
        assert time.time() < deadline, f"no checkpoint after 300 s: {read(preempted['log'])}"
        time.sleep(0.05)
    slurm.run("scancel", "--batch", "--signal=USR1", preempted["job"])
    # The job stops, requeues itself and waits to start again: what did the first segment leave behind?
    deadline = time.time() + 120
    while True:
        record = slurm.jobs(preempted["job"])[0]
        if record["Restarts"] != "0" or record["JobState"] not in ("RUNNING", "PENDING"):
            break
        assert time.time() < deadline, f"not requeued: {read(preempted['log'])}"
        time.sleep(0.1)
    preempted["after_first_segment"] = sorted(os.listdir(root / "preempted"))
    for run in runs.values():
        run["records"] = slurm.wait(run["job"], timeout=400)
        run["text"] = read(run["log"])
    return runs


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
# The USR1 -> exit 75 -> requeue machinery of slurm/common.sh, with a stand-in training script.
# ----------------------------------------------------------------------------------------------------------------
STAND_IN = textwrap.dedent("""\
    import os, signal, sys, time
    from accelerate import Accelerator
    state, stop = Accelerator(), []  # reads ACCELERATE_USE_CPU, as the training script's Accelerator does
    signal.signal(signal.SIGUSR1, lambda *_: stop.append(1))
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # as train_cosmos_lora.py's StopSignal
    out = sys.argv[1]
    open(os.path.join(out, f"ready-{state.process_index}-of-{state.num_processes}"), "w").close()
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        open(os.path.join(out, "resumed"), "w").close()
        sys.exit(0)
    deadline = time.time() + float(sys.argv[2])
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    if stop:
        open(os.path.join(out, f"checkpoint-{state.process_index}"), "w").close()
        sys.exit(75)
    sys.exit(int(sys.argv[3]))
""")


def wait_for_files(directory, names, proc=None, timeout=90):
    deadline = time.time() + timeout
    while not all(os.path.exists(os.path.join(directory, n)) for n in names):
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{names} not in {os.listdir(directory)}"
        time.sleep(0.1)


@pytest.mark.parametrize(
    "ranks, stop_signal",
    [(1, signal.SIGUSR1), (2, signal.SIGUSR1), (1, signal.SIGTERM)],
    ids=["one_process", "torchrun_two_processes", "one_process_sigterm"],
)
def test_usr1_reaches_every_rank_through_accelerate_launch_and_gives_75(tmp_path, ranks, stop_signal):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    config = os.path.join(REPO, "accelerate_configs", "cpu.yaml")
    if ranks == 2:
        config = tmp_path / "torchrun_cpu.yaml"
        config.write_text(TORCHRUN_CPU_CONFIG)
    snippet = (
        f"source slurm/common.sh; rc=0; run_launcher accelerate launch --config_file {config}"
        f' {tmp_path}/stand_in.py {tmp_path} 60 0 || rc=$?; echo "run_launcher returned $rc"'
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
    wait_for_files(tmp_path, [f"ready-{r}-of-{ranks}" for r in range(ranks)], proc)
    # To the shell only, as SLURM's --signal=B:USR1 does. For SIGTERM the launcher ignores it (accelerate's
    # single-process launcher would die at once) and the shell forwards it.
    proc.send_signal(stop_signal)
    out, _ = proc.communicate(timeout=60)
    assert "run_launcher returned 75" in out, out
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith(("ready", "checkpoint"))) == sorted(
        [*(f"ready-{r}-of-{ranks}" for r in range(ranks)), *(f"checkpoint-{r}" for r in range(ranks))]
    )


def test_a_failure_without_usr1_is_not_taken_for_a_preemption(tmp_path):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    snippet = (
        "source slurm/common.sh; rc=0; run_launcher accelerate launch --config_file accelerate_configs/cpu.yaml"
        f' {tmp_path}/stand_in.py {tmp_path} 0 3 || rc=$?; echo "run_launcher returned $rc"; finish $rc'
    )
    env = job_env()
    result = subprocess.run(
        ["bash", "-c", f"{env['ENV_ACTIVATE']}; {snippet}"],
        cwd=REPO,
        env=env,
        text=True,
        capture_output=True,
        timeout=120,
    )
    # accelerate launch reports the stand-in's exit code 3 as 1; the script passes that on.
    assert result.returncode not in (0, 75) and "run_launcher returned 75" not in result.stdout, result.stdout
    assert "requeue" not in result.stdout


def test_usr1_to_the_batch_shell_requeues_and_the_job_resumes(slurm, submit_dir, tmp_path):
    """common.sh in a real batch job: scancel --batch --signal=USR1 -> checkpoint, exit 75 -> requeue -> resume."""
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    script = tmp_path / "preemptible.sh"
    script.write_text(
        textwrap.dedent(f"""\
        #!/usr/bin/env bash
        #SBATCH --job-name=preemptible
        #SBATCH --output=logs/%x_%j.out
        #SBATCH --open-mode=append
        #SBATCH --requeue
        set -euo pipefail
        source "$REPO_DIR/slurm/common.sh"
        enter_repo
        log_job
        rc=0
        run_launcher accelerate launch --config_file accelerate_configs/cpu.yaml {tmp_path}/stand_in.py {tmp_path} \\
            120 0 || rc=$?
        finish "$rc"
        """)
    )
    job = slurm.sbatch(str(script), env=job_env(), cwd=submit_dir, sbatch_args=TEST_SBATCH)
    wait_for_files(tmp_path, ["ready-0-of-1"])
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    records = slurm.wait(job, timeout=120)
    log = read(submit_dir / "logs" / f"preemptible_{job}.out")
    assert state(records) == [("COMPLETED", "0:0", "1")], log
    assert (tmp_path / "checkpoint-0").exists() and (tmp_path / "resumed").exists()
    assert "restart 0 on" in log and "restart 1 on" in log and f"requeueing job {job}" in log, log


# ----------------------------------------------------------------------------------------------------------------
# The job scripts on SLURM.
# ----------------------------------------------------------------------------------------------------------------
def test_cache_array_job_shards_are_disjoint_and_complete(array_cache, clips):
    records, logs = array_cache["records"], array_cache["logs"]
    assert state(records) == [("COMPLETED", "0:0", "0")] * 2, logs
    shards = []
    for index in (0, 1):
        with open(os.path.join(array_cache["dir"], f"shard_{index:05d}", "manifest.jsonl")) as f:
            shards.append({(row["key"], row["clip_index"]) for row in map(json.loads, f)})
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    # 4 s videos with a clip start every second: 2 clips each (as in test_cache_latents.py).
    assert sorted(shards[0] | shards[1]) == sorted((k, c) for k in clips["keys"] for c in range(2))
    info = read_cache_info(array_cache["dir"])
    assert (info["num_clips"], info["num_shards"]) == (12, 2)
    assert cache_latents.verify_cache(array_cache["dir"])[1] == []
    for index, log in enumerate(logs):
        assert f"shard {index}/2: wrote {len(shards[index])} clips" in log, log
        assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in log and "HF_TOKEN=set" in log
        assert SECRET not in log


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


@needs_train
def test_train_job_trains_and_exports(training_runs):
    run = training_runs["uninterrupted"]
    assert state(run["records"]) == [("COMPLETED", "0:0", "0")], run["text"]
    for name in EXPORTS:
        assert load_file(os.path.join(run["dir"], name)), name
    assert checkpoints(run["dir"])
    rows = loss_rows(run["dir"])
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1))
    assert all(isinstance(row["loss"], float) and row["loss"] == row["loss"] for row in rows)
    assert "HF_HUB_OFFLINE=1" in run["text"] and "WANDB_MODE=offline" in run["text"]
    assert SECRET not in run["text"]


@needs_train
def test_preempted_train_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(training_runs):
    run, reference = training_runs["preempted"], training_runs["uninterrupted"]
    text = run["text"]
    assert state(run["records"]) == [("COMPLETED", "0:0", "1")], text
    # The first segment stopped on USR1 with a checkpoint and requeued the job; the second resumed and finished.
    assert checkpoints(run["after_first_segment"]), run["after_first_segment"]
    assert "SIGUSR1: forwarding it to the training processes" in text
    assert f"requeueing job {run['job']}" in text
    assert "restart 0 on" in text and "restart 1 on" in text
    assert not any(name in run["after_first_segment"] for name in EXPORTS), "it finished before the signal came"
    rows = loss_rows(run["dir"])
    assert [row["step"] for row in rows] == list(range(1, TRAIN_STEPS + 1)), rows
    assert [row["loss"] for row in rows] == pytest.approx(
        [row["loss"] for row in loss_rows(reference["dir"])], rel=1e-6
    )
    for name in EXPORTS:
        resumed, expected = load_file(os.path.join(run["dir"], name)), load_file(os.path.join(reference["dir"], name))
        assert resumed.keys() == expected.keys()
        for key in expected:
            assert torch.equal(resumed[key], expected[key]), f"{name} {key}"


@needs_train
@needs_sample
def test_sample_job_writes_the_video_grid(slurm, submit_dir, tiny_model, array_cache, training_runs):
    run = training_runs["uninterrupted"]
    assert state(run["records"])[0][0] == "COMPLETED"
    job = submit(
        slurm,
        submit_dir,
        "sample.sh",
        run["dir"],
        "--disable_safety_checker",
        "--num_inference_steps",
        "2",
        "--height",
        "64",
        "--width",
        "112",
        "--num_frames",
        "17",
        env={"MODEL": tiny_model, "CACHE_DIR": array_cache["dir"], "NUM_VIDEOS": 2},
    )
    records = slurm.wait(job, timeout=300)
    log = read(submit_dir / "logs" / f"cosmos_sample_{job}.out")
    assert state(records) == [("COMPLETED", "0:0", "0")], log
    grid = os.path.join(run["dir"], "samples", "final", "video_grid.mp4")
    with av.open(grid) as container:
        assert sum(1 for _ in container.decode(video=0)) > 0


@needs_train
def test_multinode_job_trains_on_two_machines(slurm, submit_dir, tiny_model, array_cache, tmp_path):
    """Two srun tasks on the one node play two machines: torchrun rendezvous at the head node, gloo, one rank each."""
    config = tmp_path / "torchrun_cpu.yaml"
    config.write_text(TORCHRUN_CPU_CONFIG)
    job = submit(
        slurm,
        submit_dir,
        "train_multinode.sh",
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
        env={
            "MODEL": tiny_model,
            "CACHE_DIR": array_cache["dir"],
            "OUTPUT_DIR": tmp_path / "run",
            "ACCELERATE_CONFIG": config,
            "ACCELERATE_USE_CPU": 1,
            "GPUS_PER_NODE": 1,
        },
        sbatch_args=["--nodes=1", "--ntasks=2", "--ntasks-per-node=2"],
    )
    records = slurm.wait(job, timeout=300)
    log = read(submit_dir / "logs" / f"cosmos_lora_multinode_{job}.out")
    assert state(records) == [("COMPLETED", "0:0", "0")], log
    assert "2 machines x 1 processes" in log
    for name in EXPORTS:
        assert load_file(str(tmp_path / "run" / name)), name
    assert [row["step"] for row in loss_rows(tmp_path / "run")] == [1, 2]


def test_shellcheck_passes_on_every_script():
    if not shutil.which("shellcheck") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (
            ["apt-get", "install", "-y", "-q", "shellcheck"],
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "shellcheck"],
        ):
            if subprocess.run(cmd, capture_output=True, env=env, timeout=600).returncode == 0 and cmd[1] == "install":
                break
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed and could not be installed")
    scripts = sorted(f"slurm/{name}" for name in os.listdir(SLURM_DIR) if name.endswith(".sh"))
    assert len(scripts) >= 5
    result = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
