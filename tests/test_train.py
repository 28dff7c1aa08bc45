import glob
import io
import json
import logging
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import cosmos_data
import train_cosmos_lora as train
from conftest import (
    ALL_LINEAR,
    OVERFIT_STEPS,
    REPO,
    TWO_CPU_PROCESSES,
    base_transformer,
    copy_cache,
    edit_cache_info,
    error_line,
    losses,
    no_model_may_load,
    output,
    random_inputs,
    run_script,
    train_args,
)
from cosmos_adapters import (
    ADAPTER_WEIGHTS,
    LORA_WEIGHTS,
    TemporalAdapter,
    load_finetuned_weights,
    save_finetuned_weights,
)
from cosmos_cache import CACHE_INFO, CachedClip, list_cached_clips, read_clip
from cosmos_families import detect_family
from cosmos_video import LABEL_HEIGHT, label_strip


def test_fresh_adapters_give_exactly_the_base_output(family):
    base = base_transformer(family.model)
    args = train_args(family.model, family.one_clip_cache, "unused", "--lora_target_modules", *ALL_LINEAR)
    adapted = train.load_transformer(args, torch.float32, family.model_family)
    inputs = random_inputs(base)  # Predict2.5: full-width text embeddings, which crossattn_proj projects
    assert torch.equal(output(base, inputs), output(adapted, inputs))
    groups = Counter(train.parameter_group(n) for n, p in adapted.named_parameters() if p.requires_grad)
    assert set(groups) == {"LoRA", "temporal adapters", "proj_out"}
    assert all(not p.requires_grad for n, p in adapted.named_parameters() if train.parameter_group(n) == "frozen")


def test_trainable_parameter_table_counts_each_group(tiny_model, latent_cache):
    from diffusers import CosmosTransformer3DModel

    args = train_args(tiny_model, latent_cache, "x")
    model = train.load_transformer(args, torch.float32, detect_family(args.pretrained_model_name_or_path))
    table = train.trainable_parameter_table(model)
    counts = {line[:20].strip(): int(line[20:35].replace(",", "")) for line in table.splitlines()[1:]}
    # Counted here from the layers: rank x (in + out) per LoRA-wrapped linear, the adapters' and proj_out's weights.
    wrapped = [m for name, m in model.named_modules() if name.endswith(".base_layer")]
    assert len(wrapped) == len(model.transformer_blocks) * len(args.lora_target_modules)
    lora = sum(args.lora_rank * (m.in_features + m.out_features) for m in wrapped)
    adapters = sum(p.numel() for m in model.modules() if isinstance(m, TemporalAdapter) for p in m.parameters())
    proj_out = sum(p.numel() for p in model.proj_out.parameters())
    base = sum(
        p.numel() for p in CosmosTransformer3DModel.from_pretrained(tiny_model, subfolder="transformer").parameters()
    )
    assert counts == {
        "LoRA": lora,
        "temporal adapters": adapters,
        "proj_out": proj_out,
        "trainable total": lora + adapters + proj_out,
        "model total": base + lora + adapters,
    }
    assert adapters > 0 and lora > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + adapters + proj_out


def test_temporal_adapter_mixes_along_time_only():

    torch.manual_seed(0)
    adapter = TemporalAdapter(dim=32, reduction_factor=4)
    torch.nn.init.normal_(adapter.up.weight)
    adapter.num_frames = 4
    x = torch.randn(1, 4 * 6, 32)  # 4 frames of 6 spatial tokens, flattened T-major
    y = adapter(x)
    x2 = x.clone()
    x2[0, 6 * 0 + 2] += 1.0  # change spatial token 2 of frame 0
    changed = (adapter(x2) - y).abs().sum(-1).view(4, 6) > 0
    # Kernel 3 over time: frames 0 and 1 of the same spatial token change, nothing else.
    assert changed[:, 2].tolist() == [True, True, False, False]
    assert changed.sum() == 2


def test_overfitting_one_clip_lowers_the_loss(overfit_run):
    curve = [row["loss"] for row in losses(overfit_run)]
    assert len(curve) == OVERFIT_STEPS
    first, last = sum(curve[:20]) / 20, sum(curve[-20:]) / 20
    # Measured: about 1.0 over the first 20 steps and 0.03 over the last 20 (of 300).
    assert last < 0.1 * first


