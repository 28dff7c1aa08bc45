"""No silent wrong results: held-out records, weight files, resume settings, value checks, configs, flags, model
paths, W&B offline, stop signals, NVIDIA's objective settings, EMA, and the labelled contact sheet."""

import argparse
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import cache_latents
import sample
import train_cosmos_lora as train
from conftest import (
    ALL_LINEAR,
    REPO,
    StandInSafetyChecker,
    base_transformer,
    help_entries,
    no_model_may_load,
    output,
    random_inputs,
    sample_args,
    train_args,
)
from cosmos_adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS, load_finetuned_weights
from cosmos_cache import list_cached_clips
from cosmos_families import detect_family
from cosmos_video import LABEL_HEIGHT, contact_sheet, label_strip

# Two steps at a high learning rate leave LoRA, adapters and proj_out clearly away from the base model.
RUN_ARGS = ["--max_train_steps", 2, "--checkpointing_steps", 2, "--learning_rate", 1e-2, "--lr_scheduler",
            "constant", "--num_validation_clips", 2, "--seed", 1, "--ema_decay", 0.5, "--lora_target_modules",
            *ALL_LINEAR]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_model, latent_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("trust_run")
    assert train.main(train_args(tiny_model, latent_cache, out, *RUN_ARGS)) == 0
    return str(out)


def copy_run(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


# ----------------------------------------------------------------------------------------------------------------
# 1. Held-out clips
# ----------------------------------------------------------------------------------------------------------------
def test_sampling_from_the_cache_uses_exactly_the_clips_the_run_held_out(tiny_model, latent_cache, run, tmp_path):
    record = json.load(open(os.path.join(run, "held_out.json")))
    assert record == json.load(open(os.path.join(run, "checkpoint-2", "held_out.json")))
    assert len(record["clips"]) == 2
    trained_keys = {c.key for c in list_cached_clips(latent_cache)} - set(record["keys"])
    # The run used --seed 1; sampling with the default seed 0 must still pick the run's held-out clips.
    args = sample_args(tiny_model, tmp_path, "--from_cache", latent_cache, "--lora_path", run, "--num_videos", 2)
    jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
    assert [os.path.relpath(job.source, latent_cache) for job in jobs] == record["clips"]
    key_of = {c.path: c.key for c in list_cached_clips(latent_cache)}
    assert all(key_of[job.source] not in trained_keys for job in jobs)
    # Without --lora_path the seeded choice stays; asking for more than the run held out is refused.
    family = detect_family(tiny_model)
    assert sample.collect_jobs(
        sample_args(tiny_model, tmp_path, "--from_cache", latent_cache, "--num_videos", 3), family
    )
    with pytest.raises(ValueError, match=r"--num_videos 3, but the run at .* held out only 2 clips"):
        sample.collect_jobs(sample_args(tiny_model, tmp_path, "--from_cache", latent_cache, "--lora_path", run,
                                        "--num_videos", 3), family)  # fmt: skip


def test_sampling_from_another_cache_of_the_run_is_refused(tiny_model, latent_cache, run, tmp_path):
    other = str(shutil.copytree(latent_cache, tmp_path / "other_cache"))
    args = sample_args(tiny_model, tmp_path, "--from_cache", other, "--lora_path", run, "--num_videos", 1)
    assert (
        len(sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))) == 1
    )  # a cache the run never saw: the seeded choice
    mixed = copy_run(run, tmp_path)
    record = json.load(open(mixed / "held_out.json"))
    record["trained_caches"].append(os.path.realpath(other))  # as if trained on both caches
    json.dump(record, open(mixed / "held_out.json", "w"))
    args.lora_path = str(mixed)
    with pytest.raises(ValueError, match="trained on every clip of"):
        sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))


