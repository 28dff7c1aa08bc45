#!/usr/bin/env python
"""Decode side of caching: H.265 456x256 decode speed and CPU-seconds per clip, on the CPU and (--gpu_decode) on NVDEC.

Makes a synthetic H.265 video shaped like Egocentric-100K (456x256, 30 fps) with tools/make_synthetic_clips.py, then
measures, saving decode_results.json under --out after each measurement (a cut-off run keeps what it measured):

1. whole_video: the whole video decoded to RGB with PyAV (one thread, threaded) and imageio-ffmpeg's ffmpeg
   (one thread, auto; left out where imageio-ffmpeg is not installed): frames/s and CPU-seconds per frame (ffmpeg's
   child process included).
2. cpu_clip_path: cache_latents.py's own clip path (probe, plan the reference clips of 61 frames at 8 fps, decode
   the frames they need with PyAV, centre-crop to 256x448): clips/s, frames/s and CPU-seconds per clip of this
   process (PyAV's decode threads included), over --repeats passes.
3. colour_matrix_effect: the same clips converted from YUV with the BT.709 matrix instead of the BT.601 one FFmpeg
   uses for a stream that names none (as this one): the size of a colour-matrix mismatch between two decoders.
4. gpu_decode (--gpu_decode): the same clips (same frame indices, same crop) decoded by NVDEC with PyNvVideoCodec's
   SimpleDecoder into RGB uint8 CUDA tensors. First, whether it works at all here: "unavailable: <reason>" when
   PyNvVideoCodec or CUDA is missing, its import fails (a container without the driver's video libraries) or no
   decoder can be made. Then the first decoder and decode, clips/s, frames/s and CPU-seconds per clip with a new
   decoder per video and with one decoder reconfigured for each video, the device memory the decoder holds, and
   the difference from the CPU path's frames (mean and max absolute difference in uint8 levels, PSNR, the worst
   frame, the mean signed difference per RGB channel) and from the BT.709 reading of step 3. Decoders differ in
   the matrix and range they assume for a stream that names none; the two comparisons tell that apart from
   decoding errors.

PyNvVideoCodec is not a dependency of the project; install it (`pip install pynvvideocodec`) where GPU decode is to
be probed. Run this on the machine whose cores will feed the GPU:

    python benchmarks/bench_decode.py --out $OUT
    python benchmarks/bench_decode.py --gpu_decode --out $OUT
"""

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))
import make_synthetic_clips  # noqa: E402
from cosmos_cli import HelpFormatter
from cosmos_process import file_written_whole, run_main
from cosmos_video import Bucket, decode_frames, fit_frames, open_video, plan_bucket_clips, probe_video

