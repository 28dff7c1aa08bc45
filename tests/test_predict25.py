"""Cosmos-Predict2.5 through the same three scripts, against diffusers' Cosmos2_5_PredictBasePipeline."""

import json
import os

import pytest
import torch
from PIL import Image

import sample
import train_cosmos_lora as train
from conftest import StandInSafetyChecker, cache_clips, random_inputs, sample_args, train_args
from cosmos_adapters import LORA_WEIGHTS
from cosmos_cache import CACHE_INFO, list_cached_clips, read_text_embeds, text_embed_path
from cosmos_families import (
    detect_family,
    encode_qwen_prompts,
    last_frame_indices,
    load_component,
    null_text_embedding,
    project_text,
    projection_sha,
    take_text_projection,
)

PROMPT = "a worker picks up a tool"


def pipeline(model):
    from diffusers import Cosmos2_5_PredictBasePipeline

    return Cosmos2_5_PredictBasePipeline.from_pretrained(model, safety_checker=StandInSafetyChecker())


def pipeline_latents(pipe, steps, seed, **inputs):
    return pipe(
        prompt=PROMPT,
        height=64,
        width=112,
        num_frames=17,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator().manual_seed(seed),
        **inputs,
    ).frames


def our_latents(args):
    components = sample.load_pipeline_components(
        args, torch.device("cpu"), detect_family(args.pretrained_model_name_or_path)
    )
    jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
    latents, num_cond = sample.generate_latents(jobs, components, args, first_index=0)
    return latents, num_cond, jobs


