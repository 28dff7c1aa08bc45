"""Dataset layouts, clip buckets and the cache's identity and integrity (issues 12 and 13)."""

import csv
import io
import json
import os
import shutil
import tarfile

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

import cache_latents
from conftest import BUCKETS, cache_clips, cache_report, sample_args
from cosmos_cache import list_cached_clips, read_cache_info, verify_cache
from cosmos_families import detect_family
from cosmos_sources import read_captions_file
from cosmos_video import Bucket, nearest_bucket_size, plan_bucket_clips


# ----------------------------------------------------------------------------------------------------------------
# Layouts: every --dataset layout caches the same clips and captions as the folder source
# ----------------------------------------------------------------------------------------------------------------
def remux(src, dst, format_name):
    """The same encoded frames in another container (no re-encode, so decoding gives identical pixels)."""
    with av.open(src) as inp, av.open(dst, "w", format=format_name) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)


def write_parquet(path, columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table(columns), path)


def build_layout(layout, root, videos, keys, captions):
    """Write `keys` of the folder source in one hub layout under root; return the cache_latents source flags."""
    mp4 = {key: os.path.join(videos, key + ".mp4") for key in keys}
    data = {key: open(mp4[key], "rb").read() for key in keys}
    if layout == "webdataset_mkv_txt":
        with tarfile.open(os.path.join(root, "part0.tar"), "w") as tar:
            for key in keys:
                remux(mp4[key], os.path.join(root, key + ".mkv"), "matroska")
                tar.add(os.path.join(root, key + ".mkv"), arcname=key + ".mkv")
                info = tarfile.TarInfo(key + ".txt")
                info.size = len(captions[key].encode())
                tar.addfile(info, io.BytesIO(captions[key].encode()))
        return ["--tars", os.path.join(root, "*.tar")]
    if layout in ("videofolder_jsonl", "videofolder_csv"):
        for key in keys:
            shutil.copy(mp4[key], os.path.join(root, key + ".mp4"))
        if layout == "videofolder_jsonl":
            with open(os.path.join(root, "metadata.jsonl"), "w") as f:
                f.writelines(json.dumps({"file_name": key + ".mp4", "text": captions[key]}) + "\n" for key in keys)
        else:
            with open(os.path.join(root, "metadata.csv"), "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["file_name", "caption"])
                writer.writerows([key + ".mp4", captions[key]] for key in keys)
        return ["--dataset", root]
    if layout == "parquet_dict":
        videos_column = [{"bytes": data[key], "path": key + ".mp4"} for key in keys]
        write_parquet(
            os.path.join(root, "data", "train-0.parquet"),
            {"video": videos_column, "caption": [captions[k] for k in keys]},
        )
    elif layout == "parquet_bytes":
        write_parquet(
            os.path.join(root, "data", "train-0.parquet"),
            {"uid": keys, "clip": [data[k] for k in keys], "prompt": [captions[k] for k in keys]},
        )
        return ["--dataset", root, "--video_column", "clip", "--key_column", "uid"]
    elif layout == "parquet_path":
        for key in keys:
            shutil.copy(mp4[key], os.path.join(root, key + ".mp4"))
        write_parquet(
            os.path.join(root, "data", "train-0.parquet"),
            {"video_path": [k + ".mp4" for k in keys], "description": [captions[k] for k in keys]},
        )
    return ["--dataset", root]


@pytest.mark.parametrize(
    "layout",
    ["webdataset_mkv_txt", "videofolder_jsonl", "videofolder_csv", "parquet_dict", "parquet_bytes", "parquet_path"],
)
def test_every_layout_caches_the_folder_sources_clips_and_captions(tiny_model, clips, latent_cache, tmp_path, layout):
    keys = clips["keys"][:2]
    captions = {k: open(os.path.join(clips["videos"], k + ".txt")).read().strip() for k in keys}
    root = tmp_path / "source"
    root.mkdir()
    source = build_layout(layout, str(root), clips["videos"], keys, captions)
    assert cache_clips(tiny_model, tmp_path / "cache", *source, extra=["--max_clips_per_video", "1"]) == 0
    ours = {c.key: c for c in list_cached_clips(str(tmp_path / "cache"))}
    folder = {c.key: c for c in list_cached_clips(latent_cache) if c.clip_index == 0 and c.key in keys}
    # Same keys (so hold-out and reruns agree), same captions, same first clip of each video.
    assert sorted(ours) == sorted(folder) == sorted(keys)
    for key in keys:
        assert ours[key].caption_hash == folder[key].caption_hash
        with safe_open(ours[key].path, "pt") as a, safe_open(folder[key].path, "pt") as b:
            torch.testing.assert_close(
                a.get_tensor("latents").float(), b.get_tensor("latents").float(), rtol=1e-2, atol=1e-2
            )


def test_an_unknown_layout_fails_in_one_line_naming_its_columns_before_any_model_loads(tiny_model, tmp_path):
    write_parquet(str(tmp_path / "data" / "train-0.parquet"), {"frame_count": [3, 4], "label": ["a", "b"]})
    args = cache_latents.parse_args(
        [
            "--pretrained_model_name_or_path",
            tiny_model,
            "--output_dir",
            str(tmp_path / "out"),
            "--dataset",
            str(tmp_path),
        ]
    )
    with pytest.raises(
        ValueError, match="no column holds a video .columns found: frame_count, label.; name it with --video_column"
    ):
        cache_latents.main(args)
    args.video_column = "frames"
    with pytest.raises(ValueError, match="--video_column frames is not in .*columns found: frame_count, label"):
        cache_latents.main(args)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Sources that are empty or do not match
# ----------------------------------------------------------------------------------------------------------------
def test_an_empty_video_dir_and_unmatched_captions_fail_before_any_model_loads(tiny_model, clips, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    argv = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match="holds no video file"):
        cache_latents.main(cache_latents.parse_args([*argv, "--video_dir", str(tmp_path / "empty")]))
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"key": k, "caption": "c"}) + "\n" for k in ["videos/x", "y"]))
    args = cache_latents.parse_args([*argv, "--video_dir", clips["videos"], "--captions_file", str(captions)])
    with pytest.raises(ValueError, match="none of its 2 keys .e.g. 'videos/x'. matches a video key"):
        cache_latents.main(args)
    captions.write_text(captions.read_text() + json.dumps({"key": clips["keys"][0], "caption": "c"}) + "\n")
    cache_latents.check_captions(args, read_captions_file(str(captions), "caption"))
    assert "--captions_file: 1 of its 3 keys match one of the 6 videos" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# The cache's identity and integrity