SOURCE_FPS = 30.0
SOURCE_HEIGHT, SOURCE_WIDTH = 256, 456
REFERENCE = Bucket(61, 256, 448)  # the reference clip, at CLIP_FPS
CLIP_FPS = 8.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="Folder for decode_results.json (created if missing).")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="Seconds of synthetic video (30 holds 3 reference clips)."
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="Timed passes over the video's clips for each clip path."
    )
    parser.add_argument(
        "--gpu_decode",
        action="store_true",
        help="Also decode the clips on the GPU with PyNvVideoCodec (NVDEC) and compare them with the CPU path's.",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        raise ValueError(f"--repeats {args.repeats} must be at least 1")
    refuse_videos_shorter_than_a_clip(args.seconds)
    return args


def refuse_videos_shorter_than_a_clip(seconds):
    """A synthetic video of `seconds` at SOURCE_FPS must hold at least one reference clip."""
    if not reference_clips(round(seconds * SOURCE_FPS)):
        need = (REFERENCE.num_frames - 1) / CLIP_FPS + 1 / SOURCE_FPS
        raise ValueError(
            f"--seconds {seconds:g} is shorter than one reference clip (61 frames at 8 fps: {need:.2f} s)"
        )


def reference_clips(num_frames, source_fps=SOURCE_FPS):
    """Source frame indices of each reference clip of a video, as cache_latents.py plans them."""
    return [indices for _, indices in plan_bucket_clips([REFERENCE], num_frames, source_fps, CLIP_FPS)]


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Timing:
    """Wall seconds of some work, and the CPU-seconds it cost: every thread of this process and its children."""

    wall_s: float
    cpu_s: float

    def per_clip(self, clips):
        """Rates of `clips` reference clips decoded in this time (frames: the clips' own, 61 each)."""
        return {
            "clips": clips,
            "clips_per_s": round(clips / self.wall_s, 2),
            "frames_per_s": round(clips * REFERENCE.num_frames / self.wall_s, 1),
            "cpu_s_per_clip": round(self.cpu_s / clips, 4),
            "cpu_cores_busy": round(self.cpu_s / self.wall_s, 2),
        }


@contextlib.contextmanager
def one_torch_thread():
    """torch at one thread inside the block, as in a DataLoader worker (which torch starts at one), then given back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cpu_seconds():
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def synchronize():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, *args):
    """fn(*args)'s result and Timing, with any CUDA work it queued finished."""
    synchronize()
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn(*args)
    synchronize()
    return result, Timing(time.perf_counter() - wall, cpu_seconds() - cpu)


def repeated(fn, *args, repeats):
    """Timing of `repeats` calls of fn(*args)."""
    _, timing = timed(lambda: [fn(*args) for _ in range(repeats)])
    return timing


# ----------------------------------------------------------------------------------------------------------------
# CPU decoding
# ----------------------------------------------------------------------------------------------------------------
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


def video_clips(path, src_colorspace=None):
    """The reference clips (61 frames at 8 fps, 256x448) of one video as uint8 [T, H, W, 3], cut as cache_latents.py
    cuts them; `src_colorspace` as in cosmos_video.decode_frames."""
    with open_video(path) as container:
        num_frames, fps = probe_video(container)
        clips = reference_clips(num_frames, fps)
        frames = decode_frames(container, {i for clip in clips for i in clip}, src_colorspace)
    return [crop(torch.stack([torch.from_numpy(frames[i]) for i in clip])) for clip in clips]


def crop(frames):
    return fit_frames(frames, REFERENCE.height, REFERENCE.width)


def video_facts(path):
    with open_video(path) as container:
        num_frames, fps = probe_video(container)
        context = container.streams.video[0].codec_context
        return {
            "codec": context.name,
            "size": f"{context.width}x{context.height}",
            "fps": fps,
            "frames": num_frames,
            "bytes": os.path.getsize(path),
            "colorspace": str(context.colorspace),  # 2: unspecified, which FFmpeg reads as BT.601
            "color_range": str(context.color_range),  # 1: limited (MPEG), 2: full (JPEG)
            "reference_clips": len(reference_clips(num_frames, fps)),
        }


# ----------------------------------------------------------------------------------------------------------------
# GPU decoding (PyNvVideoCodec)
# ----------------------------------------------------------------------------------------------------------------
class Unavailable(Exception):
    """GPU decode cannot run on this machine; the message says why."""


def import_pynvvideocodec():
    """The PyNvVideoCodec module, once it imports and CUDA is there; else Unavailable."""
    try:
        import PyNvVideoCodec
    except Exception as error:  # no wheel, or a driver without its video libraries (libnvidia-encode, libnvcuvid)
        raise Unavailable(one_line(error)) from error
    if not torch.cuda.is_available():
        raise Unavailable("CUDA is not available to torch")
    return PyNvVideoCodec


def one_line(error):
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def new_decoder(nvc, path):
    """A SimpleDecoder of the video on torch's current GPU, giving interleaved RGB uint8 frames in device memory."""
    return nvc.SimpleDecoder(
        path, gpu_id=torch.cuda.current_device(), use_device_memory=True, output_color_type=nvc.OutputColorType.RGB
    )


def reconfigured(decoder, path):
    decoder.reconfigure_decoder(path)
    return decoder


def gpu_clips(decoder, clips):
    """The clips (lists of source frame indices) as uint8 CUDA tensors [T, 256, 448, 3], cropped as on the CPU."""
    wanted = sorted({i for clip in clips for i in clip})
    # stack copies the frames out of the decoder's buffers, which its next call reuses
    frames = torch.stack([torch.from_dlpack(frame) for frame in decoder.get_batch_frames_by_index(wanted)])
    if frames.shape != (len(wanted), SOURCE_HEIGHT, SOURCE_WIDTH, 3) or frames.dtype != torch.uint8:
        raise ValueError(f"SimpleDecoder gave {frames.dtype} frames {tuple(frames.shape)}, not uint8 [N, 256, 456, 3]")
    position = {index: n for n, index in enumerate(wanted)}
    return [crop(frames[[position[i] for i in clip]]) for clip in clips]


def gpu_decode(nvc, path, clips, cpu_reference, cpu_bt709, repeats, save):
    """Decode the clips with NVDEC and measure it; save(value) records the result so far after each measurement.

    A decoder that cannot be made is recorded as "unavailable: <reason>"; a failure after that is recorded under
    "error" and raised.
    """
    torch.zeros(1, device="cuda")  # the CUDA context exists before anything is timed or counted
    free_before, reserved_before = torch.cuda.mem_get_info()[0], torch.cuda.memory_reserved()
    try:
        decoder, first = timed(new_decoder, nvc, path)
    except Exception as error:  # e.g. no libnvcuvid: the import needs only libnvidia-encode, a decoder needs both
        save(f"unavailable: {one_line(error)}")
        return
    result = {"first_decoder_s": round(first.wall_s, 3)}
    try:
        decoded, first_decode = timed(gpu_clips, decoder, clips)
        device_used = free_before - torch.cuda.mem_get_info()[0]
        result["first_decode_s"] = round(first_decode.wall_s, 3)
        result["memory_mib"] = {
            # device memory outside torch's allocator: the decoder and its frame pool
            "decoder": round((device_used - (torch.cuda.memory_reserved() - reserved_before)) / 2**20, 1),
            "torch_peak_allocated": round(torch.cuda.max_memory_allocated() / 2**20, 1),
        }
        result["exactness_vs_cpu_path"] = difference(decoded, cpu_reference)
        result["exactness_vs_cpu_bt709"] = difference(decoded, cpu_bt709)
        save(result)
        for name, decode in [
            # a new decoder per video, as a decode worker handed one video after another would make
            ("new_decoder_per_video", lambda: gpu_clips(new_decoder(nvc, path), clips)),
            # one decoder reconfigured for each video (PyNvVideoCodec keeps a cache of decoders by stream shape)
            ("reconfigured_decoder", lambda: gpu_clips(reconfigured(decoder, path), clips)),
        ]:
            result[name] = repeated(decode, repeats=repeats).per_clip(repeats * len(clips))
            save(result)
    except Exception as error:
        result["error"] = one_line(error)
        save(result)
        raise


# ----------------------------------------------------------------------------------------------------------------
# Exactness
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Difference:
    """How far clips are from reference clips, in uint8 levels."""

    mean_abs: float
    max_abs: int
    psnr_db: float | None  # None: identical
    worst_frame_mean_abs: float  # a frame taken from the wrong source index stands out here
    mean_signed_rgb: list  # clips minus reference per channel: a matrix or range mismatch shows as a bias


def difference(clips, reference):
    a = torch.stack([c.cpu() for c in clips]).float()
    b = torch.stack(reference).float()
    error = a - b
    mse = error.square().mean().item()
    return asdict(
        Difference(
            mean_abs=round(error.abs().mean().item(), 3),
            max_abs=int(error.abs().max().item()),
            psnr_db=round(10 * math.log10(255**2 / mse), 2) if mse else None,
            worst_frame_mean_abs=round(error.abs().mean(dim=(2, 3, 4)).max().item(), 3),
            mean_signed_rgb=[round(v, 3) for v in error.mean(dim=(0, 1, 2, 3)).tolist()],
        )
    )


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------
def has_imageio_ffmpeg():
    return importlib.util.find_spec("imageio_ffmpeg") is not None


def versions():
    import av

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "av": av.__version__,
    }
    if has_imageio_ffmpeg():  # optional: its rows are left out without it
        import imageio_ffmpeg

        found["imageio_ffmpeg"] = imageio_ffmpeg.__version__
    return found