def test_family_comes_from_model_index(tiny_model, tiny_model_25):
    assert detect_family(tiny_model).name == "predict2"
    family = detect_family(tiny_model_25)
    assert (family.name, family.conditioning_side, family.num_inference_steps) == ("predict2.5", "last", 36)
    with open(os.path.join(tiny_model_25, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "Cosmos2_5_PredictBasePipeline"


def test_prompt_embeddings_equal_the_pipelines(tiny_model_25):
    pipe = pipeline(tiny_model_25)
    prompts = [PROMPT, "hands at a bench " * 200]  # the second is truncated at 512 tokens
    ours = encode_qwen_prompts(pipe.tokenizer, pipe.text_encoder, prompts, "cpu")
    theirs, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    assert ours.shape == (2, 512, 2 * 32)  # 2 layers x hidden 32
    assert torch.equal(ours, theirs)


def test_projected_embeddings_bypass_crossattn_proj_exactly(tiny_model_25):
    transformer = load_component(tiny_model_25, "transformer", family=detect_family(tiny_model_25))
    inputs = random_inputs(transformer)
    full = torch.randn(2, 512, 64)
    with torch.no_grad():
        expected = transformer(**dict(inputs, encoder_hidden_states=full))[0]
        projection = take_text_projection(transformer)
        assert isinstance(transformer.crossattn_proj, torch.nn.Identity)
        projected = project_text(projection, full)
        assert projected.shape == (2, 512, 32)
        assert torch.equal(transformer(**dict(inputs, encoder_hidden_states=projected))[0], expected)


def test_cache_stores_projected_embeddings_and_records_the_family(tiny_model_25, one_clip_cache_25):
    with open(os.path.join(one_clip_cache_25, CACHE_INFO)) as f:
        info = json.load(f)
    transformer = load_component(tiny_model_25, "transformer", family=detect_family(tiny_model_25))
    sha = projection_sha(transformer.crossattn_proj)
    assert info["format_version"] == 3 and info["family"] == "predict2.5" and info["model"] == tiny_model_25
    assert info["text_embeds"] == {"kind": "projected", "shape": [512, 32], "projection_sha": sha}
    clip = list_cached_clips(one_clip_cache_25)[0]
    stored = read_text_embeds(text_embed_path(one_clip_cache_25, clip.caption_hash))
    tokenizer, encoder = (
        load_component(tiny_model_25, "tokenizer", family=detect_family(tiny_model_25)),
        load_component(tiny_model_25, "text_encoder", family=detect_family(tiny_model_25)),
    )
    full = encode_qwen_prompts(tokenizer, encoder, ["a worker's hands"], "cpu")
    with torch.no_grad():
        expected = transformer.crossattn_proj(full)[0]
    torch.testing.assert_close(stored.float(), expected, rtol=1e-2, atol=1e-2)  # stored in bfloat16


def test_full_embedding_cache_trains(tiny_model_25, clips, tmp_path):
    import shutil

    videos, out = tmp_path / "videos", tmp_path / "full_cache"
    videos.mkdir()
    shutil.copy(os.path.join(clips["videos"], clips["keys"][0] + ".mp4"), videos)
    argv = ["--video_dir", videos, "--max_clips_per_video", "1", "--text_embeds", "full"]
    assert cache_clips(tiny_model_25, out, *argv) == 0
    with open(out / CACHE_INFO) as f:
        assert json.load(f)["text_embeds"] == {"kind": "full", "shape": [512, 64], "projection_sha": None}
    run = tmp_path / "run"
    assert train.main(train_args(tiny_model_25, str(out), run, "--max_train_steps", 1, "--train_batch_size", 1)) == 0
    assert os.path.isfile(run / LORA_WEIGHTS)


def test_text_dropout_on_projected_embeddings_equals_zeroed_full_embeddings(tiny_model_25):
    """Dropping a caption zeroes the full embedding, which crossattn_proj maps to GELU(bias), not to zeros."""
    transformer = load_component(tiny_model_25, "transformer", family=detect_family(tiny_model_25))
    latents, noise = torch.randn(1, 16, 5, 8, 14), torch.randn(1, 16, 5, 8, 14)
    t, num_cond = torch.tensor([0.6]), torch.tensor([1])

    def loss(embeds):
        with torch.no_grad():
            return train.flow_matching_loss(transformer, latents, embeds, t, noise, num_cond, 1e-4)

    expected = loss(torch.zeros(1, 512, 64))
    null = null_text_embedding(transformer, "projected")
    take_text_projection(transformer)
    assert torch.equal(loss(null.expand(1, 512, 32)), expected)
    assert not torch.equal(loss(torch.zeros(1, 512, 32)), expected)


def test_image_latents_match_the_pipeline(tiny_model_25, tmp_path):
    frame = (torch.arange(64 * 112 * 3) % 251).to(torch.uint8).view(64, 112, 3).numpy()
    path = tmp_path / "frame.png"
    Image.fromarray(frame).save(path)
    args = sample_args(
        tiny_model_25, tmp_path, "--input", path, "--prompt", PROMPT, "--num_inference_steps", 4, "--seed", 3
    )
    ours, num_cond, _ = our_latents(args)
    theirs = pipeline_latents(pipeline(tiny_model_25), 4, 3, image=Image.open(path), guidance_scale=7.0)
    assert num_cond == 1
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_five_frame_video_conditions_on_its_last_frames_like_the_pipeline(tiny_model_25, clips, tmp_path):
    video = os.path.join(clips["videos"], clips["keys"][1] + ".mp4")
    args = sample_args(
        tiny_model_25,
        tmp_path,
        "--input",
        video,
        "--num_conditioning_frames",
        5,
        "--prompt",
        PROMPT,
        "--num_inference_steps",
        3,
        "--seed",
        5,
    )
    ours, num_cond, jobs = our_latents(args)
    # A 4 s video at 30 fps sampled at 8 fps: its last 5 frames are the source frames nearest to 0.5 s .. 0 s
    # before its last one.
    assert last_frame_indices(120, 30.0, 5, 8.0) == [[104, 108, 111, 115, 119]]
    assert jobs[0].truth_frames is None  # the generation continues the video: no ground truth
    frames = [Image.fromarray(frame.numpy()) for frame in jobs[0].cond_frames]
    theirs = pipeline_latents(pipeline(tiny_model_25), 3, 5, video=frames)
    assert num_cond == 2 and len(frames) == 5
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_training_refuses_a_trainable_or_another_crossattn_proj(tiny_model_25, one_clip_cache_25, tmp_path):
    import make_random_cosmos

    lora_on_projection = ["--lora_target_modules", "attn2.to_q", "crossattn_proj.0"]
    with pytest.raises(ValueError, match="crossattn_proj trains in this run"):
        train.main(
            train_args(tiny_model_25, one_clip_cache_25, tmp_path / "a", "--max_train_steps", 1, *lora_on_projection)
        )
    other = str(tmp_path / "other")  # same shapes, other random weights
    make_random_cosmos.main(
        make_random_cosmos.parse_args(["--family", "predict2.5", "--output_dir", other, "--seed", "1"])
    )
    with pytest.raises(ValueError, match="projected with another crossattn_proj"):
        train.main(train_args(other, one_clip_cache_25, tmp_path / "b", "--max_train_steps", 1))


def test_a_cache_of_another_family_is_refused_before_any_model_loads(
    tiny_model, tiny_model_25, one_clip_cache_25, tmp_path
):
    with pytest.raises(ValueError, match="was made with a predict2.5 model"):
        train.main(train_args(tiny_model, one_clip_cache_25, tmp_path / "run", "--max_train_steps", 1))
    clip = list_cached_clips(one_clip_cache_25)[0].path
    with pytest.raises(ValueError, match="cached with a predict2.5 model"):
        sample.collect_jobs(sample_args(tiny_model, tmp_path, "--input", clip), detect_family(tiny_model))


def test_lora_file_loads_with_the_pipelines_load_lora_weights(tiny_model, tiny_model_25, overfit_run_25, tmp_path):
    with pytest.raises(ValueError, match="was trained on a predict2.5 model, the model is predict2"):
        sample.main(sample_args(tiny_model, tmp_path, "--input", "unused.png", "--lora_path", overfit_run_25))
    pipe = pipeline(tiny_model_25)
    base = pipeline_latents(pipe, 3, 0, guidance_scale=1.0)
    pipe.load_lora_weights(overfit_run_25, weight_name=LORA_WEIGHTS)
    tuned = pipeline_latents(pipe, 3, 0, guidance_scale=1.0)
    assert (tuned - base).abs().mean() > 0.05