def test_resume_is_exact_on_a_cache_of_three_buckets(tiny_model, bucket_cache, tmp_path):
    # A constant schedule, so that a run told to stop at step 3 has the same learning rates as the 6-step run.
    common = [
        "--train_batch_size",
        2,
        "--gradient_accumulation_steps",
        2,
        "--checkpointing_steps",
        3,
        "--learning_rate",
        1e-3,
        "--lr_scheduler",
        "constant",
        "--lr_warmup_steps",
        2,
        "--lora_dropout",
        0.1,
        "--num_validation_clips",
        2,
        "--validation_steps",
        2,
        "--ema_decay",
        "power",
    ]
    assert train.main(train_args(tiny_model, bucket_cache, tmp_path / "full", "--max_train_steps", 6, *common)) == 0
    assert train.main(train_args(tiny_model, bucket_cache, tmp_path / "half", "--max_train_steps", 3, *common)) == 0
    assert (
        train.main(
            train_args(
                tiny_model,
                bucket_cache,
                tmp_path / "half",
                "--max_train_steps",
                6,
                "--resume_from_checkpoint",
                "latest",
                "--allow_changed_settings",  # a longer run than the checkpoint's
                *common,
            )
        )
        == 0
    )
    # 4 training clips in 3 buckets (one video of each shape held out), batches of 2, 2 micro-steps a step: an epoch
    # is 2 batches, so the 6 steps cross five epoch boundaries.
    assert losses(tmp_path / "half") == losses(tmp_path / "full")
    assert [row["step"] for row in losses(tmp_path / "full")] == [1, 2, 3, 4, 5, 6]
    # The weights and their EMA (kept in the checkpoint) end equal.
    for name in (LORA_WEIGHTS, ADAPTER_WEIGHTS, f"ema/{LORA_WEIGHTS}", f"ema/{ADAPTER_WEIGHTS}"):
        full, half = load_file(tmp_path / "full" / name), load_file(tmp_path / "half" / name)
        assert full.keys() == half.keys() and all(torch.equal(full[k], half[k]) for k in full)
    raw, ema = load_file(tmp_path / "full" / LORA_WEIGHTS), load_file(tmp_path / "full" / "ema" / LORA_WEIGHTS)
    assert raw.keys() == ema.keys() and not all(torch.equal(raw[k], ema[k]) for k in raw)
    assert sorted(os.listdir(tmp_path / "full")) == sorted(os.listdir(tmp_path / "half"))


def test_resume_from_a_mid_run_checkpoint_with_a_decaying_schedule(tiny_model, latent_cache, tmp_path):
    common = ["--max_train_steps", 6, "--checkpointing_steps", 3, "--learning_rate", 1e-3, "--lr_warmup_steps", 2]
    assert train.main(train_args(tiny_model, latent_cache, tmp_path / "full", *common)) == 0
    os.makedirs(tmp_path / "resumed")
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert (
        train.main(
            train_args(tiny_model, latent_cache, tmp_path / "resumed", "--resume_from_checkpoint", "latest", *common)
        )
        == 0
    )
    assert losses(tmp_path / "resumed") == losses(tmp_path / "full")[3:]
    full, resumed = load_file(tmp_path / "full" / LORA_WEIGHTS), load_file(tmp_path / "resumed" / LORA_WEIGHTS)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_checkpoints_total_limit_keeps_the_newest(tiny_model, latent_cache, tmp_path):
    assert (
        train.main(
            train_args(
                tiny_model,
                latent_cache,
                tmp_path,
                "--max_train_steps",
                5,
                "--checkpointing_steps",
                1,
                "--checkpoints_total_limit",
                2,
            )
        )
        == 0
    )
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


