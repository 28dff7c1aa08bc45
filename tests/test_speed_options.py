"""Speed options: --fp8 (which linears become torchao Float8Linear; a short run whose export matches a plain run's;
sampling in FP8 close to, but not equal to, bf16), DataLoader workers that live across epochs, and the warning when
GPU memory is so full that steps slow down.

On the CPU torchao emulates the FP8 casts, so the numbers move as FP8 moves them; the GPU speed and the loss
curves are in benchmarks/bench_train.py (configs *_fp8) and benchmarks/RESULTS.md."""

import logging

import pytest
import torch
from safetensors.torch import load_file

import sample
import train_cosmos_lora as train
from conftest import ALL_LINEAR, loss_rows, losses, sample_args, train_args
from cosmos_adapters import ADAPTER_WEIGHTS, LORA_WEIGHTS
from cosmos_families import detect_family
from cosmos_speed import convert_frozen_linears_to_fp8


def test_fp8_converts_only_the_frozen_block_linears(tiny_model, latent_cache):
    from torchao.float8.float8_linear import Float8Linear

    args = train_args(tiny_model, latent_cache, "unused", "--lora_target_modules", "attn2.to_q", "attn2.to_k")
    transformer = train.load_transformer(args, torch.float32, detect_family(args.pretrained_model_name_or_path))
    keys_before = transformer.state_dict().keys()
    trainable_before = [name for name, p in transformer.named_parameters() if p.requires_grad]
    convert_frozen_linears_to_fp8(transformer, emulate=True)
    converted = {name for name, module in transformer.named_modules() if isinstance(module, Float8Linear)}
    per_block = {name.split(".", 2)[2] for name in converted}
    assert per_block == {
        "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
        "attn2.to_q.base_layer", "attn2.to_k.base_layer", "attn2.to_v", "attn2.to_out.0",
        "ff.net.0.proj", "ff.net.2",
    }  # fmt: skip
    assert len(converted) == len(per_block) * len(transformer.transformer_blocks)
    assert transformer.state_dict().keys() == keys_before
    assert [name for name, p in transformer.named_parameters() if p.requires_grad] == trainable_before


def test_an_fp8_run_trains_and_exports_what_a_plain_run_exports(tiny_model, latent_cache, tmp_path):
    def run(name, *extra):
        out = tmp_path / name
        flags = ("--max_train_steps", 3, "--lora_target_modules", *ALL_LINEAR, "--seed", 5, *extra)
        assert train.main(train_args(tiny_model, latent_cache, out, *flags)) == 0
        return out

    plain, fp8 = run("plain"), run("fp8", "--fp8")
    plain_losses, fp8_losses = losses(plain), losses(fp8)
    assert [row["step"] for row in fp8_losses] == [1, 2, 3]
    # FP8 rounding changes every loss a little (so the FP8 path ran), and no more than a little.
    for a, b in zip((row["loss"] for row in plain_losses), (row["loss"] for row in fp8_losses), strict=True):
        assert a != b and abs(a - b) < 0.05 * abs(a)
    for name in (LORA_WEIGHTS, ADAPTER_WEIGHTS):
        plain_weights, fp8_weights = load_file(plain / name), load_file(fp8 / name)
        assert {k: v.shape for k, v in fp8_weights.items()} == {k: v.shape for k, v in plain_weights.items()}
        assert all(v.dtype == plain_weights[k].dtype for k, v in fp8_weights.items())


def test_a_full_gpu_memory_is_named_once_with_its_step(tiny_model, latent_cache, tmp_path, monkeypatch, caplog):
    """Memory that is nearly full makes the allocator free its cache and retry, which slows steps without stopping
    the run: the run says so once, at the first step that counts a retry, and logs the count every step."""
    assert train.memory_full_warning({"loss": 0.1}, 1) is None  # a CPU run counts no retries
    measured, steps = train.step_logs, []

    def retries_from_step_two(loss, *args):
        steps.append(loss)
        logs = measured(loss, *args)
        logs["allocator_retries"] = 3 if len(steps) >= 2 else 0  # as torch.cuda.memory_stats() counts them
        return logs

    monkeypatch.setattr(train, "step_logs", retries_from_step_two)
    with caplog.at_level(logging.WARNING):
        assert train.main(train_args(tiny_model, latent_cache, tmp_path, "--max_train_steps", 4)) == 0
    warnings = [r.getMessage() for r in caplog.records if "GPU memory is full" in r.getMessage()]
    assert len(warnings) == 1 and "GPU memory is full at step 2:" in warnings[0]
    assert "retried an allocation 3 times" in warnings[0]
    assert [row["allocator_retries"] for row in loss_rows(tmp_path)] == [0, 3, 3, 3]


def test_dataloader_workers_live_across_epochs(tiny_model, latent_cache, tmp_path):
    """Workers restarting at each epoch stalled the GPU (benchmarks/RESULTS.md run 16): the loader keeps them."""
    args = train_args(tiny_model, latent_cache, tmp_path, "--dataloader_num_workers", 1, "--train_batch_size", 2)
    caches, _ = train.load_caches(args.cache_dir, tiny_model, family=detect_family(tiny_model))
    loader, _ = train.build_train_dataloader(caches, args, num_processes=1)
    first = iter(loader)
    epoch_one = [batch["latents"] for batch in first]
    loader.batch_sampler.set_epoch(1)
    second = iter(loader)
    assert second is first  # the same workers serve the next epoch
    assert len([batch["latents"] for batch in second]) == len(epoch_one) > 0


def test_fp8_sampling_converts_the_block_linears_and_stays_close_to_the_plain_latents(tiny_model, image, tmp_path):
    from torchao.float8.float8_linear import Float8Linear

    def generate(*extra):
        args = sample_args(tiny_model, tmp_path, "--input", image, "--num_inference_steps", 3, "--seed", 3, *extra)
        components = sample.load_pipeline_components(
            args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
        )
        latents, _ = sample.generate_latents(
            sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)),
            components,
            args,
            first_index=0,
        )
        transformer = components.transformer
        converted = [m for m in transformer.transformer_blocks.modules() if isinstance(m, Float8Linear)]
        return latents, len(converted), len(transformer.transformer_blocks)

    plain, none_converted, _ = generate()
    fp8, converted, blocks = generate("--fp8")
    assert (none_converted, converted) == (0, 10 * blocks)
    difference = (fp8 - plain).abs().mean() / plain.abs().mean()
    assert 0 < difference < 0.05


@pytest.mark.parametrize("script", ["train", "sample"])
def test_fp8_without_torchao_is_refused_before_anything_loads(
    tiny_model, latent_cache, image, tmp_path, monkeypatch, script
):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    if script == "train":
        main, args = train.main, train_args(tiny_model, latent_cache, tmp_path / "run", "--fp8")
    else:
        main, args = sample.main, sample_args(tiny_model, tmp_path / "run", "--input", image, "--fp8")
    with pytest.raises(ValueError, match=r"^--fp8 needs torchao: pip install -r requirements-fp8.txt$"):
        main(args)
    assert not (tmp_path / "run").exists()
