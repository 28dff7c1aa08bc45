"""Video I/O shared by the three scripts: clip geometry, decoding and resampling source videos, writing mp4s.

The Wan VAE compresses 4x in time (causally) and 8x in space, and the transformer patches 2x2, so a clip has 4k+1
frames and a height and width that are multiples of 16.
"""

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cosmos_process import file_written_whole

VAE_TEMPORAL_FACTOR = 4
VAE_SPATIAL_FACTOR = 8
SIZE_MULTIPLE = 16  # 8x VAE times the transformer's 2x2 patch


# ----------------------------------------------------------------------------------------------------------------
# Clip geometry
# ----------------------------------------------------------------------------------------------------------------
def nearest_valid_num_frames(num_frames):
    """The Wan VAE needs 4k+1 pixel frames; return the closest such count (ties go down)."""
    k = max(0, round((num_frames - 1) / VAE_TEMPORAL_FACTOR - 1e-9))
    return VAE_TEMPORAL_FACTOR * k + 1


def check_clip_geometry(num_frames, height, width):
    """Raise a one-line ValueError naming the nearest valid value when a clip shape cannot be encoded."""
    if num_frames < 1 or (num_frames - 1) % VAE_TEMPORAL_FACTOR != 0:
        raise ValueError(
            f"--num_frames {num_frames} is not 4k+1 as the Wan VAE needs; "
            f"nearest valid: {nearest_valid_num_frames(num_frames)}"
        )
    if num_frames == 1:
        raise ValueError("--num_frames 1 is one latent frame: video2world needs at least 2 (--num_frames 5 or more)")
    for name, value in (("height", height), ("width", width)):
        if value < SIZE_MULTIPLE or value % SIZE_MULTIPLE != 0:
            nearest = max(SIZE_MULTIPLE, SIZE_MULTIPLE * round(value / SIZE_MULTIPLE))
            raise ValueError(
                f"--{name} {value} is not a multiple of {SIZE_MULTIPLE} (8x VAE x 2x2 patch); nearest valid: {nearest}"
            )


def latent_shape(num_frames, height, width, channels=16):
    return [
        channels,
        (num_frames - 1) // VAE_TEMPORAL_FACTOR + 1,
        height // VAE_SPATIAL_FACTOR,
        width // VAE_SPATIAL_FACTOR,
    ]


@dataclass(frozen=True, order=True)
class Bucket:
    """One clip shape of a cache: frames x height x width in pixels, spelled `61x256x448`."""

    num_frames: int
    height: int
    width: int

    @property
    def name(self):
        return f"{self.num_frames}x{self.height}x{self.width}"

    def __str__(self):  # how a run's settings record a bucket (results.json, training_args.json)
        return self.name

    def latent_shape(self, channels=16):
        return latent_shape(self.num_frames, self.height, self.width, channels)


def parse_bucket(text):
    """`FRAMESxHEIGHTxWIDTH` -> Bucket, checked like --num_frames/--height/--width."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"bucket {text!r} is not FRAMESxHEIGHTxWIDTH, e.g. 61x256x448")
    bucket = Bucket(*map(int, parts))
    try:
        check_clip_geometry(bucket.num_frames, bucket.height, bucket.width)
    except ValueError as error:
        raise ValueError(f"bucket {text}: {error}") from None
    return bucket


def nearest_bucket_size(buckets, height, width):
    """(height, width) of the buckets whose aspect ratio is nearest a source's, compared as |log(w/h)|.

    Ties between equal aspect ratios go to the largest size the source covers without upscaling, else the smallest;
    ties between different aspect ratios go to the one listed first.
    """
    sizes = list(dict.fromkeys((b.height, b.width) for b in buckets))
    distance = [abs(math.log((w / h) / (width / height))) for h, w in sizes]
    best = [s for s, d in zip(sizes, distance, strict=True) if d <= min(distance) + 1e-9]
    covered = [s for s in best if s[0] <= height and s[1] <= width]
    return max(covered, key=lambda s: s[0] * s[1]) if covered else min(best, key=lambda s: s[0] * s[1])


def plan_bucket_clips(buckets, num_source_frames, source_fps, fps, stride_seconds=None, max_clips=None):
    """[(bucket, source frame indices)] for one video, given the buckets of its size (nearest_bucket_size).

    From start 0, each clip takes the longest frame count of those buckets that still fits in the video, so a long
    video also yields its tail in a shorter bucket; the next clip starts --clip_stride_seconds later (default: where
    this clip ends). Frame j of a clip is the source frame nearest to start + j / fps.
    """
    longest_first = sorted(buckets, key=lambda b: -b.num_frames)
    clips, start = [], 0.0
    while max_clips is None or len(clips) < max_clips:
        for bucket in longest_first:
            indices = [round((start + j / fps) * source_fps) for j in range(bucket.num_frames)]
            if indices[-1] < num_source_frames:
                clips.append((bucket, indices))
                break
        else:
            break
        start += stride_seconds or bucket.num_frames / fps
    return clips


def fit_frames(frames, height, width, mode="crop"):
    """Resize uint8 frames [T, H, W, 3] to [T, height, width, 3].

    `crop` scales to cover the target keeping the aspect ratio, then centre-crops (456x256 -> 448x256 is a pure crop);
    `resize` stretches to the target size.
    """
    frames = torch.as_tensor(frames)
    src_h, src_w = frames.shape[1:3]
    if mode == "crop":
        scale = max(height / src_h, width / src_w)
        new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    elif mode == "resize":
        new_h, new_w = height, width
    else:
        raise ValueError(f"unknown resize mode {mode!r}; use crop or resize")
    if (new_h, new_w) != (src_h, src_w):
        x = frames.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return frames[:, top : top + height, left : left + width].contiguous()


def frames_to_vae_input(frames):
    """uint8 [T, H, W, 3] -> float [3, T, H, W] in [-1, 1], as the pipeline's video processor produces."""
    return frames.permute(3, 0, 1, 2).float() / 255.0 * 2.0 - 1.0