def test_exported_weights_reload_onto_a_fresh_base(tiny_model, latent_cache, tmp_path):
    args = train_args(tiny_model, latent_cache, tmp_path, "--lora_target_modules", *ALL_LINEAR, "--lora_alpha", 8)
    model = train.load_transformer(args, torch.float32, detect_family(args.pretrained_model_name_or_path))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    dataset = train.CachedClips(
        train.load_caches([latent_cache], tiny_model, family=detect_family(tiny_model))[0][0].clips
    )
    batch = {k: torch.stack([dataset[0][k], dataset[1][k]]) for k in ("latents", "prompt_embeds")}
    for _ in range(3):
        train.training_loss(model, batch, args).backward()
        optimizer.step()
        optimizer.zero_grad()
    save_finetuned_weights(train.trainable_state_dict(model), tmp_path, train.adapter_config(args))

    fresh = base_transformer(tiny_model)
    inputs = random_inputs(fresh)
    base_output = output(fresh, inputs)
    load_finetuned_weights(fresh, str(tmp_path))
    assert torch.equal(output(fresh, inputs), output(model, inputs))
    assert not torch.allclose(output(fresh, inputs), base_output)
    # The LoRA file is in diffusers' format: transformer.-prefixed keys, no peft adapter name.
    keys = load_file(tmp_path / LORA_WEIGHTS).keys()
    assert all(k.startswith("transformer.transformer_blocks.") and ".default." not in k for k in keys)


def test_bucket_batch_sampler_keeps_one_shape_per_batch_and_the_mixture_weights():
    # Cache a: 10 clips of one shape and 20 of another; cache b: 30 clips of the first shape. Weights 0.7 / 0.3.
    def clips(shape, n):
        return [CachedClip("key", 0, 0.0, shape, "hash", "clip.safetensors", "text.safetensors")] * n

    a = clips((16, 5, 8, 14), 10) + clips((16, 5, 14, 8), 20)
    b = clips((16, 5, 8, 14), 30)
    groups = cosmos_data.clip_groups([cosmos_data.Cache("a", "", a, 0.7), cosmos_data.Cache("b", "", b, 0.3)])
    assert [(g.cache, g.bucket, len(g.indices)) for g in groups] == [
        ("a", "17x64x112", 10),
        ("a", "17x112x64", 20),
        ("b", "17x64x112", 30),
    ]
    assert [round(g.probability, 4) for g in groups] == [0.2333, 0.4667, 0.3]
    sampler = cosmos_data.BucketBatchSampler(
        [g.indices for g in groups], [g.probability for g in groups], 4, 6000, seed=0
    )
    batches = list(sampler)
    group_of = {i: n for n, g in enumerate(groups) for i in g.indices}
    assert all(len({group_of[i] for i in batch}) == 1 and len(batch) == 4 for batch in batches)
    share_a = sum(group_of[batch[0]] < 2 for batch in batches) / len(batches)
    assert abs(share_a - 0.7) < 0.02
    assert batches == list(sampler)  # deterministic for a seed and epoch
    sampler.set_epoch(1)
    assert batches != list(sampler)
    # One group: an epoch walks a permutation of its clips.
    one = cosmos_data.BucketBatchSampler([list(range(10))], [1.0], batch_size=2, num_batches=5, seed=0)
    assert sorted(i for batch in one for i in batch) == list(range(10))


def test_cache_spec_parsing():
    assert cosmos_data.parse_cache_spec("ego=/data/c:0.7") == ("ego", "/data/c", 0.7)
    assert cosmos_data.parse_cache_spec("/data/c:2") == ("c", "/data/c", 2.0)
    assert cosmos_data.parse_cache_spec("/data/c") == ("c", "/data/c", None)


def test_two_caches_are_mixed_in_training(tiny_model, latent_cache, one_clip_cache, tmp_path):
    args = train_args(tiny_model, [f"a={latent_cache}:0.5", f"b={one_clip_cache}:0.5"], tmp_path)
    caches, _ = train.load_caches(args.cache_dir, tiny_model, family=detect_family(tiny_model))
    loader, _ = train.build_train_dataloader(caches, args, num_processes=1)
    paths = []
    for epoch in range(5):  # each batch comes from one cache: count over a few epochs
        loader.batch_sampler.set_epoch(epoch)
        paths += [loader.dataset.clips[i].path for batch in loader.batch_sampler for i in batch]
    from_b = sum(p.startswith(one_clip_cache) for p in paths)
    assert 0.35 < from_b / len(paths) < 0.65


