import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
import torch
from safetensors import safe_open

import cache_latents
import cosmos_vae
from conftest import CLIP_ARGS, REPO, cache_clips, cache_report, run_script, text_embed_files
from cosmos_cache import list_cached_clips, read_cache_info, read_manifest
from cosmos_vae import normalize_latents
from cosmos_video import Bucket, fit_frames, plan_bucket_clips


def cached_ids(output_dir):
    return sorted((c.key, c.clip_index) for c in list_cached_clips(str(output_dir)))


def latents_beside(output_dir, reference):
    """(latents, reference latents) for each clip of output_dir, the reference read from the same clip file name."""
    pairs = []
    for clip in list_cached_clips(str(output_dir)):
        with safe_open(clip.path, "pt") as a, safe_open(str(reference / "shard_00000" / clip.file), "pt") as b:
            pairs.append((a.get_tensor("latents").float(), b.get_tensor("latents").float()))
    assert pairs
    return pairs


def some_videos(clips, tmp_path, count):
    """A folder with the first count of the synthetic videos and their captions."""
    folder = tmp_path / "some_videos"
    folder.mkdir()
    for key in clips["keys"][:count]:
        for name in os.listdir(clips["videos"]):
            if name.startswith(key + "."):
                shutil.copy(os.path.join(clips["videos"], name), folder)
    return folder


@pytest.fixture(scope="module")
def folder_cache(latent_cache):
    return Path(latent_cache)


def test_folder_cache_is_complete_and_verifies(folder_cache, clips):
    ok = cache_latents.print_verify(str(folder_cache))
    assert ok
    info = read_cache_info(str(folder_cache))
    # 4 s videos (120 frames), 17 frames at 8 fps span 2 s: starts at 0 and 1 s fit, 2 s would need frame 120.
    assert cached_ids(folder_cache) == sorted((k, c) for k in clips["keys"] for c in range(2))
    assert info["num_clips"] == 12 and info["latent_shape"] == [16, 5, 8, 14]
    # Each video has its own sidecar caption, stored once as a T5 embedding.
    hashes = {c.caption_hash for c in list_cached_clips(str(folder_cache))}
    assert len(hashes) == 6
    assert len(text_embed_files(str(folder_cache))) == 6


def test_tar_shards_and_hub_style_dataset_give_the_same_clips(tiny_model, clips, folder_cache, tmp_path):
    tar_glob = os.path.join(clips["tars"], "factory*", "**", "*.tar")
    assert cache_clips(tiny_model, tmp_path / "tars", "--tars", tar_glob, extra=["--clip_stride_seconds", "1"]) == 0
    # --dataset goes through datasets.load_dataset exactly as a hub id does; here the "hub" is a local folder.
    assert (
        cache_clips(
            tiny_model,
            tmp_path / "hub",
            "--dataset",
            clips["tars"],
            "--data_files",
            "factory*/**/*.tar",
            extra=["--clip_stride_seconds", "1"],
        )
        == 0
    )
    assert cached_ids(tmp_path / "tars") == cached_ids(folder_cache) == cached_ids(tmp_path / "hub")
    # Captions come from the json member of each tar, so they match the folder's .txt sidecars.
    folder_captions = {c.key: c.caption_hash for c in list_cached_clips(str(folder_cache))}
    assert {c.key: c.caption_hash for c in list_cached_clips(str(tmp_path / "tars"))} == folder_captions
    # Same decoded frames, same VAE: the latents agree whichever source they came from.
    for source in ("tars", "hub"):
        for latents, reference in latents_beside(tmp_path / source, folder_cache):
            assert torch.equal(latents, reference), source


def test_cached_latent_equals_direct_vae_encode(tiny_model, clips, folder_cache):
    from diffusers import AutoencoderKLWan

    clip = next(c for c in list_cached_clips(str(folder_cache)) if c.clip_index == 1)
    with av.open(os.path.join(clips["videos"], clip.key + ".mp4")) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    # Clip 1 starts at 1 s; frame j is source frame round((1 + j / 8) * 30).
    picked = torch.stack([torch.from_numpy(frames[round((1 + j / 8) * 30)]) for j in range(17)])
    x = fit_frames(picked, 64, 112).permute(3, 0, 1, 2).float() / 255 * 2 - 1
    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae")
    with torch.no_grad():
        expected = normalize_latents(vae.encode(x[None]).latent_dist.mean, vae.config)[0]
    with safe_open(clip.path, "pt") as f:
        stored = f.get_tensor("latents")
    assert stored.dtype == torch.bfloat16
    # Equal up to bfloat16 storage (2^-8 relative) and batch-size-dependent float rounding.
    torch.testing.assert_close(stored.float(), expected, rtol=8e-3, atol=2e-3)


