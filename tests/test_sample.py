import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from conftest import (
    REPO,
    TINY,
    TWO_CPU_PROCESSES,
    StandInSafetyChecker,
    error_line,
    no_model_may_load,
    run_script,
    sample_args,
)
from cosmos_families import FAMILIES, detect_family, load_component, text_embed_kind, text_embed_width
from cosmos_speed import modulate_per_frame


def pipeline_output(model, image, output_type, steps=4, guidance=7.0, fps=None, prepare=None):
    """The pipeline's frames or latents; `prepare(pipe)` may patch or instrument it first."""
    from diffusers import Cosmos2VideoToWorldPipeline

    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(model, safety_checker=StandInSafetyChecker())
    if prepare:
        prepare(pipe)
    return pipe(
        image=Image.open(image),
        prompt="a worker picks up a tool",
        height=64,
        width=112,
        num_frames=17,
        num_inference_steps=steps,
        guidance_scale=guidance,
        fps=fps,
        output_type=output_type,
        generator=torch.Generator().manual_seed(3),
    ).frames


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_latents_match_the_diffusers_pipeline(tiny_model, image, tmp_path, guidance):
    args = sample_args(
        tiny_model,
        tmp_path,
        "--input",
        image,
        "--prompt",
        "a worker picks up a tool",
        "--num_inference_steps",
        4,
        "--guidance_scale",
        guidance,
        "--seed",
        3,
    )
    jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    ours, num_cond = sample.generate_latents(jobs, components, args, first_index=0)
    # fps=None: the pipeline's default fps=16 rescales RoPE, which NVIDIA's checkpoints were not trained with.
    theirs = pipeline_output(tiny_model, image, "latent", guidance=guidance)
    assert num_cond == 1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# Sampling steps of the overfit test: enough for each family's sampler to land on the memorized clip.
OVERFIT_SAMPLING_STEPS = {"predict2": 35, "predict2.5": 20}


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def test_the_last_step_is_skipped_and_the_latents_equal_the_pipelines_to_the_bit(tiny_model, image, tmp_path):
    """The pipeline's last Euler step has dt = 0: sample.py skips its model call. With the pipeline's transformer on
    the same per-frame modulation and one pass per step (no CFG), the latents are bit-identical."""
    steps = 4
    args = sample_args(tiny_model, tmp_path, "--input", image, "--prompt", "a worker picks up a tool")
    args.num_inference_steps, args.guidance_scale, args.seed = steps, 1.0, 3
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    our_calls = count_calls(components.transformer)
    ours, _ = sample.generate_latents(
        sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)), components, args, first_index=0
    )
    pipeline_calls = []

    def per_frame_and_counted(pipe):
        modulate_per_frame(pipe.transformer)
        pipeline_calls.append(count_calls(pipe.transformer))

    theirs = pipeline_output(tiny_model, image, "latent", steps=steps, guidance=1.0, prepare=per_frame_and_counted)
    pipeline_calls = pipeline_calls[0]
    assert (len(our_calls), len(pipeline_calls)) == (steps - 1, steps)
    assert torch.equal(ours, theirs)