# ----------------------------------------------------------------------------------------------------------------
def test_recaching_with_another_clip_plan_is_refused(tiny_model, clips, latent_cache):
    for flag, value, message in [
        ("--clip_stride_seconds", "2", "clip_stride_seconds=1.0, this run asks for 2.0"),
        ("--max_clips_per_video", "1", "max_clips_per_video=None, this run asks for 1"),
    ]:
        with pytest.raises(ValueError, match=f"{message}: two clip plans cannot share one cache"):
            cache_clips(
                tiny_model,
                latent_cache,
                "--video_dir",
                clips["videos"],
                extra=["--clip_stride_seconds", "1", flag, value],
            )
    info = read_cache_info(latent_cache)
    assert info["clip_plan"] == {
        "fps": 8.0,
        "clip_stride_seconds": 1.0,
        "max_clips_per_video": None,
        "resize_mode": "crop",
        "buckets": ["17x64x112"],
    }
    assert info["format_version"] == 3 and info["clips_per_bucket"] == {"17x64x112": 12}


def test_verify_reports_a_listed_clip_file_that_is_missing(latent_cache, tmp_path):
    copy = shutil.copytree(latent_cache, tmp_path / "cache")
    gone = sorted((copy / "shard_00000").glob("*.safetensors"))[3]
    gone.unlink()
    stats, problems = verify_cache(str(copy))
    assert problems == [f"{gone}: listed in the shard manifest but missing"]
    assert stats["clips"] == 11 and stats["clips_per_bucket"] == {"17x64x112": 11}


# ----------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------
def test_nearest_aspect_ratio_picks_the_bucket_size():
    buckets = [
        Bucket(61, 256, 448),
        Bucket(61, 448, 256),
        Bucket(61, 320, 320),
        Bucket(93, 256, 448),
        Bucket(61, 512, 896),
    ]
    assert nearest_bucket_size(buckets, 256, 456) == (256, 448)  # 1.78 -> 1.75; 512x896 would upscale
    assert nearest_bucket_size(buckets, 720, 1280) == (512, 896)  # equal ratios: the largest the source covers
    assert nearest_bucket_size(buckets, 1920, 1080) == (448, 256)  # portrait phone video
    assert nearest_bucket_size(buckets, 480, 640) == (256, 448)  # 4:3 is nearer 1.75 (log 0.27) than 1:1 (0.29)
    assert nearest_bucket_size(buckets, 500, 520) == (320, 320)
    assert nearest_bucket_size(buckets, 100, 100) == (320, 320)  # smaller than every bucket: the nearest ratio


def test_clips_take_the_longest_frame_count_that_fits_so_the_tail_is_kept():
    long, short = Bucket(17, 64, 112), Bucket(9, 64, 112)
    # 4 s at 30 fps, clips at 8 fps: 17 frames span 2 s, 9 frames 1 s.
    plan = plan_bucket_clips([short, long], 120, 30.0, 8.0)
    assert [(b.name, idx[0], idx[-1]) for b, idx in plan] == [("17x64x112", 0, 60), ("9x64x112", 64, 94)]