def test_rerun_does_nothing(tiny_model, clips, folder_cache, tmp_path):
    copy = shutil.copytree(folder_cache, tmp_path / "cache", copy_function=shutil.copy2)  # the fixture stays as made
    files = sorted((copy / "shard_00000").glob("*.safetensors"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    assert cache_clips(tiny_model, copy, "--video_dir", clips["videos"], extra=["--clip_stride_seconds", "1"]) == 0
    rerun = cache_report(copy)
    assert (rerun["written"], rerun["already_cached"], rerun["failures"]) == (0, 12, [])
    assert [f.stat().st_mtime_ns for f in files] == mtimes


def test_killed_run_is_completed_by_a_rerun(tiny_model, clips, folder_cache, tmp_path):
    """SIGKILL a real caching process part-way (no cleanup runs); a rerun writes only what is missing."""
    out = tmp_path / "killed"
    argv = [
        "--pretrained_model_name_or_path",
        tiny_model,
        "--output_dir",
        str(out),
        "--video_dir",
        clips["videos"],
        "--clip_stride_seconds",
        "1",
        "--max_clips_per_video",
        "1",
        "--batch_size",
        "1",
        *CLIP_ARGS,
    ]
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "cache_latents.py"), *argv],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    shard = out / "shard_00000"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shard.glob("*.safetensors"))) < 2 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = len(list(shard.glob("*.safetensors")))
    assert 2 <= written < 6, "the run should be killed part-way"
    assert cache_latents.main(cache_latents.parse_args([*argv, "--verify"])) == 0
    assert not list(out.rglob("*.tmp"))
    assert cached_ids(out) == [(k, 0) for k in sorted(clips["keys"])]
    assert cache_report(out)["written"] == 6 - written
    # Whichever run wrote a clip, it holds the clip's latents (up to batch-size-dependent rounding).
    for latents, reference in latents_beside(out, folder_cache):
        torch.testing.assert_close(latents, reference, rtol=8e-3, atol=2e-3)