def test_no_sampling_step_waits_for_the_device(family, monkeypatch):
    """Each family's sampling loop, run on the "meta" device, whose tensors hold no values: a step that reads one
    back on the host (.item(), `if tensor == ...`, .tolist(), .cpu()) raises there, as it would synchronize the host
    with a GPU. The two other calls that synchronize on CUDA are recorded once the first model call has begun: a copy
    of a CPU tensor onto the device (pageable memory) and torch.linalg.solve (its check for a singular matrix)."""
    model_family = family.model_family
    transformer = load_component(family.model, "transformer", family=model_family).to("meta")
    scheduler = load_component(family.model, "scheduler", family=model_family)
    width = text_embed_width(transformer.config, text_embed_kind(transformer.config, "full"))
    noise, text = torch.randn(1, 16, 5, 8, 14, device="meta"), torch.randn(1, 512, width, device="meta")
    calls, waits = count_calls(transformer), []
    to, solve = torch.Tensor.to, torch.linalg.solve

    def recorded_to(tensor, *args, **kwargs):
        moved = to(tensor, *args, **kwargs)
        if calls and tensor.device.type == "cpu" and moved.device.type == "meta":
            waits.append("a copy from the CPU")
        return moved

    def recorded_solve(*args, **kwargs):
        waits.append("torch.linalg.solve")
        return solve(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    monkeypatch.setattr(torch.linalg, "solve", recorded_solve)
    latents = model_family.denoise(transformer, scheduler, noise, noise, 1, text, text, 7.0, 5)
    assert latents.shape == noise.shape and len(calls) == {"predict2": 4, "predict2.5": 5}[family.name]
    assert waits == []


def test_per_frame_modulation_gives_the_stock_transformers_output(tiny_model):
    """Per-frame AdaLN: the modulation's linears see one row per latent frame instead of one per token, and the
    output equals the stock transformer's, with clean conditioning frames (another timestep) in the clip."""
    stock = load_component(tiny_model, "transformer", family=detect_family(tiny_model))
    per_frame = modulate_per_frame(load_component(tiny_model, "transformer", family=detect_family(tiny_model)))
    rows = []
    per_frame.transformer_blocks[0].norm1.linear_1.register_forward_hook(lambda m, i, o: rows.append(i[0].shape))
    batch, frames, height, width = 2, 5, 8, 14
    timestep = torch.rand(batch, 1, frames, 1, 1)
    timestep[:, :, :2] = 1e-4
    inputs = dict(
        timestep=timestep,
        encoder_hidden_states=torch.randn(batch, 512, stock.config.text_embed_dim),
        condition_mask=(timestep < 1e-3).float().expand(batch, 1, frames, height, width),
        padding_mask=torch.zeros(1, 1, height * 8, width * 8),
        fps=None,
        return_dict=False,
    )
    latents = torch.randn(batch, 16, frames, height, width)
    with torch.no_grad():
        expected = stock(latents, **inputs)[0]
        got = per_frame(latents, **inputs)[0]
    dim = stock.config.num_attention_heads * stock.config.attention_head_dim
    assert rows == [(batch, frames, 1, dim)]  # the stock norm sees (batch, frames * 4 * 7 tokens, dim)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("posterior", ["sample", "mode"])
@pytest.mark.parametrize("num_cond_frames", [1, 5])
def test_only_the_conditioning_frames_are_encoded_and_give_the_padded_clips_latents(
    tiny_model, posterior, num_cond_frames
):
    """The pipeline encodes the conditioning frames padded to the whole clip with the last one; the VAE is causal, so
    encoding the conditioning frames alone gives the same conditioning latent frames to the bit, and the generator
    ends in the same state (the posterior noise is drawn for the whole clip)."""
    from diffusers.utils.torch_utils import randn_tensor

    from cosmos_vae import normalize_latents
    from cosmos_video import frames_to_vae_input

    vae = load_component(tiny_model, "vae", family=detect_family(tiny_model))
    frames = torch.randint(0, 256, (num_cond_frames, 64, 112, 3), dtype=torch.uint8)
    job = sample.Job(name="clip", kind="image", source="clip.png", cond_frames=frames, shape=(17, 64, 112))
    encoded = []
    vae.encoder.register_forward_pre_hook(lambda m, args: encoded.append(args[0].shape[2]))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        family = next(f for f in FAMILIES.values() if f.conditioning_posterior == posterior)
        latents, num_cond = sample.conditioning_latents(job, vae, generator, torch.device("cpu"), family)
    after = randn_tensor((4,), generator=generator)
    frames_encoded = sum(encoded)  # the diffusers encoder runs frame 0, then chunks of 4

    padded = torch.cat([frames, frames[-1:].expand(17 - num_cond_frames, -1, -1, -1)])
    pipeline_generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        dist = vae.encode(frames_to_vae_input(padded)[None]).latent_dist
    whole = dist.sample(pipeline_generator) if posterior == "sample" else dist.mode()
    whole = normalize_latents(whole.float(), vae.config)

    assert num_cond == (1 if num_cond_frames == 1 else 2)
    assert frames_encoded == num_cond_frames
    assert latents.shape == whole.shape
    assert torch.equal(latents[:, :, :num_cond], whole[:, :, :num_cond])
    assert not latents[:, :, num_cond:].any()
    assert torch.equal(after, randn_tensor((4,), generator=pipeline_generator))


def test_five_frame_video_conditioning_matches_the_pipeline(tiny_model, clips, tmp_path):
    from diffusers import Cosmos2VideoToWorldPipeline

    video = os.path.join(clips["videos"], clips["keys"][1] + ".mp4")
    args = sample_args(
        tiny_model,
        tmp_path,
        "--input",
        video,
        "--num_conditioning_frames",
        5,
        "--prompt",
        "hands at a bench",
        "--num_inference_steps",
        3,
        "--seed",
        5,
    )
    jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    ours, num_cond = sample.generate_latents(jobs, components, args, first_index=0)
    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(tiny_model, safety_checker=StandInSafetyChecker())
    frames = [Image.fromarray(frame.numpy()) for frame in jobs[0].cond_frames]
    theirs = pipe(
        video=frames,
        prompt="hands at a bench",
        height=64,
        width=112,
        num_frames=17,
        num_inference_steps=3,
        fps=None,
        output_type="latent",
        generator=torch.Generator().manual_seed(5),
    ).frames
    assert num_cond == 2 and len(frames) == 5  # 5 pixel frames are 2 latent frames
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # The 4 s input holds the whole 17-frame clip at 8 fps, so it is also the ground truth.
    assert jobs[0].truth_frames.shape == (17, 64, 112, 3)


def test_sample_script_frames_match_the_pipeline(tiny_model, image, tmp_path):
    args = sample_args(
        tiny_model,
        tmp_path,
        "--input",
        image,
        "--prompt",
        "a worker picks up a tool",
        "--num_inference_steps",
        4,
        "--seed",
        3,
    )
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    latents, _ = sample.generate_latents(
        sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)), components, args, 0
    )
    ours = sample.decode_to_frames(components.vae, latents)[0].numpy().astype(float)
    theirs = (pipeline_output(tiny_model, image, "np")[0] * 255).round()
    assert ours.shape == theirs.shape == (17, 64, 112, 3)
    assert np.abs(ours - theirs).max() <= 1
    # The script end to end writes the (lossy H.264) mp4 and the summaries.
    sample.main(args)
    assert sample.read_mp4(str(tmp_path / "first_frame.mp4")).shape == (17, 64, 112, 3)
    for name in ("video_grid.mp4", "contact_sheet.png", "results.json"):
        assert (tmp_path / name).exists()