def test_a_resumed_run_validates_on_the_recorded_clips(tiny_model, latent_cache, run, tmp_path):
    resumed = copy_run(run, tmp_path)
    before = (resumed / "held_out.json").read_text()
    # Another seed would hold out other videos; the checkpoint's record wins.
    assert train.main(train_args(tiny_model, latent_cache, resumed, *RUN_ARGS, "--max_train_steps", 3, "--seed", 7,
                                 "--checkpointing_steps", 3, "--resume_from_checkpoint", "latest",
                                 "--allow_changed_settings")) == 0  # fmt: skip
    assert (resumed / "held_out.json").read_text() == before
    assert (resumed / "checkpoint-3" / "held_out.json").read_text() == before


# ----------------------------------------------------------------------------------------------------------------
# 2. Missing or truncated files
# ----------------------------------------------------------------------------------------------------------------
def damage(path, how):
    if how == "deleted":
        os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize(
    "name, how",
    [
        (LORA_WEIGHTS, "deleted"),
        (LORA_WEIGHTS, "truncated"),
        (ADAPTER_WEIGHTS, "truncated"),
        ("optimizer.pt", "truncated"),
        ("scheduler.pt", "deleted"),
        ("training_state.json", "deleted"),
        (f"ema/{LORA_WEIGHTS}", "deleted"),
    ],
)
def test_resume_refuses_a_missing_or_truncated_file_by_name(tiny_model, latent_cache, run, tmp_path, name, how):
    resumed = copy_run(run, tmp_path)
    damage(resumed / "checkpoint-2" / name, how)
    with pytest.raises((FileNotFoundError, ValueError), match=name.replace(".", r"\.")):
        train.main(train_args(tiny_model, latent_cache, resumed, *RUN_ARGS, "--resume_from_checkpoint", "latest"))


@pytest.mark.parametrize("name, how", [(LORA_WEIGHTS, "deleted"), (ADAPTER_WEIGHTS, "truncated")])
def test_sample_refuses_a_missing_or_truncated_weight_file_by_name(tiny_model, image_path, run, tmp_path, name, how):
    damaged = copy_run(run, tmp_path)
    damage(damaged / name, how)
    args = sample_args(tiny_model, tmp_path / "out", "--input", image_path, "--lora_path", damaged)
    with pytest.raises((FileNotFoundError, ValueError), match=name.replace(".", r"\.")):
        sample.validate_args(args)


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("trust_image") / "frame.png"
    Image.fromarray(np.full((64, 112, 3), 128, np.uint8)).save(path)
    return str(path)


def test_exported_config_lists_its_weight_files(run):
    config = json.load(open(os.path.join(run, ADAPTER_CONFIG)))
    assert config["files"] == {n: os.path.getsize(os.path.join(run, n)) for n in (LORA_WEIGHTS, ADAPTER_WEIGHTS)}


# ----------------------------------------------------------------------------------------------------------------
# 3. --fuse_lora with --lora_scale
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [0.0, 0.5, 1.0])
def test_fused_and_unfused_agree_at_every_scale_and_zero_is_the_base(tiny_model, run, tmp_path, scale):
    def transformer(*extra):
        args = sample_args(tiny_model, tmp_path, "--lora_path", run, "--lora_scale", scale, *extra)
        return sample.load_pipeline_components(
            args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
        ).transformer

    base = base_transformer(tiny_model)
    inputs = random_inputs(base)
    fused, unfused = output(transformer("--fuse_lora"), inputs), output(transformer(), inputs)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    if scale == 0:
        assert torch.equal(fused, output(base, inputs))
    else:
        assert (fused - output(base, inputs)).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# 4. Resuming with changed settings