def test_corrupt_and_short_videos_are_skipped_and_reported(tiny_model, clips, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    good = clips["keys"][0]
    shutil.copy(os.path.join(clips["videos"], good + ".mp4"), videos / "good.mp4")
    (videos / "garbage.mp4").write_bytes(b"this is not a video" * 100)
    data = open(os.path.join(clips["videos"], clips["keys"][1] + ".mp4"), "rb").read()
    (videos / "truncated.mp4").write_bytes(data[: len(data) // 3])
    import make_synthetic_clips

    short = make_synthetic_clips.render_video(seed=1, num_frames=15, height=256, width=456)  # 0.5 s
    (videos / "short.mp4").write_bytes(make_synthetic_clips.encode_mp4(short, 30.0, "h264"))

    assert (
        cache_clips(tiny_model, tmp_path / "cache", "--video_dir", str(videos), extra=["--clip_stride_seconds", "1"])
        == 0
    )
    failures = {f["key"]: f["reason"] for f in cache_report(tmp_path / "cache")["failures"]}
    assert set(failures) == {"garbage", "truncated", "short"}
    assert failures["short"].startswith("too short for every bucket")
    assert {c.key for c in list_cached_clips(str(tmp_path / "cache"))} == {"good"}
    assert cache_latents.print_verify(str(tmp_path / "cache"))


def test_only_bad_videos_exit_non_zero(tiny_model, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "garbage.mp4").write_bytes(b"not a video")
    assert cache_clips(tiny_model, tmp_path / "cache", "--video_dir", str(videos)) == 1


def test_shards_are_disjoint_and_complete(tiny_model, clips, folder_cache, tmp_path):
    for index in (0, 1):
        assert (
            cache_clips(
                tiny_model,
                tmp_path,
                "--video_dir",
                clips["videos"],
                extra=["--clip_stride_seconds", "1", "--num_shards", "2", "--shard_index", str(index)],
            )
            == 0
        )
    shards = [
        {(row["key"], row["clip_index"]) for row in read_manifest(str(tmp_path / f"shard_{i:05d}"))} for i in (0, 1)
    ]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    assert sorted(shards[0] | shards[1]) == cached_ids(folder_cache)
    assert read_cache_info(str(tmp_path))["num_clips"] == 12


def test_shard_index_defaults_from_slurm_array(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    args = cache_latents.parse_args(["--output_dir", "x", "--video_dir", "y"])
    assert (args.num_shards, args.shard_index) == (4, 2)


def test_dataloader_workers_give_the_same_cache(tiny_model, clips, folder_cache, tmp_path):
    assert (
        cache_clips(
            tiny_model,
            tmp_path,
            "--video_dir",
            clips["videos"],
            extra=["--clip_stride_seconds", "1", "--num_workers", "2"],
        )
        == 0
    )
    assert cached_ids(tmp_path) == cached_ids(folder_cache)
    for latents, reference in latents_beside(tmp_path, folder_cache):
        assert torch.equal(latents, reference)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--num_frames", "64", "--num_frames 64 is not 4k+1 as the Wan VAE needs; nearest valid: 65"),
        ("--num_frames", "62", "nearest valid: 61"),
        ("--width", "456", "--width 456 is not a multiple of 16 (8x VAE x 2x2 patch); nearest valid: 448"),
        ("--height", "250", "nearest valid: 256"),
    ],
)
def test_invalid_clip_geometry_fails_at_once_in_one_line(tmp_path, flag, value, message):
    args = cache_latents.parse_args(
        [
            "--pretrained_model_name_or_path",
            str(tmp_path / "no-model"),
            "--output_dir",
            str(tmp_path / "out"),
            "--video_dir",
            str(tmp_path),
            flag,
            value,
        ]
    )
    with pytest.raises(ValueError) as error:
        cache_latents.main(args)  # the missing model would be reported after the geometry
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_the_script_prints_a_bad_value_as_one_error_line(tmp_path):
    """The one real process: what `python cache_latents.py` prints for a ValueError, and its exit code."""
    result = run_script(
        "cache_latents.py",
        "--pretrained_model_name_or_path",
        tmp_path / "no-model",
        "--output_dir",
        tmp_path / "out",
        "--video_dir",
        tmp_path,
        "--num_frames",
        "64",
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --num_frames 64 is not 4k+1 as the Wan VAE needs; nearest valid: 65"
    assert not (tmp_path / "out").exists()


def test_cache_refuses_a_different_config(tiny_model, clips, folder_cache):
    with pytest.raises(ValueError, match="num_frames=17"):
        cache_clips(tiny_model, folder_cache, "--video_dir", clips["videos"], extra=["--num_frames", "9"])


def test_plan_clips_resamples_and_strides():
    def plan_clips(num_source_frames, source_fps, num_frames, fps, stride_seconds=None, max_clips=None):
        bucket = Bucket(num_frames, 64, 112)
        return [
            i for _, i in plan_bucket_clips([bucket], num_source_frames, source_fps, fps, stride_seconds, max_clips)
        ]

    clips = plan_clips(num_source_frames=120, source_fps=30, num_frames=5, fps=10, stride_seconds=1.5)
    assert clips == [[0, 3, 6, 9, 12], [45, 48, 51, 54, 57], [90, 93, 96, 99, 102]]
    assert plan_clips(120, 30, 5, 10, max_clips=2)[1] == [15, 18, 21, 24, 27]
    assert plan_clips(10, 30, 5, 10) == []


def test_fit_frames_centre_crops_456_to_448_without_resampling():
    frames = torch.randint(0, 255, (2, 256, 456, 3), dtype=torch.uint8)
    assert torch.equal(fit_frames(frames, 256, 448), frames[:, :, 4:452])
    assert fit_frames(frames, 64, 112).shape == (2, 64, 112, 3)
    assert fit_frames(frames, 64, 64, mode="resize").shape == (2, 64, 64, 3)


def test_bfloat16_vae_encoding_stays_within_bf16_tolerance_of_float32(tiny_model, clips, folder_cache, tmp_path):
    # Two videos, one clip each: bfloat16 convolutions are slow on the CPU.
    videos = some_videos(clips, tmp_path, 2)
    extra = ["--clip_stride_seconds", "1", "--max_clips_per_video", "1", "--vae_dtype", "bfloat16"]
    assert cache_clips(tiny_model, tmp_path / "cache", "--video_dir", str(videos), extra=extra) == 0
    assert len(list_cached_clips(str(tmp_path / "cache"))) == 2
    for fast, exact in latents_beside(tmp_path / "cache", folder_cache):
        # Measured: mean difference 0.3% of the mean magnitude, correlation 0.99999.
        assert (fast - exact).abs().mean() < 0.01 * exact.abs().mean()
        assert torch.corrcoef(torch.stack([fast.flatten(), exact.flatten()]))[0, 1] > 0.9999


def test_whole_clip_encode_gives_the_chunked_cache(tiny_model, clips, folder_cache, tmp_path):
    extra = ["--clip_stride_seconds", "1", "--max_clips_per_video", "1", "--vae_encode", "whole", "--batch_size", "4"]
    assert cache_clips(tiny_model, tmp_path, "--video_dir", clips["videos"], extra=extra) == 0
    run = cache_report(tmp_path)
    assert (run["written"], run["vae_encode"], run["compile_vae"]) == (6, "whole", False)
    assert 0 < run["data_wait_share"] < 1 and 0 < run["first_batch_seconds"] < run["seconds"]
    # The rate once started counts the clips after the first batch of 4 over the time after it (both times are
    # rounded to 0.01 s in the report).
    after = run["seconds"] - run["first_batch_seconds"]
    assert (6 - 4) / (after + 0.011) <= run["clips_per_second_after_first_batch"] <= (6 - 4) / max(after - 0.011, 1e-3)
    for whole, chunked in latents_beside(tmp_path, folder_cache):
        # The same computation in float32: at most one bfloat16 rounding step apart, nearly all values identical.
        torch.testing.assert_close(whole, chunked, rtol=2**-7, atol=1e-5)
        assert (whole == chunked).float().mean() > 0.99


def test_compile_vae_needs_the_whole_clip_encode(tmp_path, clips):
    args = cache_latents.parse_args(
        ["--output_dir", str(tmp_path), "--video_dir", clips["videos"], "--vae_encode", "chunked", "--compile_vae"]
    )
    with pytest.raises(ValueError, match="--compile_vae needs --vae_encode whole"):
        cache_latents.validate_args(args)


@torch.no_grad()
@pytest.mark.parametrize("compile_vae", [False, True])
def test_a_batch_larger_than_the_free_gpu_memory_is_encoded_in_the_calls_that_fit(
    tiny_model, monkeypatch, capsys, compile_vae
):
    """The whole-clip encode of 3 clips with memory for 2 per call: two calls, the last one padded when compiled, and
    the same latents as one call of all 3 (float64); with memory for none, the chunked encode."""
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").eval().double()  # float64: exact equality
    x = torch.rand(3, 3, 9, 32, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one_call = cosmos_vae.encode_whole_clip(vae, x)
    encode = cosmos_vae.encode_whole_clip
    for_two = cosmos_vae.MEMORY_MARGIN * cosmos_vae.whole_clip_peak_bytes(vae, encode, (2, *x.shape[1:]))
    monkeypatch.setattr(cosmos_vae, "free_gpu_bytes", lambda device: for_two)
    if compile_vae:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    calls = []

    def counted_encode(vae, x):
        if x.device.type != "meta":  # the memory count runs it on the meta device
            calls.append(len(x))
        return encode(vae, x)

    monkeypatch.setattr(cosmos_vae, "encode_whole_clip", counted_encode)

    encoder = cache_latents.ClipEncoder(vae, "whole", compile_vae=compile_vae, batch_size=3)
    torch.testing.assert_close(encoder(x), one_call, rtol=0, atol=0)
    assert calls == ([2, 2] if compile_vae else [2, 1])
    assert "3 9x32x48 clips in one whole-clip encode do not fit" in capsys.readouterr().out

    monkeypatch.setattr(cosmos_vae, "free_gpu_bytes", lambda device: 0)
    encoder = cache_latents.ClipEncoder(vae, "whole", compile_vae=compile_vae, batch_size=3)
    torch.testing.assert_close(encoder(x), vae.encode(x).latent_dist.mean)
    assert "encoding them chunked (slower)" in capsys.readouterr().out


@torch.no_grad()
def test_unknown_vae_layout_and_out_of_memory_fall_back_to_the_chunked_encode(tiny_model, monkeypatch, capsys):
    from diffusers import AutoencoderKLWan

    wan22_like = AutoencoderKLWan(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1, is_residual=True).eval()
    encode = cache_latents.ClipEncoder(wan22_like, "whole", compile_vae=False, batch_size=2)
    assert encode.mode == "chunked"
    assert "--vae_encode whole: residual down and up blocks" in capsys.readouterr().out
    x = torch.rand(2, 3, 5, 32, 48) * 2 - 1

    def out_of_memory(vae, x):
        raise torch.OutOfMemoryError("CUDA out of memory")

    vae = AutoencoderKLWan.from_pretrained(tiny_model, subfolder="vae").eval()
    monkeypatch.setattr(cache_latents.cosmos_vae, "encode_whole_clip", out_of_memory)
    encode = cache_latents.ClipEncoder(vae, "whole", compile_vae=False, batch_size=2)
    torch.testing.assert_close(encode(x), vae.encode(x).latent_dist.mean)
    assert encode.mode == "chunked" and "ran out of GPU memory" in capsys.readouterr().out