def device_facts():
    facts = {"cpu_cores": os.cpu_count(), "cpu_cores_usable": len(os.sched_getaffinity(0))}
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    if os.path.exists("/proc/driver/nvidia/version"):
        with open("/proc/driver/nvidia/version") as f:
            facts["nvidia_driver"] = f.readline().strip()
    return facts


def make_video(path, seconds):
    frames = make_synthetic_clips.render_video(0, round(seconds * SOURCE_FPS), SOURCE_HEIGHT, SOURCE_WIDTH)
    with open(path, "wb") as f:
        f.write(make_synthetic_clips.encode_mp4(frames, SOURCE_FPS, "h265"))


def main(args):
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    results = {"date": time.strftime("%Y-%m-%d"), "device": device_facts(), "versions": versions(), "args": vars(args)}

    def record(name, value):  # saved after every measurement, so a cut-off run keeps what it measured
        results[name] = value
        print(name, json.dumps(value), flush=True)
        with file_written_whole(os.path.join(args.out, "decode_results.json")) as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=2)

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ego.mp4")
        make_video(path, args.seconds)
        record("video", video_facts(path))
        # the whole video, by each CPU decoder
        rows, decoders = (
            [],
            [
                ("PyAV, 1 thread, decode + RGB", decode_all_pyav, (path, False)),
                ("PyAV, threaded, decode + RGB", decode_all_pyav, (path, True)),
            ],
        )
        if has_imageio_ffmpeg():
            decoders += [
                ("imageio-ffmpeg, 1 thread, decode + RGB pipe", decode_all_imageio, (path, 1)),
                ("imageio-ffmpeg, auto threads, decode + RGB pipe", decode_all_imageio, (path, 0)),
            ]
        for name, fn, fn_args in decoders:
            frames, timing = timed(fn, *fn_args)
            rows.append(
                {
                    "decoder": name,
                    "frames": frames,
                    "frames_per_s": round(frames / timing.wall_s),
                    "cpu_ms_per_frame": round(1000 * timing.cpu_s / frames, 3),
                }
            )
            record("whole_video", rows)
        # cache_latents.py's clip path: one untimed pass gives the reference frames
        cpu_reference = video_clips(path)
        timing = repeated(video_clips, path, repeats=args.repeats)
        record("cpu_clip_path", timing.per_clip(args.repeats * len(cpu_reference)))
        # the same clips through the BT.709 matrix
        cpu_bt709 = video_clips(path, src_colorspace="itu709")
        record("colour_matrix_effect", {"bt709_vs_bt601": difference(cpu_bt709, cpu_reference)})
        if not args.gpu_decode:
            record("gpu_decode", "skipped: --gpu_decode not given")
            return
        # NVDEC through PyNvVideoCodec, on the same clips
        try:
            nvc = import_pynvvideocodec()
        except Unavailable as reason:
            record("gpu_decode", f"unavailable: {reason}")
            return
        results["versions"]["pynvvideocodec"] = nvc.__version__
        clips = reference_clips(results["video"]["frames"], results["video"]["fps"])
        gpu_decode(nvc, path, clips, cpu_reference, cpu_bt709, args.repeats, lambda value: record("gpu_decode", value))


if __name__ == "__main__":
    run_main(main, parse_args)