# ----------------------------------------------------------------------------------------------------------------
def test_resume_with_changed_settings_is_refused_naming_them(tiny_model, latent_cache, run, tmp_path):
    resumed = copy_run(run, tmp_path)
    before = (resumed / "training_args.json").read_text()
    changed = ["--max_train_steps", 4, "--lora_rank", 8, "--no-use_temporal_adapters", "--high_sigma_ratio", 0]
    with pytest.raises(ValueError, match="other settings") as error:
        train.main(train_args(tiny_model, latent_cache, resumed, *RUN_ARGS, *changed, "--resume_from_checkpoint",
                              "latest"))  # fmt: skip
    for expected in ("max_train_steps: 2 -> 4", "lora_rank: 16 -> 8", "use_temporal_adapters: True -> False",
                     "high_sigma_ratio: 0.05 -> 0.0", "--allow_changed_settings"):  # fmt: skip
        assert expected in str(error.value)
    assert (resumed / "training_args.json").read_text() == before
    # Speed and logging settings may change; the explicit flag allows the rest.
    assert train.main(train_args(tiny_model, latent_cache, resumed, *RUN_ARGS, "--max_train_steps", 3,
                                 "--resume_from_checkpoint", "latest", "--allow_changed_settings",
                                 "--checkpointing_steps", 5, "--dataloader_num_workers", 0)) == 0  # fmt: skip
    assert json.load(open(resumed / "training_args.json"))["max_train_steps"] == 3