def test_held_out_videos_never_train(tiny_model, latent_cache, tmp_path, monkeypatch):
    """A real run: every clip its training batches load is of a video other than the held-out ones, and every other
    video trains; the validation loss reads exactly the recorded held-out clips."""
    loads = []  # (dataset, clip) of every item any dataset of the run loads
    get_item = train.CachedClips.__getitem__
    monkeypatch.setattr(
        train.CachedClips, "__getitem__", lambda self, i: loads.append((self, self.clips[i])) or get_item(self, i)
    )
    # 12 clips of 6 videos, 2 each: 3 validation clips hold out 2 whole videos (4 clips); batches of 4 over the
    # other 8 make one epoch in 2 steps, and the validation at step 2 reads the 3 clips.
    flags = ["--max_train_steps", 2, "--train_batch_size", 4, "--num_validation_clips", 3, "--validation_steps", 2]
    assert train.main(train_args(tiny_model, latent_cache, tmp_path, *flags)) == 0
    record = json.load(open(tmp_path / "held_out.json"))
    held_keys = set(record["keys"])
    all_keys = {c.key for c in list_cached_clips(latent_cache)}
    validation = [c for dataset, c in loads if [os.path.relpath(v.path, latent_cache) for v in dataset.clips]
                  == record["clips"]]  # fmt: skip
    trained = [c for dataset, c in loads if os.path.relpath(dataset.clips[0].path, latent_cache)
               not in record["clips"]]  # fmt: skip
    assert len(held_keys) == 2 and len(record["clips"]) == 3
    assert len(trained) == 8 and len(validation) == 3 and len(trained) + len(validation) == len(loads)
    assert {c.key for c in trained} == all_keys - held_keys  # every other video trains, no held-out one does
    assert sorted(os.path.relpath(c.path, latent_cache) for c in validation) == sorted(record["clips"])
    assert {c.key for c in validation} <= held_keys


def test_the_run_says_how_many_clips_of_held_out_videos_go_unused():
    clips = [CachedClip(key, 0, 0.0, (16, 16, 32, 56), "hash", "clip.safetensors", "t") for key in "aaabbc"]  # a: 3
    train_clips = clips[3:]  # video a is held out
    assert train.held_out_summary(clips, train_clips, clips[:2]) == (
        "held-out videos: 1; their clips that validate: 2; their other clips, which neither train nor validate: 1"
    )
    assert train.held_out_summary(clips, train_clips, clips[:3]).endswith("nor validate: 0")


@pytest.mark.parametrize(
    "problem, error, message",
    [
        ("empty", ValueError, "holds no clips"),
        ("normalization", ValueError, "normalized with another VAE"),
        ("deleted_clip", FileNotFoundError, "of its 12 listed clip files are missing (first: "),
        ("missing", FileNotFoundError, "is not a latent cache"),
    ],
)
def test_bad_caches_fail_before_the_model_loads(
    tiny_model, latent_cache, tmp_path, monkeypatch, problem, error, message
):
    bad = str(tmp_path / "nowhere")
    if problem != "missing":
        bad = copy_cache(latent_cache, tmp_path / "bad")
    if problem == "empty":
        for shard in os.listdir(bad):
            if shard.startswith("shard_"):
                shutil.rmtree(os.path.join(bad, shard))
    elif problem == "normalization":
        info = json.load(open(os.path.join(bad, CACHE_INFO)))
        info["vae_normalization"]["latents_std"][0] *= 2
        edit_cache_info(bad, vae_normalization=info["vae_normalization"])
    elif problem == "deleted_clip":
        os.remove(sorted(glob.glob(os.path.join(bad, "shard_00000", "*.safetensors")))[5])
    no_model_may_load(monkeypatch, train)
    argv = ["--pretrained_model_name_or_path", tiny_model, "--cache_dir", bad, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(error, match=re.escape(message)) as raised:
        train.main(train.parse_args(argv))
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--gradient_checkpointing_blocks", "1"], "needs --gradient_checkpointing full or selective"),
        (["--gradient_checkpointing", "full", "--gradient_checkpointing_blocks", "3"], "the transformer has 2 blocks"),
    ],
)
def test_checkpointed_blocks_are_refused_before_the_model_loads(
    tiny_model, latent_cache, tmp_path, monkeypatch, flags, message
):
    no_model_may_load(monkeypatch, train)
    with pytest.raises(ValueError, match=message):
        train.main(train_args(tiny_model, latent_cache, tmp_path / "out", *flags))
    assert not (tmp_path / "out").exists()