def test_a_mixed_shape_folder_caches_into_its_buckets_and_reports_what_fits_none(bucket_cache):
    info = read_cache_info(bucket_cache)
    assert info["buckets"] == BUCKETS
    assert info["clips_per_bucket"] == {"17x64x112": 2, "9x64x112": 2, "17x112x64": 2}
    assert info["latent_shape"] is None and info["bucket_latent_shapes"]["17x112x64"] == [16, 5, 14, 8]
    shapes = {(c.key, c.clip_index): c.shape for c in list_cached_clips(bucket_cache)}
    assert shapes[("portrait_1", 0)] == (16, 5, 14, 8)
    assert shapes[("land_" + "factory001_worker001_00000", 0)] == (16, 5, 8, 14)
    assert shapes[("land_" + "factory001_worker001_00000", 1)] == (16, 3, 8, 14)  # the tail
    failures = {f["key"]: f["reason"] for f in cache_report(bucket_cache)["failures"]}
    assert set(failures) == {"short"}
    assert failures["short"] == (
        "too short for every bucket of its aspect ratio: 0.50 s, the shortest clip "
        "(9x64x112) needs 1.00 s; source 456x256"
    )
    stats, problems = verify_cache(bucket_cache)
    assert not problems and stats["clips_per_bucket"] == info["clips_per_bucket"]


def test_verify_checks_each_clip_against_its_own_bucket(bucket_cache, tmp_path):
    from safetensors.torch import save_file

    copy = shutil.copytree(bucket_cache, tmp_path / "cache")
    clip = next(c for c in list_cached_clips(str(copy)) if c.key == "portrait_1")
    with safe_open(clip.path, "pt") as f:
        meta = f.metadata()
    save_file({"latents": torch.zeros(16, 5, 8, 14, dtype=torch.bfloat16)}, clip.path, metadata=meta)
    _, problems = verify_cache(str(copy))
    assert len(problems) == 2 and "expected bfloat16 [16, 5, 14, 8]" in problems[0]
    assert "manifest shape [16, 5, 14, 8] differs" in problems[1]


def test_an_audio_only_file_is_skipped_with_its_reason(tiny_model, clips, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(os.path.join(clips["videos"], clips["keys"][0] + ".mp4"), videos / "good.mp4")
    with av.open(str(videos / "audio_only.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for _ in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert (
        cache_clips(tiny_model, tmp_path / "cache", "--video_dir", str(videos), extra=["--max_clips_per_video", "1"])
        == 0
    )
    assert cache_report(tmp_path / "cache")["failures"] == [
        {"key": "audio_only", "reason": "ValueError: no video stream"}
    ]


# ----------------------------------------------------------------------------------------------------------------
# Sampling at buckets
# ----------------------------------------------------------------------------------------------------------------
# Sampling at a bucket's size instead of the tests' fixed one.
BUCKET_SAMPLING = ["--disable_safety_checker", "--fps", "8"]


def test_bucket_auto_generates_each_input_at_its_nearest_bucket(tiny_model, bucket_videos, tmp_path):
    from PIL import Image

    import sample

    image = tmp_path / "landscape.png"
    Image.fromarray(np.zeros((256, 456, 3), np.uint8)).save(image)
    inputs = [os.path.join(bucket_videos, "portrait_1.mp4"), os.path.join(bucket_videos, "short.mp4"), str(image)]
    args = sample_args(
        tiny_model, tmp_path, "--input", *inputs, "--bucket", "auto", "--buckets", *BUCKETS, fixed=BUCKET_SAMPLING
    )
    sample.validate_args(args)
    jobs = sample.collect_jobs(args, detect_family(args.pretrained_model_name_or_path))
    assert [job.shape for job in jobs] == [(17, 112, 64), (17, 64, 112), (17, 64, 112)]
    assert jobs[0].truth_frames.shape == (17, 112, 64, 3)  # the portrait video holds a whole clip: ground truth
    # 0.5 s holds no whole clip: its 4 frames at 8 fps are the ground truth as far as it goes
    assert jobs[1].truth_frames.shape == (4, 64, 112, 3) and jobs[1].cond_frames.shape == (1, 64, 112, 3)
    with pytest.raises(ValueError, match="--bucket auto needs a bucket list"):
        sample.validate_args(
            sample_args("unused", tmp_path, "--input", str(image), "--bucket", "auto", fixed=BUCKET_SAMPLING)
        )


def test_sampling_from_a_multi_bucket_cache_batches_each_shape(tiny_model, bucket_cache, tmp_path):
    import sample

    args = sample_args(
        tiny_model,
        tmp_path,
        "--from_cache",
        bucket_cache,
        "--num_videos",
        3,
        "--batch_size",
        2,
        "--num_inference_steps",
        2,
        "--guidance_scale",
        1,
        fixed=BUCKET_SAMPLING,
    )
    summary = sample.main(args)
    shapes = {r["name"]: sample.read_mp4(str(tmp_path / r["video"])).shape[:3] for r in summary["videos"]}
    # The three held-out clips cover the three buckets (hold_out_clips prefers videos of new shapes).
    assert sorted(shapes.values()) == [(9, 64, 112), (17, 64, 112), (17, 112, 64)]
    assert all("psnr" in r for r in summary["videos"])