# ----------------------------------------------------------------------------------------------------------------
# 9. Values checked at parse time, and clip lengths before any model loads
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, argv, message",
    [
        (train, ["--learning_rate", "0"], "argument --learning_rate: must be above 0.0, got 0"),
        (train, ["--learning_rate=-1e-4"], "argument --learning_rate: must be above 0.0"),
        (train, ["--checkpointing_steps", "0"], "argument --checkpointing_steps: must be at least 1, got 0"),
        (train, ["--gradient_accumulation_steps", "0"], "argument --gradient_accumulation_steps: must be at least 1"),
        (train, ["--train_batch_size", "0"], "argument --train_batch_size: must be at least 1"),
        (train, ["--max_train_steps", "0"], "argument --max_train_steps: must be at least 1"),
        (train, ["--text_dropout", "1.5"], "argument --text_dropout: must be at least 0.0 and at most 1.0"),
        (train, ["--conditioning_frames", "1,-1"], "argument --conditioning_frames: must be 0 or more"),
        (train, ["--ema_decay", "1"], "argument --ema_decay: must be below 1"),
        (train, ["--timestep_shift", "-2"], "argument --timestep_shift: must be above 0.0"),
        (sample, ["--output_dir", "o", "--num_videos", "0"], "argument --num_videos: must be at least 1"),
        (sample, ["--output_dir", "o", "--num_inference_steps", "0"], "argument --num_inference_steps: must be"),
        (cache_latents, ["--output_dir", "o", "--batch_size", "0"], "argument --batch_size: must be at least 1"),
    ],
)
def test_bad_values_fail_at_parse_time(capsys, script, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("script", [cache_latents, sample])
def test_one_latent_frame_is_refused(tmp_path, script):
    argv = ["--output_dir", str(tmp_path), "--num_frames", "1", "--height", "64", "--width", "112"]
    args = script.parse_args([*argv, "--verify"] if script is cache_latents else [*argv, "--disable_safety_checker"])
    with pytest.raises(ValueError, match="--num_frames 1 is one latent frame: video2world needs at least 2"):
        script.validate_args(args)


@pytest.mark.parametrize(
    "latent_frames, flags, message",
    [
        (1, [], "have 1 latent frame"),
        (5, ["--conditioning_frames", "5"], "--conditioning_frames 5 leaves no frame to predict in clips of 5"),
    ],
)
def test_clip_length_is_checked_against_the_cache_before_the_model_loads(
    tiny_model, latent_cache, tmp_path, monkeypatch, latent_frames, flags, message
):
    cache = shutil.copytree(latent_cache, tmp_path / "cache")
    info = json.load(open(cache / "cache_info.json"))
    info["latent_shape"][1] = latent_frames
    json.dump(info, open(cache / "cache_info.json", "w"))
    manifest = cache / "shard_00000" / "manifest.jsonl"  # each row records its own clip shape
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for row in rows:
        row["shape"][1] = latent_frames
    manifest.write_text("".join(json.dumps(row) + "\n" for row in rows))
    monkeypatch.setattr(train, "load_transformer", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tiny_model, str(cache), tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# 10. YAML configs go through argparse
# ----------------------------------------------------------------------------------------------------------------
def test_yaml_config_is_parsed_like_the_command_line(tmp_path, capsys):
    config = tmp_path / "exp.yaml"
    config.write_text('cache_dir: /data/ego\nuse_temporal_adapters: "no"\nconditioning_frames: [1, 2]\n'
                      "train_proj_out: false\ncompile: yes\nlearning_rate: 5e-4\n"
                      "lora_target_modules: [attn1.to_q]\n")  # fmt: skip
    args = train.parse_args(["--config", str(config), "--use_temporal_adapters"])
    assert args.cache_dir == ["/data/ego"] and args.conditioning_frames == [1, 2]
    assert args.use_temporal_adapters and not args.train_proj_out and args.compile  # the command line wins
    assert args.learning_rate == 5e-4 and args.lora_target_modules == ["attn1.to_q"]
    for bad, message in [("lr_scheduler: cosin", "invalid choice: 'cosin'"),
                         ("mixed_precision: fp16", "invalid choice: 'fp16'"),
                         ("train_batch_size: 0", "must be at least 1")]:  # fmt: skip
        config.write_text(bad + "\n")
        with pytest.raises(SystemExit):
            train.parse_args(["--config", str(config)])
        assert message in capsys.readouterr().err
    config.write_text("use_temporal_adapters: maybe\n")
    with pytest.raises(ValueError, match="not a boolean"):
        train.parse_args(["--config", str(config)])


# ----------------------------------------------------------------------------------------------------------------
# 11. Flags and docs agree
# ----------------------------------------------------------------------------------------------------------------
def test_documented_negative_flags_parse():
    assert not train.parse_args(["--no-use_temporal_adapters"]).use_temporal_adapters
    assert not train.parse_args(["--no-train_proj_out"]).train_proj_out


# What a flag's help must say besides its default: the family defaults behind a `None`, the README's list rule,
# and where the clipping default comes from.
HELP_NOTES = {
    "--timestep_shift": "Default: the family's, auto for Predict2, 5 for Predict2.5.",
    "--high_sigma_ratio": "Default: the family's, 0.05 for Predict2",
    "--lora_target_modules": "The list replaces the default",
    "--max_grad_norm": "0.1 matches NVIDIA",
    "--num_inference_steps": "Default: 35 (Predict2), 36 (Predict2.5).",
}


@pytest.mark.parametrize("script", [train, sample, cache_latents], ids=lambda m: m.__name__)
def test_help_shows_every_flags_default_and_the_parser_gives_it(script, capsys, monkeypatch):
    """Every flag's own help entry ends with its default, which is what a command line without the flag gets, or,
    where that is filled in from other flags, says in words what it becomes."""
    monkeypatch.setenv("COLUMNS", "1000")  # one line of help per flag
    parsers = []
    print_help = argparse.ArgumentParser.print_help
    monkeypatch.setattr(
        argparse.ArgumentParser, "print_help", lambda self, *a: parsers.append(self) or print_help(self, *a)
    )
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    entries = help_entries(capsys.readouterr().out)
    parsed = script.parse_args([] if script is train else ["--output_dir", "o"])
    flags = [a for a in parsers[0]._actions if a.option_strings and a.default is not argparse.SUPPRESS
             and not isinstance(a, argparse._StoreFalseAction)]  # fmt: skip
    assert len(flags) > 15
    for action in flags:
        entry = entries[action.option_strings[0]]
        assert (f"(default: {action.default})" in entry) != action.required, entry
        if action.dest not in ("output_dir", "config") and getattr(parsed, action.dest) != action.default:
            # Filled in at parse time from other flags: then the help says in words what the `None` becomes.
            assert action.default is None and "Default: " in entry, entry
        assert HELP_NOTES.get(action.option_strings[0], "") in entry
    if script is train:
        assert parsed.max_grad_norm == 0.1
    assert (
        set(HELP_NOTES) & set(entries)
        == {
            "train_cosmos_lora": {
                "--timestep_shift",
                "--high_sigma_ratio",
                "--lora_target_modules",
                "--max_grad_norm",
            },
            "sample": {"--num_inference_steps"},
            "cache_latents": set(),
        }[script.__name__]
    )


def test_lora_target_modules_replace_the_default(tiny_model, latent_cache):
    model = train.load_transformer(train_args(tiny_model, latent_cache, "x", "--lora_target_modules", "attn1.to_q"),
                                   torch.float32, detect_family(tiny_model))  # fmt: skip
    targets = {n.split(".lora_")[0].split(".", 2)[2] for n, p in model.named_parameters() if ".lora_" in n}
    assert targets == {"attn1.to_q"}


def test_runs_without_adapters_or_proj_out_export_and_reload(tiny_model, latent_cache, tmp_path):
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model, latent_cache, out, "--max_train_steps", 1, "--learning_rate", 1e-2,
                                 "--no-use_temporal_adapters", "--no-train_proj_out",
                                 "--lora_target_modules", *ALL_LINEAR)) == 0  # fmt: skip
    assert json.load(open(out / ADAPTER_CONFIG))["files"].keys() == {LORA_WEIGHTS}
    assert not (out / ADAPTER_WEIGHTS).exists()
    base, fresh = base_transformer(tiny_model), base_transformer(tiny_model)
    load_finetuned_weights(fresh, str(out))
    assert not any("temporal_adapter" in n for n, _ in fresh.named_parameters())
    assert torch.equal(fresh.proj_out.weight, base.proj_out.weight)
    inputs = random_inputs(base)
    assert not torch.allclose(output(fresh, inputs), output(base, inputs))