def test_the_script_prints_a_bad_input_in_one_error_line_and_exits_1(tiny_model, tmp_path):
    result = run_script(
        "train_cosmos_lora.py",
        "--pretrained_model_name_or_path",
        tiny_model,
        "--cache_dir",
        tmp_path / "nowhere",
        "--output_dir",
        tmp_path / "out",
    )
    assert error_line(result).startswith(f"error: {tmp_path / 'nowhere'} is not a latent cache (no cache_info.json)")
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_nan_loss_stops_with_the_step_named_and_keeps_the_checkpoint(tiny_model, one_clip_cache, tmp_path):
    cache = copy_cache(one_clip_cache, tmp_path / "cache")
    out = tmp_path / "out"
    common = ["--train_batch_size", 1, "--checkpointing_steps", 2]
    assert train.main(train_args(tiny_model, cache, out, "--max_train_steps", 2, *common)) == 0
    before = {n: open(out / "checkpoint-2" / n, "rb").read() for n in os.listdir(out / "checkpoint-2")}
    clip = next(p for p in (tmp_path / "cache" / "shard_00000").glob("*.safetensors"))
    latents = load_file(clip)["latents"]
    save_file({"latents": torch.full_like(latents, float("nan"))}, clip)
    with pytest.raises(RuntimeError, match=r"loss is nan at step 3.*checkpoint-2"):
        train.main(
            train_args(
                tiny_model,
                cache,
                out,
                "--max_train_steps",
                4,
                "--resume_from_checkpoint",
                "latest",
                "--allow_changed_settings",
                *common,
            )
        )
    assert {n: open(out / "checkpoint-2" / n, "rb").read() for n in os.listdir(out / "checkpoint-2")} == before
    assert not (out / "checkpoint-4").exists()


