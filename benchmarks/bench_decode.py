#!/usr/bin/env python
"""CPU side of caching: H.265 456x256 decode speed with PyAV and imageio-ffmpeg, and clips/s per core.

Makes a synthetic H.265 video shaped like Egocentric-100K (456x256, 30 fps) with tools/make_synthetic_clips.py,
then decodes it whole with PyAV (one thread and threaded) and with imageio-ffmpeg's bundled ffmpeg, and runs
cache_latents.py's own clip path (probe, plan, decode the needed frames, centre-crop to 448) for the reference clip
(61 frames at 8 fps). Run it on the machine whose cores will feed the GPU.

    python benchmarks/bench_decode.py --seconds 30
"""

import argparse
import os
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_synthetic_clips  # noqa: E402
from cosmos_video import Bucket, decode_frames, fit_frames, open_video, plan_bucket_clips, probe_video


def decode_all_pyav(path, threaded):
    with open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO" if threaded else "SLICE"
        if not threaded:
            stream.thread_count = 1
        return sum(1 for frame in container.decode(stream) if frame.to_ndarray(format="rgb24") is not None)


def decode_all_imageio(path, threads):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path, input_params=["-threads", str(threads)])
    next(reader)
    return sum(1 for _ in reader)


def video_clips(path):
    """The reference clips (61 frames at 8 fps, 256x448) of one video as uint8 [T, H, W, 3], cut as cache_latents.py
    cuts them."""
    with open_video(path) as container:
        num_frames, fps = probe_video(container)
        clips = [indices for _, indices in plan_bucket_clips([Bucket(61, 256, 448)], num_frames, fps, 8.0)]
        frames = decode_frames(container, {i for clip in clips for i in clip})
    return [fit_frames(torch.stack([torch.from_numpy(frames[i]) for i in clip]), 256, 448) for clip in clips]


def clips_of_video(path):
    return len(video_clips(path))


def rate(fn, *args):
    start = time.perf_counter()
    count = fn(*args)
    return count, count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="Length of the synthetic video.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ego.mp4")
        frames = make_synthetic_clips.render_video(0, round(args.seconds * 30), 256, 456)
        with open(path, "wb") as f:
            f.write(make_synthetic_clips.encode_mp4(frames, 30.0, "h265"))
        print(f"{os.cpu_count()} cores; H.265 456x256 30 fps, {args.seconds:.0f} s ({len(frames)} frames)")
        for name, fn, fn_args in [
            ("PyAV, 1 thread, decode + RGB", decode_all_pyav, (path, False)),
            ("PyAV, threaded, decode + RGB", decode_all_pyav, (path, True)),
            ("imageio-ffmpeg, 1 thread, decode + RGB pipe", decode_all_imageio, (path, 1)),
            ("imageio-ffmpeg, auto threads, decode + RGB pipe", decode_all_imageio, (path, 0)),
        ]:
            count, fps = rate(fn, *fn_args)
            print(f"  {name:<50}{fps:8.0f} frames/s ({count} frames)")
        count, clips_per_s = rate(clips_of_video, path)
        print(
            f"  cache_latents clip path (61 frames at 8 fps, crop 448), PyAV threaded: {clips_per_s:.2f} clips/s "
            f"({count} clips)"
        )


if __name__ == "__main__":
    main()