def test_lora_changes_the_output_and_scale_zero_gives_the_base_back(tiny_model, one_clip_cache, overfit_run, tmp_path):
    clip = sample.list_cached_clips(one_clip_cache)[0].path

    def latents(*extra):
        args = sample_args(tiny_model, tmp_path, "--input", clip, "--num_inference_steps", 3, *extra)
        components = sample.load_pipeline_components(
            args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
        )
        return sample.generate_latents(
            sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)), components, args, 0
        )[0]

    base = latents()
    tuned = latents("--lora_path", overfit_run)
    assert (tuned - base).abs().mean() > 0.05
    torch.testing.assert_close(latents("--lora_path", overfit_run, "--lora_scale", 0), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latents("--lora_path", overfit_run, "--fuse_lora"), tuned, rtol=1e-4, atol=1e-4)


def test_overfit_model_reproduces_its_clip_by_sampling(family, tmp_path):
    """Catches a flipped velocity sign, a wrong timestep scale or mishandled conditioning frames, with each family's
    own sampler (Predict2: Euler on Karras sigmas; Predict2.5: UniPC)."""
    clip = sample.list_cached_clips(family.one_clip_cache)[0].path
    model_family = family.model_family
    truth = sample.cached_job(clip, model_family).latents[None, :, 1:]

    def latents(steps, *extra):
        flags = ["--input", clip, "--guidance_scale", 1, "--num_inference_steps", steps, *extra]
        args = sample_args(family.model, tmp_path, *flags)
        components = sample.load_pipeline_components(args, torch.device("cpu"), model_family)
        return sample.generate_latents(sample.collect_jobs(args, model_family), components, args, 0)[0]

    def error(*extra):
        return float(((latents(OVERFIT_SAMPLING_STEPS[family.name], *extra)[:, :, 1:] - truth) ** 2).mean())

    untrained, trained = error(), error("--lora_path", family.overfit_run)
    # Measured over the four generated latent frames (latent variance 0.17): MSE 1.50 untrained and 0.027 trained
    # for Predict2, 1.56 and 0.053 for Predict2.5.
    assert trained < 0.1 * untrained and trained < 0.1, (trained, untrained)
    base = latents(3)
    torch.testing.assert_close(
        latents(3, "--lora_path", family.overfit_run, "--lora_scale", 0), base, rtol=1e-5, atol=1e-5
    )