# ----------------------------------------------------------------------------------------------------------------
# Decoding and clip planning
# ----------------------------------------------------------------------------------------------------------------
def open_video(video):
    import av  # only the scripts that decode videos need PyAV

    return av.open(io.BytesIO(video) if isinstance(video, (bytes, bytearray)) else video)


def probe_video(container):
    """(frame count, frames per second) of the first video stream, from the container's metadata."""
    if not container.streams.video:
        raise ValueError("no video stream")
    stream = container.streams.video[0]
    fps = float(stream.average_rate or stream.guessed_rate)
    num_frames = stream.frames
    if not num_frames:
        duration = float(stream.duration * stream.time_base) if stream.duration else container.duration / 1e6
        num_frames = int(duration * fps)
    return num_frames, fps


def video_size(container):
    """(height, width) in pixels of the first video stream."""
    context = container.streams.video[0].codec_context
    return context.height, context.width


def decode_frames(container, wanted, src_colorspace=None):
    """{source index: RGB uint8 array [H, W, 3]} for the wanted indices, decoding sequentially once.

    The YUV -> RGB matrix is the stream's own, or BT.601 where the stream does not name one (FFmpeg's swscale
    default); `src_colorspace` (a PyAV Colorspace name such as "itu709") overrides it.
    """
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    last, frames = max(wanted), {}
    for index, frame in enumerate(container.decode(stream)):
        if index in wanted:
            frames[index] = frame.to_ndarray(format="rgb24", src_colorspace=src_colorspace)
        if index >= last:
            break
    return frames


# ----------------------------------------------------------------------------------------------------------------
# Writing and reading mp4s, grids and contact sheets
# ----------------------------------------------------------------------------------------------------------------
def write_mp4(path, frames, fps):
    """Write uint8 frames [T, H, W, 3] as H.264 mp4 with imageio-ffmpeg, atomically."""
    import imageio_ffmpeg  # imported here: training needs it only for validation videos

    frames = np.ascontiguousarray(frames)
    with file_written_whole(path) as tmp:
        writer = imageio_ffmpeg.write_frames(
            tmp,
            (frames.shape[2], frames.shape[1]),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            macro_block_size=1,
            quality=8,
            output_params=["-loglevel", "error", "-f", "mp4"],  # the temporary name has no .mp4 to go by
        )
        writer.send(None)
        for frame in frames:
            writer.send(frame.tobytes())
        writer.close()


def read_mp4(path):
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(path)
    meta = reader.__next__()
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])


def video_grid(videos):
    """Tile videos [T, H, W, 3] (padded to the longest with their last frame) into one video."""
    length = max(len(v) for v in videos)
    height, width = max(v.shape[1] for v in videos), max(v.shape[2] for v in videos)
    cols = math.ceil(math.sqrt(len(videos)))
    rows = math.ceil(len(videos) / cols)
    grid = np.zeros((length, rows * height, cols * width, 3), np.uint8)
    for i, video in enumerate(videos):
        video = np.concatenate([video, np.repeat(video[-1:], length - len(video), 0)])
        r, c = divmod(i, cols)
        grid[:, r * height : r * height + video.shape[1], c * width : c * width + video.shape[2]] = video
    return grid


LABEL_HEIGHT = 12  # pixels of the text strip above a labelled contact-sheet row


def contact_sheet(videos, labels=None, frames_per_row=8, frame_captions=None):
    """One row of evenly spaced frames per video, as one image; with `labels`, each row under a line of text; with
    `frame_captions` (per video: None, or one string per frame), a caption under each frame shown."""
    rows = []
    width = max(v.shape[2] for v in videos) * frames_per_row
    for index, video in enumerate(videos):
        picks = np.linspace(0, len(video) - 1, frames_per_row).round().astype(int)
        row = np.concatenate(list(video[picks]), axis=1)
        captions = frame_captions[index] if frame_captions else None
        if captions:
            strip = np.concatenate([label_strip(captions[p], video.shape[2]) for p in picks], axis=1)
            row = np.concatenate([row, strip])
        row = np.pad(row, ((0, 2), (0, width - row.shape[1]), (0, 0)))
        if labels:
            row = np.concatenate([label_strip(labels[index], width), row])
        rows.append(row)
    return np.concatenate(rows)


def label_strip(text, width):
    """A black strip with white text, [LABEL_HEIGHT, width, 3] uint8 (PIL's built-in font: no font files needed)."""
    from PIL import Image, ImageDraw

    strip = Image.new("RGB", (width, LABEL_HEIGHT))
    ImageDraw.Draw(strip).text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(strip)
