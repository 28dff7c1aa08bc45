"""Captions for every clip (issue 26): caption_clips.py with the tiny Predict2.5 text encoder as the captioner (a real
Qwen2_5_VLForConditionalGeneration with a vision tower, random weights), and cache_latents.py reading its rows."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import caption_clips
from conftest import REPO, cache_clips, error_line, run_script
from cosmos_cache import caption_hash, list_cached_clips, load_text_embeds, read_clip, text_embed_path
from cosmos_data import Cache, CachedClips, caption_summary
from cosmos_sources import plan_video, read_caption_rows
from cosmos_video import open_video

# The tests' clip plan (CLIP_ARGS' shape, a clip every second) and a short caption cap.
PLAN = ["--num_frames", "17", "--height", "64", "--width", "112", "--clip_stride_seconds", "1"]
FAST = ["--max_new_tokens", "6", "--num_workers", "0", "--batch_size", "2"]


def caption_argv(model, videos, output_dir, *extra):
    return ["--caption_model", model, "--video_dir", videos, "--output_dir", str(output_dir), *PLAN, *FAST, *extra]


def caption(model, videos, output_dir, *extra):
    """caption_clips.py's main() in this process; returns its exit code."""
    return caption_clips.main(caption_clips.parse_args(caption_argv(model, videos, output_dir, *extra)))


def rows(output_dir):
    """{(key, clip_index): row} of every shard of a captions folder."""
    found = {}
    for shard in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, shard, "captions.jsonl")
        if shard.startswith("shard_") and os.path.isfile(path):
            for row in read_caption_rows(path):
                assert (row["key"], row["clip_index"]) not in found, "a clip captioned twice"
                found[(row["key"], row["clip_index"])] = row
    return found