def test_from_cache_writes_side_by_side_and_metrics(tiny_model, latent_cache, overfit_run, tmp_path):
    summary = sample.main(
        sample_args(
            tiny_model,
            tmp_path,
            "--from_cache",
            latent_cache,
            "--num_videos",
            2,
            "--lora_path",
            overfit_run,
            "--num_inference_steps",
            2,
            "--batch_size",
            2,
        )
    )
    held = [
        c.file.removesuffix(".safetensors")
        for c in sample.hold_out_clips(sample.list_cached_clips(latent_cache), 2, seed=0)[1]
    ]
    assert [v["name"] for v in summary["videos"]] == held
    for video in summary["videos"]:
        assert (tmp_path / video["side_by_side"]).exists()
        assert np.isfinite(video["psnr"]) and -1 <= video["ssim"] <= 1
    side = sample.read_mp4(str(tmp_path / summary["videos"][0]["side_by_side"]))
    assert side.shape == (17, 64, 224, 3)
    grid = sample.read_mp4(str(tmp_path / "video_grid.mp4"))
    assert grid.shape == (17, 64, 224, 3)
    saved = json.load(open(tmp_path / "results.json"))
    assert saved["settings"]["num_videos"] == 2 and "mean_psnr" in saved


def test_batched_jobs_equal_single_jobs(tiny_model, latent_cache, tmp_path):
    def run(batch_size):
        args = sample_args(
            tiny_model,
            tmp_path,
            "--from_cache",
            latent_cache,
            "--num_videos",
            2,
            "--num_inference_steps",
            2,
            "--batch_size",
            batch_size,
        )
        components = sample.load_pipeline_components(
            args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
        )
        jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
        if batch_size == 2:
            return sample.generate_latents(jobs, components, args, 0)[0]
        return torch.cat([sample.generate_latents([job], components, args, i)[0] for i, job in enumerate(jobs)])

    torch.testing.assert_close(run(2), run(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "extra, error, message",
    [
        (["--input", "/no/such/file.mp4"], FileNotFoundError, "--input /no/such/file.mp4 does not exist"),
        (["--input", "IMAGE", "--height", "60"], ValueError, "--height 60 is not a multiple of 16"),
        (["--input", "IMAGE", "--lora_path", "/no/such/run"], FileNotFoundError, "--lora_path /no/such/run is not a"),
        (["--input", "IMAGE", "GUARDRAIL"], ValueError, "`pip install cosmos-guardrail`, or pass --disable_safety"),
    ],
)
def test_bad_inputs_fail_in_one_line_before_any_model_loads(
    tiny_model, image, tmp_path, monkeypatch, extra, error, message
):
    no_model_may_load(monkeypatch, sample)
    args = sample_args(
        tiny_model, tmp_path / "out", *[image if e == "IMAGE" else e for e in extra if e != "GUARDRAIL"]
    )
    args.disable_safety_checker = "GUARDRAIL" not in extra  # cosmos-guardrail is not installed here
    with pytest.raises(error, match=re.escape(message)) as raised:
        sample.main(args)  # flags after TINY win
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ("target", "LoRA targets transformer_blocks.0.attn9.to_q, which this transformer does not have"),
        ("rank", "trained on another model size"),
    ],
)
def test_a_lora_of_another_model_fails_in_one_line(tiny_model, image, overfit_run, tmp_path, change, message):
    from safetensors.torch import load_file, save_file

    from cosmos_adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORA_WEIGHTS

    bad = tmp_path / "bad_lora"
    bad.mkdir()
    for name in os.listdir(overfit_run):
        if name.endswith(".json") or name == ADAPTER_WEIGHTS:
            (bad / name).write_bytes(open(os.path.join(overfit_run, name), "rb").read())
    lora = load_file(os.path.join(overfit_run, LORA_WEIGHTS))
    if change == "target":
        lora = {k.replace("attn2.to_q", "attn9.to_q"): v for k, v in lora.items()}
    else:
        lora = {k: (torch.zeros(v.shape[0], v.shape[1] * 2) if ".lora_A." in k else v) for k, v in lora.items()}
    save_file(lora, str(bad / LORA_WEIGHTS))
    config = json.load(open(bad / ADAPTER_CONFIG))  # a whole file, just not one of this model
    config["files"][LORA_WEIGHTS] = os.path.getsize(bad / LORA_WEIGHTS)
    json.dump(config, open(bad / ADAPTER_CONFIG, "w"))
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        sample.main(sample_args(tiny_model, tmp_path / "out", "--input", image, "--lora_path", bad))
    assert "\n" not in str(raised.value)