# ----------------------------------------------------------------------------------------------------------------
# 12. Model paths and the guardrail
# ----------------------------------------------------------------------------------------------------------------
def test_model_paths_fail_in_one_line_saying_what_to_do(tiny_model, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from cosmos_cli import check_pretrained_model

    with pytest.raises(FileNotFoundError, match=r"/no/such/model does not exist \(a local path\); .*hf download"):
        check_pretrained_model("/no/such/model", ["vae"])
    with pytest.raises(FileNotFoundError, match=r"a local directory without transformer/, vae/: not a diffusers"):
        check_pretrained_model(str(tmp_path), ["transformer", "vae"])
    check_pretrained_model(tiny_model, ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub_cache"))
    with pytest.raises(FileNotFoundError, match=r"is a hub id, HF_HUB_OFFLINE is set .*`hf download nvidia/Cosmos"):
        check_pretrained_model("nvidia/Cosmos-Predict2-2B-Video2World", ["vae"])


def test_train_script_names_a_missing_model_in_one_line(tmp_path):
    args = train.parse_args(
        ["--cache_dir", str(tmp_path), "--pretrained_model_name_or_path", str(tmp_path / "missing")]
    )
    with pytest.raises(FileNotFoundError) as error:
        train.main(args)
    message = str(error.value)
    assert "\n" not in message and "does not exist (a local path)" in message and "hf download" in message


def test_missing_guardrail_is_reported_before_any_model_loads(tiny_model, image_path, tmp_path, monkeypatch):
    """With the safety checker on (the default) and cosmos-guardrail missing, installed here or not, sample.py stops
    in one line naming the package before any model loads; with the package there, its checker is the one used."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "cosmos_guardrail" else find_spec(name, *a))  # fmt: skip
    monkeypatch.setitem(sys.modules, "cosmos_guardrail", None)  # `import cosmos_guardrail` fails
    no_model_may_load(monkeypatch, sample)
    size = ["--height", "64", "--width", "112", "--num_frames", "17"]
    argv = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", tmp_path / "out", "--input", image_path]
    args = sample.parse_args([*map(str, argv), *size])
    assert not args.disable_safety_checker
    with pytest.raises(ValueError, match=r"^the Cosmos guardrail is not installed: `pip install cosmos-guardrail`"):
        sample.main(args)
    assert not (tmp_path / "out").exists()
    assert "cosmos-guardrail" in open(os.path.join(REPO, "requirements-guardrail.txt")).read()
    # Installed (a stand-in module here), the check passes and the package's checker is the one that loads.
    guardrail = types.ModuleType("cosmos_guardrail")
    guardrail.CosmosSafetyChecker = StandInSafetyChecker
    monkeypatch.setitem(sys.modules, "cosmos_guardrail", guardrail)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "cosmos_guardrail" else find_spec(name, *a))  # fmt: skip
    sample.validate_args(args)
    assert isinstance(sample.load_safety_checker(), StandInSafetyChecker)


# ----------------------------------------------------------------------------------------------------------------
# 14. W&B offline
# ----------------------------------------------------------------------------------------------------------------
def clear_env(monkeypatch, *names):
    """Unset variables so that whatever the code under test sets is undone too (setenv records the original)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_wandb_falls_back_to_offline_with_one_warning(tmp_path, monkeypatch):
    clear_env(monkeypatch, "WANDB_MODE", "WANDB_DIR", "HF_HUB_OFFLINE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(train, "wandb_reachable", lambda host: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "W&B runs offline (HF_HUB_OFFLINE is set)" in train.configure_wandb(str(tmp_path))
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(train, "hub_offline", lambda: False)
    monkeypatch.setattr(train, "wandb_reachable", lambda host: False)
    assert "api.wandb.ai is unreachable" in train.configure_wandb(str(tmp_path))
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(train, "wandb_reachable", lambda host: True)
    assert train.configure_wandb(str(tmp_path)) is None and "WANDB_MODE" not in os.environ


def test_an_offline_wandb_run_writes_under_the_output_dir(tiny_model, latent_cache, tmp_path, monkeypatch):
    clear_env(monkeypatch, "WANDB_MODE", "WANDB_DIR")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert train.main(train_args(tiny_model, latent_cache, out, "--max_train_steps", 1, "--report_to", "wandb")) == 0
    assert list((out / "wandb").glob("offline-run-*")) and not (tmp_path / "wandb").exists()


# ----------------------------------------------------------------------------------------------------------------
# 15. Stop signals
# ----------------------------------------------------------------------------------------------------------------
def test_sigterm_finishes_the_step_saves_and_exits_75(tiny_model, latent_cache, tmp_path):
    """The one real training process here: SIGTERM to its whole process group, as SLURM sends it to every process of
    a job step (the DataLoader worker ignores it, the training finishes its step), and the exit code the SLURM
    scripts requeue on. One thread: the tiny model gains nothing from two, and loses much when the cores are busy."""
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(REPO, "train_cosmos_lora.py"), "--pretrained_model_name_or_path",
               tiny_model, "--cache_dir", latent_cache, "--output_dir", str(out), "--max_train_steps", "100000",
               "--checkpointing_steps", "100000", "--num_validation_clips", "0", "--report_to", "none",
               "--dataloader_num_workers", "1", "--train_batch_size", "1"]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 240
    while not (out / "losses.jsonl").exists() or not (out / "losses.jsonl").read_text().count("\n") >= 1:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, text[-3000:]
    steps = [json.loads(line)["step"] for line in (out / "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert os.listdir(out).count(f"checkpoint-{steps[-1]}") == 1 and "SIGTERM: saved" in text


def test_a_second_ctrl_c_stops_at_once():
    stop = train.StopSignal()
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is not stop.handle


# ----------------------------------------------------------------------------------------------------------------
# 16, 17, 19. NVIDIA's objective settings
# ----------------------------------------------------------------------------------------------------------------
def test_timestep_shift_is_sqrt_latent_frames_unless_given(tiny_model, latent_cache, monkeypatch):
    shifts = []
    monkeypatch.setattr(
        train, "sample_timesteps", lambda b, shift, d, r: shifts.append(shift) or torch.full((b,), 0.5)
    )
    monkeypatch.setattr(train, "flow_matching_loss", lambda *a: torch.zeros(()))
    batch = {"latents": torch.zeros(2, 16, 5, 8, 14), "prompt_embeds": torch.zeros(2, 512, 32)}
    train.training_loss(None, batch, train_args(tiny_model, latent_cache, "x"))
    train.training_loss(None, batch, train_args(tiny_model, latent_cache, "x", "--timestep_shift", 3))
    assert [s.tolist() for s in shifts] == [[pytest.approx(math.sqrt(5))] * 2, [3.0] * 2]  # one shift per clip
    assert train.default_timestep_shift(16) == 4.0


def test_high_sigma_branch_draws_nvidias_fraction_log_uniform_in_200_to_1e5(tiny_model, latent_cache):
    assert train_args(tiny_model, latent_cache, "x").high_sigma_ratio == 0.05
    torch.manual_seed(0)
    t = train.sample_timesteps(200_000, 4.0, "cpu", 0.05).double()
    sigma = t / (1 - t)
    high = sigma >= 200
    assert abs(high.double().mean() - 0.05) < 0.003  # sigma = 4 exp(N(0, 1)) reaches 200 with p = 5e-5
    assert sigma[high].max() <= 1e5 * 1.001
    log_sigma = sigma[high].log()
    assert abs(log_sigma.mean() - (math.log(200) + math.log(1e5)) / 2) < 0.05  # log-uniform: the middle


# ----------------------------------------------------------------------------------------------------------------
# 18. EMA
# ----------------------------------------------------------------------------------------------------------------
def test_ema_is_exported_beside_the_weights_and_sample_loads_it(tiny_model, run, tmp_path):
    for directory in (run, os.path.join(run, "checkpoint-2")):
        assert json.load(open(os.path.join(directory, "ema", ADAPTER_CONFIG)))["files"].keys() == {
            LORA_WEIGHTS, ADAPTER_WEIGHTS}  # fmt: skip
    raw, ema = load_file(os.path.join(run, LORA_WEIGHTS)), load_file(os.path.join(run, "ema", LORA_WEIGHTS))
    assert not all(torch.equal(raw[k], ema[k]) for k in raw)
    args = sample_args(tiny_model, tmp_path, "--lora_path", run, "--use_ema")
    loaded = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    ).transformer
    reference = base_transformer(tiny_model)
    load_finetuned_weights(reference, os.path.join(run, "ema"))
    inputs = random_inputs(reference)
    assert torch.equal(output(loaded, inputs), output(reference, inputs))
    with pytest.raises(FileNotFoundError, match="has no ema/"):
        sample.validate_args(sample_args(tiny_model, tmp_path, "--lora_path", os.path.join(run, "ema"), "--use_ema"))


# ----------------------------------------------------------------------------------------------------------------
# The demo tells the truth: a labelled contact sheet
# ----------------------------------------------------------------------------------------------------------------
def test_contact_sheet_rows_are_labelled_truth_above_generated(tiny_model, latent_cache, tmp_path):
    sample.main(sample_args(tiny_model, tmp_path, "--from_cache", latent_cache, "--num_videos", 1,
                            "--num_inference_steps", 1))  # fmt: skip
    sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))
    row = LABEL_HEIGHT + 64 + 2
    assert sheet.shape[0] == 2 * row + LABEL_HEIGHT  # VAE reconstruction, then generated with its frame captions
    result = json.load(open(tmp_path / "results.json"))["videos"][0]
    name, caption = result["name"], result["caption"]  # the cached clip's own caption
    assert np.array_equal(sheet[:LABEL_HEIGHT], label_strip(f"{name}: VAE reconstruction", sheet.shape[1]))
    generated = label_strip(f"{name}: generated from its caption: {caption}", sheet.shape[1])
    assert np.array_equal(sheet[row : row + LABEL_HEIGHT], generated)
    assert sheet[:LABEL_HEIGHT].max() > 200  # the text is drawn (antialiased white on black)
    unlabelled = contact_sheet([np.zeros((3, 64, 112, 3), np.uint8)])
    assert unlabelled.shape[0] == 66