def test_yaml_config_sets_defaults_and_flags_win(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text("learning_rate: 0.0005\nlora_rank: 8\ncache_dir: [/data/ego]\n")
    args = train.parse_args(["--config", str(config), "--lora_rank", "4"])
    assert (args.learning_rate, args.lora_rank, args.cache_dir) == (5e-4, 4, ["/data/ego"])
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        train.parse_args(["--config", str(config)])


@pytest.mark.parametrize("mode, blocks", [("full", None), ("selective", None), ("full", 1)])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, latent_cache, mode, blocks):
    wrapped = {}

    def loss_and_grads(*extra):
        torch.manual_seed(0)  # same LoRA initialization in both models
        args = train_args(tiny_model, latent_cache, "unused", "--lora_target_modules", *ALL_LINEAR, *extra)
        model = train.load_transformer(args, torch.float32, detect_family(args.pretrained_model_name_or_path))
        wrapped[extra] = [type(b).__name__ == "CheckpointWrapper" for b in model.transformer_blocks]
        # Non-zero up-projections, so gradients reach every trainable group.
        for name, param in model.named_parameters():
            if name.endswith("up.weight"):
                torch.nn.init.normal_(param, std=0.02)
        dataset = train.CachedClips(
            train.load_caches([latent_cache], tiny_model, family=detect_family(tiny_model))[0][0].clips
        )
        batch = {k: torch.stack([dataset[0][k], dataset[1][k]]) for k in ("latents", "prompt_embeds")}
        torch.manual_seed(0)
        loss = train.training_loss(model, batch, args)
        loss.backward()
        named = train.trainable_state_dict(model)  # clean names even through the checkpoint wrappers
        grads = {
            n.replace("_checkpoint_wrapped_module.", ""): p.grad
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        return loss, grads, named

    loss, grads, names = loss_and_grads()
    flags = ("--gradient_checkpointing", mode, *(("--gradient_checkpointing_blocks", str(blocks)) if blocks else ()))
    checkpointed_loss, checkpointed_grads, checkpointed_names = loss_and_grads(*flags)
    # the tiny transformer's two blocks: both wrapped, or only the first with --gradient_checkpointing_blocks 1
    assert wrapped == {(): [False, False], flags: [True, blocks is None]}
    assert checkpointed_names.keys() == names.keys()
    torch.testing.assert_close(checkpointed_loss, loss)
    assert grads.keys() == checkpointed_grads.keys()
    for name in grads:
        torch.testing.assert_close(checkpointed_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_mixed_shapes_count_tokens_per_batch_and_shift_noise_per_clip():
    from accelerate import Accelerator

    batch = {"latents": torch.zeros(2, 16, 3, 8, 14), "bad_clips": ["a.safetensors (truncated)"]}
    stats = train.reduce_micro_step(Accelerator(cpu=True), torch.tensor(0.5), batch, train.StopSignal())
    assert (stats.loss, stats.tokens, stats.bad_clips, stats.stop_requested) == (0.5, 2 * 3 * 4 * 7, 1, False)
    # `auto` follows each clip's latent frames (NVIDIA's sqrt(state_t)); a number is used as it is.
    assert train.clip_timestep_shift("auto", torch.zeros(2, 16, 16, 4, 4)).tolist() == [4.0, 4.0]
    assert train.clip_timestep_shift(3.0, torch.zeros(1, 16, 5, 4, 4)).tolist() == [3.0]


def test_a_clip_that_fails_to_load_is_replaced_named_and_counted_up_to_a_bound(
    tiny_model, latent_cache, tmp_path, caplog
):
    cache = copy_cache(latent_cache, tmp_path / "cache")
    broken = sorted(glob.glob(os.path.join(cache, "shard_00000", "*.safetensors")))[4]
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[: len(data) // 2])  # truncated
    common = ["--train_batch_size", 4, "--max_train_steps", 3, "--checkpointing_steps", 100]
    with caplog.at_level(logging.WARNING):
        assert train.main(train_args(tiny_model, cache, tmp_path / "a", *common)) == 0
    assert f"skipped a clip that failed to load: {broken}" in caplog.text
    with pytest.raises(RuntimeError, match=f"1 clips failed to load, more than --max_bad_clips 0; .*{broken}"):
        train.main(train_args(tiny_model, cache, tmp_path / "b", "--max_bad_clips", 0, *common))


def test_a_version_1_cache_without_buckets_is_refused_with_a_re_cache_message(tiny_model, one_clip_cache, tmp_path):
    cache = copy_cache(one_clip_cache, tmp_path / "cache")
    info = json.load(open(os.path.join(cache, CACHE_INFO)))
    for key in ("format_version", "buckets", "bucket_latent_shapes", "clips_per_bucket", "clip_plan"):
        del info[key]
    json.dump(info, open(os.path.join(cache, CACHE_INFO), "w"))
    manifest = os.path.join(cache, "shard_00000", "manifest.jsonl")
    rows = [{k: v for k, v in json.loads(line).items() if k != "shape"} for line in open(manifest)]
    open(manifest, "w").writelines(json.dumps(row) + "\n" for row in rows)
    with pytest.raises(ValueError, match="is a format-1 cache, not format 3: re-cache it"):
        train.main(train_args(tiny_model, cache, tmp_path / "out", "--max_train_steps", 2))


def test_validation_videos_are_written_and_logged(tiny_model, latent_cache, tmp_path):
    assert (
        train.main(
            train_args(
                tiny_model,
                latent_cache,
                tmp_path,
                "--max_train_steps",
                2,
                "--validation_steps",
                2,
                "--num_validation_clips",
                2,
                "--validation_videos",
                2,
                "--validation_inference_steps",
                3,
                "--report_to",
                "tensorboard",
            )
        )
        == 0
    )
    from sample import read_mp4

    videos = sorted((tmp_path / "validation" / "step-2").glob("*.mp4"))
    assert len(videos) == 2
    assert read_mp4(str(videos[0])).shape == (17, 64, 224, 3)  # ground truth | generated
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert "val/truth_vs_generated" in events.Tags()["images"]
    assert {"val/loss", "loss", "samples_per_s"} <= set(events.Tags()["scalars"])
    # Each row of the logged contact sheet is labelled with its clip's own caption.
    encoded = events.Images("val/truth_vs_generated")[-1].encoded_image_string
    sheet = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    captions = {read_clip(clip.path)[1]["caption"] for clip in list_cached_clips(latent_cache)}
    labels = [label_strip(f"17x64x112 truth | generated: {c}", sheet.shape[1]) for c in captions]
    assert any(np.array_equal(sheet[:LABEL_HEIGHT], label) for label in labels)


def test_profile_summary_splits_busy_idle_and_exposed_communication(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    from profile_train import summarize_trace

    events = [  # microseconds; one step of 1.2 ms
        {"cat": "kernel", "name": "sm90_xmma_gemm", "ts": 0, "dur": 100, "tid": 7},
        {"cat": "kernel", "name": "ncclDevKernel_AllGather", "ts": 50, "dur": 200, "tid": 8},  # 150 us exposed
        {"cat": "kernel", "name": "cudnn_flash_fwd", "ts": 600, "dur": 400, "tid": 7},  # after a 350 us gap
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0, "dur": 5, "tid": 1},
        {"cat": "cpu_op", "name": "training step", "ts": 0, "dur": 1200, "tid": 1},
        {"cat": "cpu_op", "name": "aten::item", "ts": 240, "dur": 400, "tid": 1},
        {"cat": "cpu_op", "name": "pin_memory", "ts": 300, "dur": 10, "tid": 99},  # not a launching thread
    ]
    summary = summarize_trace(events, steps=1, wall_s=0.0012)
    assert summary["kernel_ms"] == {"attention": 0.4, "communication": 0.2, "base matmul": 0.1}
    assert summary["gpu_busy_ms"] == 0.7 and summary["gpu_idle_ms"] == 0.5
    assert summary["exposed_communication_ms"] == 0.1  # 150 us, rounded to 0.1 ms
    assert summary["largest_gaps"] == [{"ms": 0.35, "at_ms": 0.25, "host": "aten::item"}]


@dataclass
class TwoProcessRuns:
    """A two-process run and its resume from the middle, shared by the tests below."""

    root: Path
    full: Path  # 4 steps, checkpoints at 2 and 4, steps 3 and 4 profiled
    full_stdout: str
    resumed: Path  # checkpoint-2 of `full` resumed to step 4, its export checked on each rank


@pytest.fixture(scope="module")
def two_process_runs(tiny_model, bucket_cache, tmp_path_factory):
    """The full run goes through benchmarks/profile_train.py's per-rank probe (launched directly, to keep its
    stdout); the resume through benchmarks/check_export.py, whose probe compares each rank's trained parameters with
    the export. Both train the real train_cosmos_lora.py on 2 gloo CPU processes, with the same settings."""
    root = tmp_path_factory.mktemp("two_process")
    config = os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml")
    settings = [
        "--cache_dir", bucket_cache, "--max_train_steps", 4, "--checkpointing_steps", 2, "--train_batch_size", 1,
        "--dataloader_num_workers", 0, "--num_validation_clips", 0, "--report_to", "none",
        "--gradient_checkpointing", "full", "--gradient_checkpointing_blocks", 1,  # one block wrapped, one not
        "--lr_scheduler", "constant", "--learning_rate", 1e-2,
    ]  # fmt: skip
    (root / "profile").mkdir()
    full = run_script(
        "-m", "accelerate.commands.launch", "--config_file", config,
        os.path.join(REPO, "benchmarks", "profile_train.py"), "--probe", root / "profile" / "profile", 2, 2,
        os.path.join(REPO, "train_cosmos_lora.py"),
        "--pretrained_model_name_or_path", tiny_model, "--output_dir", root / "full", *settings,
        env=TWO_CPU_PROCESSES, timeout=600,
    )  # fmt: skip
    assert full.returncode == 0, full.stderr[-3000:]
    with pytest.MonkeyPatch.context() as patch:  # check_export.py's own main(), in this process
        patch.syspath_prepend(os.path.join(REPO, "benchmarks"))
        for name, value in dict(TWO_CPU_PROCESSES, HF_HUB_OFFLINE="1").items():
            patch.setenv(name, value)
        resume = ["--resume_from_checkpoint", str(root / "full" / "checkpoint-2")]
        argv = ["--workdir", root, "--out", root, "--model", tiny_model, "--config_file", config, "--steps", 4]
        argv += ["--modes", "full", "--train_args", *settings, *resume]
        patch.setattr(sys, "argv", ["check_export.py", *map(str, argv)])
        import check_export

        check_export.main(check_export.parse_args())
    check = json.loads((root / "export_check.json").read_text())["full"]
    assert "error" not in check, check["error"]
    return TwoProcessRuns(root, root / "full", full.stdout, root / "export_check_full")


def test_two_processes_train_on_a_bucketed_cache_and_only_the_main_one_prints_and_saves(two_process_runs):
    runs = two_process_runs
    # Both ranks trained (each draws its own batches), but only the main process printed, logged and saved.
    assert "num_processes=2" in runs.full_stdout
    assert runs.full_stdout.count("trainable total") == 1 and runs.full_stdout.count("17x112x64") == 1
    assert runs.full_stdout.count(f"in {runs.full}") == 1
    assert sorted(d for d in os.listdir(runs.full) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    assert [row["step"] for row in losses(runs.full)] == [1, 2, 3, 4]


def assert_same_state(a, b, where="state"):
    """Nested dicts and lists of tensors and plain values are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, list | tuple):  # a reloaded optimizer's betas are a list
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_two_process_resume_is_exact(two_process_runs):
    runs = two_process_runs
    # 6 clips in 3 buckets, one per batch, 2 processes: an epoch is 3 steps, so resuming at 2 crosses its end.
    assert losses(runs.resumed) == losses(runs.full)[2:]
    for directory in (".", "checkpoint-4"):
        for name in (LORA_WEIGHTS, ADAPTER_WEIGHTS):
            full, resumed = load_file(runs.full / directory / name), load_file(runs.resumed / directory / name)
            assert full.keys() == resumed.keys()
            for key in full:
                assert torch.equal(full[key], resumed[key]), (directory, name, key)
    # The optimizer moments, the schedule and the data position in the last checkpoints are equal too.
    for name in ("optimizer.pt", "scheduler.pt"):
        full = torch.load(runs.full / "checkpoint-4" / name, weights_only=False)
        resumed = torch.load(runs.resumed / "checkpoint-4" / name, weights_only=False)
        assert_same_state(resumed, full)
    states = [
        json.loads((run / "checkpoint-4" / "training_state.json").read_text()) for run in (runs.full, runs.resumed)
    ]
    assert states[0]["global_step"] == states[1]["global_step"] == 4
    assert states[0]["batches_consumed"] == states[1]["batches_consumed"]


def test_two_process_export_holds_what_each_rank_trained(two_process_runs):
    """benchmarks/check_export.py's per-rank check (run on 3 GPUs under FSDP2 for the benchmark) on 2 CPU processes."""
    check = json.loads((two_process_runs.root / "export_check.json").read_text())["full"]
    assert check.get("ok"), check
    assert [r["rank"] for r in check["ranks"]] == [0, 1]
    assert all(r["trainable"] == r["exported"] == 29 for r in check["ranks"])


def test_profile_runs_the_real_script_on_every_rank(two_process_runs):
    """benchmarks/profile_train.py (3 GPUs under FSDP2 for the benchmark) on 2 CPU processes: one report per rank."""
    profile = two_process_runs.root / "profile"
    ranks = [json.loads((profile / f"profile.rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["steps"] == 2 and r["step_ms"] > 0 for r in ranks)
    # No kernel runs on the CPU, so the whole step is GPU idle time.
    assert all(r["gpu_busy_ms"] == 0 and r["gpu_idle_ms"] == r["step_ms"] for r in ranks)
    # The garbage collector's callback saw the profiled steps' collections (measured: about 48 in 2 steps).
    assert all(r["python_gc_runs"] > 0 and r["python_gc_ms"] >= 0 for r in ranks)
    assert (profile / "trace_rank1.json").is_file()