def test_the_script_prints_a_bad_input_in_one_error_line_and_exits_1(tiny_model, image, tmp_path):
    """Without cosmos-guardrail installed, the safety checker is required unless disabled."""
    result = run_script(
        "sample.py",
        "--pretrained_model_name_or_path",
        tiny_model,
        "--output_dir",
        tmp_path,
        "--input",
        image,
        "--height",
        64,
        "--width",
        112,
        "--num_frames",
        17,
    )
    line = error_line(result)
    assert line.startswith("error: the Cosmos guardrail is not installed") and "--disable_safety_checker" in line


def test_two_processes_split_the_jobs_and_the_main_one_writes_the_grid(tiny_model, latent_cache, tmp_path):
    result = run_script(
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(REPO, "accelerate_configs", "cpu_2proc.yaml"),
        os.path.join(REPO, "sample.py"),
        "--pretrained_model_name_or_path",
        tiny_model,
        "--output_dir",
        tmp_path,
        *TINY,
        "--from_cache",
        latent_cache,
        "--num_videos",
        3,
        "--num_inference_steps",
        2,
        env=TWO_CPU_PROCESSES,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(tmp_path / "results.json"))
    assert [v["index"] for v in summary["videos"]] == [0, 1, 2]
    assert result.stdout.count("wrote 3 videos") == 1
    # The same jobs in one process give the same videos: job i always uses seed + i.
    single = sample.main(
        sample_args(
            tiny_model,
            tmp_path / "single",
            "--from_cache",
            latent_cache,
            "--num_videos",
            3,
            "--num_inference_steps",
            2,
        )
    )
    for a, b in zip(summary["videos"], single["videos"], strict=True):
        assert a["name"] == b["name"] and abs(a["psnr"] - b["psnr"]) < 1e-3  # thread counts differ


def test_generation_builds_no_autograd_graph(tiny_model, image, tmp_path):
    args = sample_args(tiny_model, tmp_path, "--input", image, "--num_inference_steps", 2)
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    latents, _ = sample.generate_latents(
        sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)), components, args, 0
    )
    frames = sample.decode_to_frames(components.vae, latents)
    assert not latents.requires_grad and not frames.requires_grad
    models = (components.transformer, components.vae, components.text_encoder)
    assert not any(p.requires_grad for model in models for p in model.parameters())


def test_compiled_sampling_matches_eager(tiny_model, one_clip_cache, overfit_run, tmp_path):
    clip = sample.list_cached_clips(one_clip_cache)[0].path

    def latents(*extra):
        args = sample_args(
            tiny_model, tmp_path, "--input", clip, "--num_inference_steps", 2, "--lora_path", overfit_run, *extra
        )
        components = sample.load_pipeline_components(
            args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
        )
        return sample.generate_latents(
            sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path)), components, args, 0
        )[0]

    torch.testing.assert_close(latents("--compile"), latents(), rtol=1e-3, atol=1e-3)