def report(output_dir, shard=0):
    with open(os.path.join(output_dir, f"shard_{shard:05d}", "report.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def videos(clips, tmp_path_factory):
    """Three synthetic videos (two clips each at a 1 s stride), a file that is no video, and a 0.5 s one."""
    import make_synthetic_clips

    folder = tmp_path_factory.mktemp("caption_videos")
    for key in clips["keys"][:3]:
        shutil.copy(os.path.join(clips["videos"], key + ".mp4"), folder)
    (folder / "corrupt.mp4").write_bytes(b"not a video")
    short = make_synthetic_clips.render_video(seed=3, num_frames=15, height=256, width=456)
    (folder / "short.mp4").write_bytes(make_synthetic_clips.encode_mp4(short, 30.0, "h264"))
    return str(folder)


@pytest.fixture(scope="module")
def captioner(tiny_model_25, tmp_path_factory):
    """The tiny Predict2.5 checkpoint with its text encoder's weights redrawn larger (the vision tower's most), so that
    its gibberish captions differ with the frames: a mix-up of clips then shows as a changed caption."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    path = str(tmp_path_factory.mktemp("captioner") / "tiny-cosmos25")
    shutil.copytree(tiny_model_25, path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(os.path.join(path, "text_encoder"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim >= 2:
                scale = (30.0 if "visual" in name else 3.0) / weight.shape[-1] ** 0.5
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale)
    model.save_pretrained(os.path.join(path, "text_encoder"))
    return path


@pytest.fixture(scope="module")
def captioned(captioner, videos, tmp_path_factory):
    """caption_clips.py run as a user runs it (a subprocess, its defaults but for the tiny clip plan)."""
    out = tmp_path_factory.mktemp("captions")
    argv = ["--caption_model", captioner, "--video_dir", videos, "--output_dir", out, *PLAN]  # decode workers: 2
    result = run_script("caption_clips.py", *argv, "--max_new_tokens", "6", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return str(out)


def test_one_row_per_planned_clip_and_none_for_skipped_videos(captioned, videos, captioner):
    args = caption_clips.parse_args(caption_argv(captioner, videos, "unused"))
    planned = {}
    for name in sorted(os.listdir(videos)):
        key = os.path.splitext(name)[0]
        try:
            with open_video(os.path.join(videos, name)) as container:
                planned.update({(key, c.index): c for c in plan_video(container, args).clips})
        except Exception:  # the corrupt file: no clip
            pass
    found = rows(captioned)
    assert set(found) == set(planned) and len(found) == 6
    for (key, index), row in found.items():
        assert row["start_seconds"] == pytest.approx(planned[(key, index)].start_seconds, abs=1e-4)
        assert row["num_frames"] == 17 and row["caption_model"] == captioner and row["caption"]
        assert row["instruction_sha"] == caption_hash(caption_clips.DEFAULT_INSTRUCTION)
    assert len({row["caption"] for row in found.values()}) >= 4  # the captions follow the frames
    skipped = {f["key"]: f["reason"] for f in report(captioned)["failures"]}
    assert set(skipped) == {"corrupt", "short"} and "too short for every bucket" in skipped["short"]
    assert not [p for p in os.listdir(os.path.join(captioned, "shard_00000")) if p.startswith("part_")]


def test_greedy_captions_repeat_across_runs_and_shards(captioned, captioner, videos, tmp_path):
    reference = {k: r["caption"] for k, r in rows(captioned).items()}
    assert caption(captioner, videos, tmp_path / "again") == 0
    for shard in (0, 1):
        assert caption(captioner, videos, tmp_path / "two", "--num_shards", 2, "--shard_index", shard) == 0
    assert {k: r["caption"] for k, r in rows(tmp_path / "again").items()} == reference
    assert {k: r["caption"] for k, r in rows(tmp_path / "two").items()} == reference
    assert report(tmp_path / "two", 0)["captioned"] and report(tmp_path / "two", 1)["captioned"]


def test_resume_after_sigkill_loses_nothing_and_repeats_nothing(captioned, captioner, videos, tmp_path):
    out = tmp_path / "killed"
    argv = caption_argv(captioner, videos, out, "--batch_size", "1")
    process = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "caption_clips.py"), *map(str, argv)],
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first_part = out / "shard_00000" / "part_000000.jsonl"
    deadline = time.time() + 120
    while not first_part.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(caption_clips.shard_rows(str(out / "shard_00000")))
    assert 1 <= done < 6, "the kill came before the first batch was written, or after the last"
    assert caption(captioner, videos, out) == 0
    assert report(out)["already_captioned"] == done and report(out)["captioned"] == 6 - done
    assert rows(out) == rows(captioned)  # the same clips and captions, each once (rows() refuses a duplicate)


def test_a_batch_out_of_gpu_memory_is_captioned_in_halves(captioned, captioner, videos, tmp_path, monkeypatch, capsys):
    generate, sizes = caption_clips.Captioner.generate, []

    def generate_within_memory(self, clips):  # as if 3 or more clips did not fit on the GPU
        sizes.append(len(clips))
        if len(clips) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return generate(self, clips)

    monkeypatch.setattr(caption_clips.Captioner, "generate", generate_within_memory)
    assert caption(captioner, videos, tmp_path / "halves", "--batch_size", "4") == 0
    assert sizes[0] == 4 and set(sizes[1:]) == {2}  # the failed 4, then halves, and later batches of 2
    assert "4 clips at once ran out of GPU memory; captioning 2 at a time from now on" in capsys.readouterr().out
    assert {k: r["caption"] for k, r in rows(tmp_path / "halves").items()} == {
        k: r["caption"] for k, r in rows(captioned).items()
    }


def test_a_rerun_with_another_instruction_or_plan_is_refused_in_one_line(captioned, captioner, videos):
    base = ["--caption_model", captioner, "--video_dir", videos, "--output_dir", captioned, *PLAN]
    line = error_line(run_script("caption_clips.py", *base, "--caption_prompt", "Say hi.", timeout=120))
    assert "instruction_sha=" in line and "use a new --output_dir" in line
    with pytest.raises(ValueError, match="clip_plan_sha=.*use a new --output_dir"):
        caption_clips.validate_args(caption_clips.parse_args([*base, "--max_clips_per_video", "1"]))
    # The default captioner, offline and not downloaded: one line saying what to run.
    argv = ["--video_dir", videos, "--output_dir", captioned + "_new"]
    line = error_line(run_script("caption_clips.py", *argv, env={"HF_HOME": captioned + "_hf"}, timeout=120))
    assert "nvidia/Cosmos-Reason1-7B is a hub id, HF_HUB_OFFLINE is set" in line and "hf download" in line


def test_a_checkpoint_without_a_vision_tower_is_refused(tiny_model_25, videos, tmp_path):
    """A Qwen2.5-VL folder, and a Predict2.5 checkpoint whose text_encoder was saved text-only."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_model_25, checkpoint)
    weights_file = checkpoint / "text_encoder" / "model.safetensors"
    weights = load_file(weights_file)
    save_file({k: v for k, v in weights.items() if ".visual." not in f".{k}"}, weights_file)
    for model in (checkpoint / "text_encoder", checkpoint):
        with pytest.raises(ValueError, match="checkpoint/text_encoder holds no vision tower"):
            caption(str(model), videos, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_the_captioner_sees_the_clip_window_at_caption_fps_within_the_pixel_budget(tiny_model_25):
    assert caption_clips.caption_frame_positions(61, 8.0, 2.0) == list(range(0, 61, 4))  # 16 frames over 7.5 s
    assert caption_clips.caption_frame_positions(17, 8.0, 3.0) == [0, 3, 5, 8, 11, 13, 16]
    assert caption_clips.captioner_size(256, 448, 448 * 448, 28) == (252, 448)
    assert caption_clips.captioner_size(480, 832, 448 * 448, 28) == (336, 588)  # 197,568 of 200,704 pixels
    source = caption_clips.captioner_source(tiny_model_25, None)
    caption_inputs = caption_clips.CaptionInputs(caption_clips.load_processor(source), "Describe.", caption_fps=4.0)
    inputs = caption_inputs(torch.zeros(6, 3, 56, 84, dtype=torch.uint8))
    assert inputs["video_grid_thw"].tolist() == [[3, 4, 6]]  # 2-frame temporal patches of 14-pixel patches
    assert inputs["second_per_grid_ts"].tolist() == [0.5]  # a temporal patch spans 2 frames at 4 fps


def test_clips_prepared_one_by_one_batch_as_the_processor_batches_them(tiny_model_25):
    """The workers prepare each clip alone; their batch equals the processor's own, padding on the left included."""
    processor = caption_clips.load_processor(caption_clips.captioner_source(tiny_model_25, None))
    caption_inputs = caption_clips.CaptionInputs(processor, "Describe.", caption_fps=2.0)
    processor.tokenizer.padding_side = "left"  # the processor's own batch, padded as generation needs it
    generator = torch.Generator().manual_seed(0)
    clips = [torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8) for shape in
             [(4, 3, 56, 84), (6, 3, 28, 56), (4, 3, 56, 84)]]  # fmt: skip
    batch = caption_clips.batch_inputs([caption_inputs(c) for c in clips], processor.tokenizer.pad_token_id)
    expected = processor(
        text=[caption_inputs.prompt] * 3,
        videos=clips,
        padding=True,
        return_tensors="pt",
        do_resize=False,
        do_sample_frames=False,
        video_metadata=[{"total_num_frames": len(c), "fps": 2.0} for c in clips],
    )
    assert set(batch) == set(expected) and batch["input_ids"].shape[1] > caption_inputs(clips[1])["input_ids"].shape[1]
    for name, value in expected.items():
        assert torch.equal(batch[name], value), name


def test_one_call_window_attention_equals_the_per_window_attention(tiny_model_25, monkeypatch):
    """The vision tower's windows in one varlen call: the glue (window bounds, layouts) checked on the CPU against
    transformers' per-window SDPA, with a per-window stand-in for the CUDA-only kernel; the kernel itself against SDPA
    on the GPU in benchmarks/bench_caption.py."""
    import torch.nn.functional as F

    windows = []

    def per_window_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale):
        assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        bounds = cu_q.tolist()
        windows.append(len(bounds) - 1)
        heads = [t.transpose(0, 1) for t in (q, k, v)]  # [heads, tokens, dim]
        spans = zip(bounds[:-1], bounds[1:], strict=True)
        out = [F.scaled_dot_product_attention(*(t[:, a:b] for t in heads), scale=scale) for a, b in spans]
        return torch.cat(out, dim=1).transpose(0, 1)

    source = caption_clips.captioner_source(tiny_model_25, None)
    model = caption_clips.load_captioner(source, torch.float32, torch.device("cpu"))
    processor = caption_clips.load_processor(source)
    clip = caption_clips.CaptionInputs(processor, "Describe.", caption_fps=2.0)(
        torch.randint(0, 256, (4, 3, 112, 168), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    )
    visual = model.model.visual
    expected = visual(clip["pixel_values_videos"], grid_thw=clip["video_grid_thw"])
    monkeypatch.setattr(caption_clips, "varlen_attn", per_window_varlen)
    caption_clips.use_one_call_window_attention(model)
    got = visual(clip["pixel_values_videos"], grid_thw=clip["video_grid_thw"])
    assert windows and max(windows) > 1  # every layer went through one call, over several windows
    assert len(windows) == len(visual.blocks)
    expected, got = (getattr(x, "pooler_output", x) for x in (expected, got))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# cache_latents.py --captions_file with per-clip rows
# ----------------------------------------------------------------------------------------------------------------
def test_a_cache_of_per_clip_captions_holds_one_embedding_per_caption_and_trains_on_each(
    captioned, tiny_model_25, videos, tmp_path, capsys
):
    expected = {key: row["caption"] for key, row in rows(captioned).items()}
    cache = tmp_path / "cache"
    extra = ["--clip_stride_seconds", "1", "--captions_file", captioned]
    assert cache_clips(tiny_model_25, cache, "--video_dir", videos, extra=extra) == 0
    assert "6 of the 6 clips written got their own caption" in capsys.readouterr().out
    clips = list_cached_clips(str(cache))
    assert len(clips) == 6
    distinct = len(set(expected.values()))
    assert len(os.listdir(cache / "text_embeds")) == distinct  # one embedding per distinct caption, no --prompt
    dataset = CachedClips(clips)
    for index, clip in enumerate(clips):  # each clip, found by its key, trains on its own caption's embedding
        caption = expected[(clip.key, clip.clip_index)]
        assert clip.caption_hash == caption_hash(caption) and read_clip(clip.path)[1]["caption"] == caption
        embeds = load_text_embeds(text_embed_path(str(cache), caption_hash(caption))).float()
        assert torch.equal(dataset[index]["prompt_embeds"], embeds)
    summary = caption_summary([Cache("c", str(cache), clips, 1.0)])
    assert summary == f"training on 6 clips with {distinct} distinct captions"


def test_per_clip_captions_of_another_plan_or_with_a_clip_missing_are_refused(
    captioned, tiny_model_25, videos, tmp_path
):
    folder = str(tmp_path / "captions")
    shutil.copytree(captioned, folder)
    path = os.path.join(folder, "shard_00000", "captions.jsonl")
    # Another clip plan (clips every 2 s): refused before any model loads.
    with pytest.raises(ValueError, match="holds clip captions of another clip plan"):
        cache_clips(tiny_model_25, tmp_path / "a", "--video_dir", videos, extra=["--captions_file", folder])
    # One clip's row removed: an error naming it, unless --missing_caption prompt.
    kept = read_caption_rows(path)
    gone = kept.pop(3)
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    plan = ["--clip_stride_seconds", "1", "--captions_file", folder]
    with pytest.raises(ValueError, match=f"no caption for the clip of {gone['key']} at {gone['start_seconds']}"):
        cache_clips(tiny_model_25, tmp_path / "b", "--video_dir", videos, extra=plan)
    extra = [*plan, "--missing_caption", "prompt", "--prompt", "a fallback"]
    assert cache_clips(tiny_model_25, tmp_path / "c", "--video_dir", videos, extra=extra) == 0
    by_clip = {(c.key, c.clip_index): c.caption_hash for c in list_cached_clips(str(tmp_path / "c"))}
    assert by_clip[(gone["key"], gone["clip_index"])] == caption_hash("a fallback")
    assert sorted(by_clip.values()).count(caption_hash("a fallback")) == 1
